//! Times Conv_T (`TrustedConv::forward`, batch 8) on the shapes of VGG16's convs at 224 px with the schedule's
//! ranks, and its weight gradient ∇W_T, beside the full conv of X and the full conv of an r-channel input (a tuning aid, not a test; random
//! data: the timing does not depend on it). An argument times one shape only, 30 times. Without one, the last
//! line sums each column over VGG16's twelve convs after its first (a shape counted as often as VGG16 has it):
//! what the split's trusted convs cost at these speeds alone, against trusted-only's forwards of the same convs.
//!
//!     RAYON_NUM_THREADS=1 cargo run --release -p asymml-core --example tconv_speed [-- INDEX]
use asymml_core::decomp::{decompose_batch, BatchLowRank, RankPolicy, TrustedConv};
use asymml_core::layers::{Conv2d, Conv2dConfig};
use asymml_core::rng::Rng;
use asymml_core::Tensor;
use std::time::Instant;

/// A 3×3 stride-1 pad-1 conv from `n` to `m` channels, without bias.
fn conv3(n: usize, m: usize, rng: &mut Rng) -> Conv2d {
    let cfg = Conv2dConfig {
        stride: 1,
        padding: 1,
        bias: false,
    };
    Conv2d::new(n, m, 3, cfg, rng)
}

fn main() {
    // (N, M, H = W, r) and how many of VGG16's convs have the shape.
    let shapes = [
        (64, 64, 224, 2, 1),
        (64, 128, 112, 4, 1),
        (128, 128, 112, 8, 1),
        (128, 256, 56, 16, 1),
        (256, 256, 56, 32, 2),
        (256, 512, 28, 32, 1),
        (512, 512, 28, 32, 2),
        (512, 512, 14, 32, 3),
    ];
    // Σ over the convs: Conv_T, Conv_T from X, ∇W_T, the full conv.
    let mut sums = [0.0f64; 4];
    let b = 8;
    let only: Option<usize> = std::env::args().nth(1).and_then(|a| a.parse().ok());
    for (i, &(n, m, hw, r, count)) in shapes.iter().enumerate() {
        if only.is_some_and(|o| o != i) {
            continue;
        }
        let mut rng = Rng::new(3);
        let mut conv = conv3(n, m, &mut rng);
        let x = Tensor {
            shape: vec![b, n, hw, hw],
            data: (0..b * n * hw * hw)
                .map(|_| rng.normal().max(0.0))
                .collect(),
        };
        let mut lr = BatchLowRank::default();
        let mut xu = Tensor::default();
        decompose_batch(&x, RankPolicy::Fixed(r), 0, 1, &mut lr, &mut xu).unwrap();
        let mut y = Tensor::default();
        let mut tc = TrustedConv::new();
        let best = |f: &mut dyn FnMut()| {
            let mut b = f64::MAX;
            for _ in 0..if only.is_some() { 30 } else { 3 } {
                let t = Instant::now();
                f();
                b = b.min(t.elapsed().as_secs_f64());
            }
            b
        };
        let tt = best(&mut || tc.forward(&conv, &lr, &mut y).unwrap());
        // As a training forward runs it: V let go, made again from X (a few rows at a time by Winograd).
        let mut lean = lr.clone();
        lean.drop_v();
        let tl = best(&mut || tc.forward_from(&conv, &mut lean, &x, &mut y).unwrap());
        let fl = TrustedConv::forward_flops(&conv, &lr).unwrap();
        let tf = best(&mut || conv.forward(&x, &mut y).unwrap());
        let mut cr = conv3(r, m, &mut rng);
        let xr = Tensor {
            shape: vec![b, r, hw, hw],
            data: (0..b * r * hw * hw).map(|_| rng.normal()).collect(),
        };
        let tr = best(&mut || cr.forward(&xr, &mut y).unwrap());
        // ∇W_T added into a gradient (as the split's backward does), from ∇Y = Y.
        tc.forward(&conv, &lr, &mut y).unwrap();
        let mut grad = Tensor::zeros(&conv.weight.value.shape);
        let tw = best(&mut || tc.add_weight_grad(&conv, &lr, &y, &mut grad).unwrap());
        println!("N{n} M{m} {hw}² r{r}: Conv_T {:.1} ms ({:.1} GFLOP/s), from X {:.1} ms, ∇W_T {:.1} ms, full {:.1} ms, full conv of r channels {:.1} ms", tt * 1e3, fl / tt / 1e9, tl * 1e3, tw * 1e3, tf * 1e3, tr * 1e3);
        for (s, t) in sums.iter_mut().zip([tt, tl, tw, tf]) {
            *s += count as f64 * t;
        }
    }
    if only.is_none() {
        let [tt, tl, tw, tf] = sums.map(|s| s * 1e3);
        println!("VGG16-224 convs 2–13: Conv_T {tt:.0} ms, from X {tl:.0} ms, ∇W_T {tw:.0} ms; the full convs (trusted-only's forwards) {tf:.0} ms");
    }
}
