//! Times the decomposition's SVD methods on real activations (a tuning aid, not a test): the images of
//! `--images` (default /work/shared/data/images/photos) resized to `--size` (224), through `--model` (vgg16)
//! with random weights (seed 1); at every conv's input (batch `--batch`, 8) the rank of `--policy` (default
//! the schedule's r = min(2^i, 32)), then per method the best of 3 wall times and the kept energy
//! 1 − ‖X_U‖²/‖X‖² over the batch, next to the exact SVD's, and the conv's own time (best of 3) for scale.
//!
//!     RAYON_NUM_THREADS=1 cargo run --release -p asymml-core --example svd_speed [-- --images DIR] [--no-exact] [--cpu]
//!         [--size 32 --batch 32 --model vgg16 --policy asym1]
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

/// Records every conv's input on the way, and the conv's best time of 3.
struct Capture(Vec<Tensor>, Vec<f64>);

impl ConvExec for Capture {
    fn conv_forward(
        &mut self,
        conv: &mut Conv2d,
        x: &Tensor,
        y: &mut Tensor,
        t: bool,
    ) -> Result<()> {
        self.0.push(x.clone());
        let mut best = f64::MAX;
        for _ in 0..3 {
            let t0 = Instant::now();
            LocalExec.conv_forward(conv, x, y, t)?;
            best = best.min(t0.elapsed().as_secs_f64());
        }
        self.1.push(best);
        Ok(())
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
    let opt = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let size: usize = opt("--size").map_or(224, |v| v.parse().expect("--size"));
    let batch: usize = opt("--batch").map_or(8, |v| v.parse().expect("--batch"));
    let model = opt("--model").unwrap_or_else(|| "vgg16".into());
    let policy: Option<RankPolicy> = opt("--policy").map(|p| p.parse().expect("--policy"));
    let x = load(&dir, size as u32, batch);
    let classes = if size <= 64 { 10 } else { 1000 };
    let mut net = ModelSpec::parse(&model, 3, classes, size)
        .unwrap()
        .build(1)
        .unwrap();
    let mut cap = Capture(Vec::new(), Vec::new());
    net.forward(&x, false, &mut cap).unwrap();
    let conv_ms = cap.1.clone();
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
        "threads {}; per conv input (batch {batch}): best of 3 {} ms | kept energy %",
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
    println!(" {:>9} {:>9}", if exact { "exact" } else { "" }, "conv ms");
    let mut totals = vec![0f64; methods.len()];
    let (mut lr, mut xu) = (BatchLowRank::default(), Tensor::default());
    for (i, xi) in cap.0.iter().enumerate() {
        let (b, n, h, w) = xi.nchw("x").unwrap();
        let hw = h * w;
        let pol = policy.unwrap_or(RankPolicy::Fixed(schedule_rank(i).min(n)));
        let mut r = 0;
        let total = sum_sq(&xi.data);
        let mut times = Vec::new();
        let mut kept = Vec::new();
        for (k, (_, m)) in methods.iter().enumerate() {
            let mut best = f64::MAX;
            for _ in 0..3 {
                let (t, c0) = (Instant::now(), cpu_time());
                r = decompose_batch_with(xi, pol, i, *m, &mut lr, &mut xu).unwrap();
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
        println!(" {:>9.2}", 1e3 * conv_ms.get(i).copied().unwrap_or(0.0));
        let _ = b;
    }
    print!("{:>20} |", "total ms");
    totals.iter().for_each(|t| print!(" {:>9.1}", t * 1e3));
    println!();
}
