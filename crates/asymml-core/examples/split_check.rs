//! Checks ∇W_T + ∇W(X_U) = ∇W(X) and Y_T + conv(X_U) = conv(X) on one shape (a debugging aid).
use asymml_core::decomp::{decompose_batch, BatchLowRank, RankPolicy, TrustedConv};
use asymml_core::layers::{Conv2d, Conv2dConfig};
use asymml_core::rng::Rng;
use asymml_core::Tensor;

fn main() {
    let a: Vec<usize> = std::env::args()
        .skip(1)
        .map(|s| s.parse().unwrap())
        .collect();
    let (b, n, m, hw, k, s, r) = (a[0], a[1], a[2], a[3], a[4], a[5], a[6]);
    let mut rng = Rng::new(3);
    let mut conv = Conv2d::new(
        n,
        m,
        k,
        Conv2dConfig {
            stride: s,
            padding: k / 2,
            bias: false,
        },
        &mut rng,
    );
    let x = Tensor {
        shape: vec![b, n, hw, hw],
        data: (0..b * n * hw * hw)
            .map(|_| rng.normal().max(0.0))
            .collect(),
    };
    let mut lr = BatchLowRank::default();
    let mut xu = Tensor::default();
    decompose_batch(&x, RankPolicy::Fixed(r), 0, 1, &mut lr, &mut xu).unwrap();
    let (mut y, mut yu, mut yt) = (Tensor::default(), Tensor::default(), Tensor::default());
    conv.forward(&x, &mut y).unwrap();
    conv.forward(&xu, &mut yu).unwrap();
    let mut tc = TrustedConv::new();
    tc.forward(&conv, &lr, &mut yt).unwrap();
    let err = |a: &[f32], b: &[f32]| {
        let sc = a.iter().fold(0f32, |m, v| m.max(v.abs()));
        a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / sc
    };
    let ysum: Vec<f32> = yu.data.iter().zip(&yt.data).map(|(a, b)| a + b).collect();
    println!("forward rel err {:.3e}", err(&y.data, &ysum));
    let dy = Tensor {
        shape: y.shape.clone(),
        data: (0..y.len()).map(|_| rng.normal()).collect(),
    };
    conv.weight.zero_grad();
    conv.backward(&x, &dy, None).unwrap();
    let full = conv.weight.grad.data.clone();
    conv.weight.zero_grad();
    conv.backward(&xu, &dy, None).unwrap();
    let mut dwt = Tensor::default();
    tc.weight_grad(&conv, &lr, &dy, &mut dwt).unwrap();
    let sum: Vec<f32> = conv
        .weight
        .grad
        .data
        .iter()
        .zip(&dwt.data)
        .map(|(a, b)| a + b)
        .collect();
    println!("weight grad rel err {:.3e}", err(&full, &sum));
}
