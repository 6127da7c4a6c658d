//! Measures Conv2d forward and backward on VGG/ResNet-CIFAR shapes at batch 32, or with `224` as the second
//! argument on VGG16-224's conv shapes at batch 4 (a tuning aid, not a test). Usage: conv_shapes [THREADS] [224].
use asymml_core::layers::{Conv2d, Conv2dConfig};
use asymml_core::rng::Rng;
use asymml_core::Tensor;
use std::time::Instant;

#[repr(C)]
struct Timespec {
    sec: i64,
    nsec: i64,
}

extern "C" {
    fn clock_gettime(clock: i32, ts: *mut Timespec) -> i32;
}

/// CPU time of the whole process in seconds (all threads), less sensitive to other load than wall time.
fn cpu_time() -> f64 {
    let mut ts = Timespec { sec: 0, nsec: 0 };
    // SAFETY: `ts` is a live, writable `Timespec` (two 64-bit fields, the layout of `struct timespec` on 64-bit
    // Linux) and clock_gettime writes nothing but it; clock 2 is CLOCK_PROCESS_CPUTIME_ID.
    unsafe { clock_gettime(2, &mut ts) };
    ts.sec as f64 + ts.nsec as f64 * 1e-9
}

/// (min wall, min CPU) seconds of `reps` runs of `f`.
fn time(reps: usize, mut f: impl FnMut()) -> (f64, f64) {
    let (mut w, mut c) = (f64::MAX, f64::MAX);
    for _ in 0..reps {
        let (t, c0) = (Instant::now(), cpu_time());
        f();
        w = w.min(t.elapsed().as_secs_f64());
        c = c.min(cpu_time() - c0);
    }
    (w, c)
}

fn main() {
    let threads: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .ok();
    let big = std::env::args().nth(2).as_deref() == Some("224");
    let mut rng = Rng::new(1);
    let (mut tf, mut tb, mut flops) = (0.0, 0.0, 0.0);
    let (mut tcf, mut tcb) = (0.0, 0.0);
    let cifar: &[(usize, usize, usize, usize, usize)] = &[
        (3, 64, 32, 3, 1),
        (64, 64, 32, 3, 1),
        (128, 128, 16, 3, 1),
        (256, 256, 8, 3, 1),
        (512, 512, 4, 3, 1),
        (512, 512, 2, 3, 1),
        (64, 128, 32, 3, 2),
        (64, 128, 32, 1, 2),
    ];
    let vgg224: &[(usize, usize, usize, usize, usize)] = &[
        (3, 64, 224, 3, 1),
        (64, 64, 224, 3, 1),
        (64, 128, 112, 3, 1),
        (128, 128, 112, 3, 1),
        (128, 256, 56, 3, 1),
        (256, 256, 56, 3, 1),
        (256, 512, 28, 3, 1),
        (512, 512, 28, 3, 1),
        (512, 512, 14, 3, 1),
    ];
    let (shapes, batch) = if big { (vgg224, 4) } else { (cifar, 32) };
    for &(c, m, hw, k, s) in shapes {
        let mut conv = Conv2d::new(
            c,
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
            shape: vec![batch, c, hw, hw],
            data: (0..batch * c * hw * hw).map(|_| rng.normal()).collect(),
        };
        let mut y = Tensor::default();
        let mut dx = Tensor::default();
        conv.forward(&x, &mut y).unwrap();
        let dy = y.clone();
        conv.backward(&x, &dy, Some(&mut dx)).unwrap();
        let reps = 5;
        let (f, fc) = time(reps, || conv.forward(&x, &mut y).unwrap());
        let (b, bc) = time(reps, || conv.backward(&x, &dy, Some(&mut dx)).unwrap());
        let gf = 2.0 * conv.macs(&x.shape) as f64 / 1e9;
        println!(
            "C {c:>3} M {m:>3} {hw:>3}px k{k} s{s}: fwd {:6.1} ms (cpu {:6.1}) {:6.1} GF/s  bwd {:6.1} ms (cpu {:6.1}) {:6.1} GF/s",
            f * 1e3,
            fc * 1e3,
            gf / f,
            b * 1e3,
            bc * 1e3,
            2.0 * gf / b
        );
        tcf += fc;
        tcb += bc;
        tf += f;
        tb += b;
        flops += gf;
    }
    println!(
        "total: fwd {:.1} ms (cpu {:.1}) {:.1} GF/s, bwd {:.1} ms (cpu {:.1}) {:.1} GF/s",
        tf * 1e3,
        tcf * 1e3,
        flops / tf,
        tb * 1e3,
        tcb * 1e3,
        2.0 * flops / tb
    );
}
