//! Times Conv_T (`TrustedConv::forward`, batch 8) on the shapes of VGG16's convs at 224 px with the schedule's
//! ranks, and its weight gradient ∇W_T, beside the full conv of X and the full conv of an r-channel input (a tuning aid, not a test; random
//! data: the timing does not depend on it). An argument times one shape only, 30 times.
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
    let shapes = [
        (64, 64, 224, 2),
        (64, 128, 112, 4),
        (128, 128, 112, 8),
        (128, 256, 56, 16),
        (256, 256, 56, 32),
        (256, 512, 28, 32),
        (512, 512, 28, 32),
        (512, 512, 14, 32),
    ];
    let b = 8;
    let only: Option<usize> = std::env::args().nth(1).and_then(|a| a.parse().ok());
    for (i, &(n, m, hw, r)) in shapes.iter().enumerate() {
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
    }
}
