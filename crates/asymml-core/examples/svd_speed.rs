//! Times the decomposition's SVD methods on real activations (a tuning aid, not a test): the photos of
//! `--images` (default /work/shared/data/images/photos) resized to 224 × 224, through VGG16 with random
//! weights (seed 1); at every conv's input (batch 8) the schedule's rank r = min(2^i, 32), then per method
//! the best of 3 wall times and the kept energy 1 − ‖X_U‖²/‖X‖² over the batch, next to the exact SVD's.
//!
//!     RAYON_NUM_THREADS=1 cargo run --release -p asymml-core --example svd_speed [-- --images DIR] [--no-exact] [--cpu]
use asymml_core::decomp::{
    decompose_batch_with, energy_kept, schedule_rank, singular_values, BatchLowRank, BlockRoute,
    BlockSvd, RankPolicy, SvdMethod,
};
use asymml_core::layers::Conv2d;
use asymml_core::models::{ConvExec, LocalExec, ModelSpec};
use asymml_core::{Result, Tensor};
use std::time::Instant;

#[repr(C)]
struct Timespec {
    sec: i64,
    nsec: i64,
}

extern "C" {
    fn clock_gettime(clock: i32, ts: *mut Timespec) -> i32;
}

/// CPU seconds of the whole process (clock 2, CLOCK_PROCESS_CPUTIME_ID): less sensitive than wall time to
/// other processes on a shared machine.
fn cpu_time() -> f64 {
    let mut ts = Timespec { sec: 0, nsec: 0 };
    // SAFETY: `ts` is a live, writable `Timespec` with the layout of `struct timespec` on 64-bit Linux, and
    // clock_gettime writes nothing else.
    unsafe { clock_gettime(2, &mut ts) };
    ts.sec as f64 + ts.nsec as f64 * 1e-9
}

/// Records every conv's input on the way.
struct Capture(Vec<Tensor>);

impl ConvExec for Capture {
    fn conv_forward(
        &mut self,
        conv: &mut Conv2d,
        x: &Tensor,
        y: &mut Tensor,
        t: bool,
    ) -> Result<()> {
        self.0.push(x.clone());
        LocalExec.conv_forward(conv, x, y, t)
    }
    fn conv_backward(
        &mut self,
        conv: &mut Conv2d,
        x: &Tensor,
        dy: &Tensor,
        dx: Option<&mut Tensor>,
    ) -> Result<()> {
        LocalExec.conv_backward(conv, x, dy, dx)
    }
}

/// The batch: each photo resized to size × size, ImageNet-normalised; the 8th is the first one mirrored.
fn load(dir: &str, size: u32, batch: usize) -> Tensor {
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .expect("images folder")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let ext = p
                .extension()
                .and_then(|e| e.to_str())
                .unwrap_or("")
                .to_ascii_lowercase();
            ["png", "jpg", "jpeg"].contains(&ext.as_str())
        })
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "no images in {dir}");
    let (mean, std) = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]);
    let plane = (size * size) as usize;
    let mut data = Vec::with_capacity(batch * 3 * plane);
    for i in 0..batch {
        let img = image::open(&paths[i % paths.len()])
            .expect("decodable image")
            .to_rgb8();
        let mut img =
            image::imageops::resize(&img, size, size, image::imageops::FilterType::Triangle);
        if i >= paths.len() {
            img = image::imageops::flip_horizontal(&img);
        }
        for c in 0..3 {
            data.extend(
                img.pixels()
                    .map(|p| (p[c] as f32 / 255.0 - mean[c]) / std[c]),
            );
        }
    }
    Tensor::from_vec(&[batch, 3, size as usize, size as usize], data).unwrap()
}

fn sum_sq(x: &[f32]) -> f64 {
    x.iter().map(|&v| (v as f64) * (v as f64)).sum()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = args
        .iter()
        .position(|a| a == "--images")
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| "/work/shared/data/images/photos".into());
    let exact = !args.iter().any(|a| a == "--no-exact");
    // Process CPU time instead of wall time (with one thread: the time the decomposition ran).
    let cpu = args.iter().any(|a| a == "--cpu");
    let x = load(&dir, 224, 8);
    let mut net = ModelSpec::parse("vgg16", 3, 1000, 224)
        .unwrap()
        .build(1)
        .unwrap();
    let mut cap = Capture(Vec::new());
    net.forward(&x, false, &mut cap).unwrap();
    let block = |power, route| {
        SvdMethod::Block(BlockSvd {
            power,
            route,
            ..BlockSvd::default()
        })
    };
    let methods = [
        ("light:1", SvdMethod::light(1)),
        ("light:2", SvdMethod::light(2)),
        ("gram", block(2, BlockRoute::Gram)),
        ("direct:1", block(1, BlockRoute::Direct)),
        ("direct:2", block(2, BlockRoute::Direct)),
        ("block", SvdMethod::block()),
    ];
    println!(
        "threads {}; per conv input (batch 8): best of 3 {} ms | kept energy %",
        rayon::current_num_threads(),
        if cpu { "CPU" } else { "wall" }
    );
    print!("{:>4} {:>4} {:>6} {:>3} |", "conv", "N", "HW", "r");
    for (name, _) in &methods {
        print!(" {name:>9}");
    }
    print!(" |");
    for (name, _) in &methods {
        print!(" {name:>9}");
    }
    println!(" {:>9}", if exact { "exact" } else { "" });
    let mut totals = vec![0f64; methods.len()];
    let (mut lr, mut xu) = (BatchLowRank::default(), Tensor::default());
    for (i, xi) in cap.0.iter().enumerate() {
        let (b, n, h, w) = xi.nchw("x").unwrap();
        let hw = h * w;
        let r = schedule_rank(i).min(n);
        let total = sum_sq(&xi.data);
        let mut times = Vec::new();
        let mut kept = Vec::new();
        for (k, (_, m)) in methods.iter().enumerate() {
            let mut best = f64::MAX;
            for _ in 0..3 {
                let (t, c0) = (Instant::now(), cpu_time());
                decompose_batch_with(xi, RankPolicy::Fixed(r), 0, *m, &mut lr, &mut xu).unwrap();
                let wall = t.elapsed().as_secs_f64();
                best = best.min(if cpu { cpu_time() - c0 } else { wall });
            }
            totals[k] += best;
            times.push(best * 1e3);
            kept.push(100.0 * (1.0 - sum_sq(&xu.data) / total));
        }
        print!("{i:>4} {n:>4} {hw:>6} {r:>3} |");
        times.iter().for_each(|t| print!(" {t:>9.2}"));
        print!(" |");
        kept.iter().for_each(|e| print!(" {e:>9.3}"));
        if exact {
            let e: f64 = xi
                .data
                .chunks(n * hw)
                .map(|xb| energy_kept(&singular_values(xb, n, hw), r) * sum_sq(xb))
                .sum::<f64>()
                / total;
            print!(" {:>9.3}", 100.0 * e);
        }
        println!();
        let _ = b;
    }
    print!("{:>20} |", "total ms");
    totals.iter().for_each(|t| print!(" {:>9.1}", t * 1e3));
    println!();
}
