//! Measures the GEMM rate on the shapes convolutions produce (a tuning aid, not a test).
use asymml_core::gemm::{sgemm, Mat};
use std::time::Instant;

fn rate(m: usize, n: usize, k: usize, threads: usize, ta: bool, tb: bool) -> f64 {
    let a = vec![1.0f32; m * k];
    let b = vec![1.0f32; k * n];
    let mut c = vec![0.0f32; m * n];
    let am = if ta { Mat::rm_t(&a, m) } else { Mat::rm(&a, k) };
    let bm = if tb { Mat::rm_t(&b, k) } else { Mat::rm(&b, n) };
    sgemm(m, n, k, am, bm, &mut c, false, threads);
    let reps = (2e9 / (2.0 * (m * n * k) as f64)).max(3.0) as usize;
    let t = Instant::now();
    for _ in 0..reps {
        sgemm(m, n, k, am, bm, &mut c, false, threads);
    }
    2.0 * (m * n * k * reps) as f64 / t.elapsed().as_secs_f64() / 1e9
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
    for &(m, n, k) in &[
        (1024, 1024, 1024),
        (64, 1024, 576),
        (64, 1024 * 16, 576),
        (128, 256, 1152),
        (256, 64, 2304),
        (512, 16, 4608),
        (512, 16 * 32, 4608),
        (576, 1024, 64),
        (64, 576, 1024),
    ] {
        println!(
            "m {m:>5} n {n:>6} k {k:>5}: NN {:6.1}  TN {:6.1}  NT {:6.1} GFLOP/s",
            rate(m, n, k, threads, false, false),
            rate(m, n, k, threads, true, false),
            rate(m, n, k, threads, false, true)
        );
    }
}
