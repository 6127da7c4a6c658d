//! `asymml bench`: forward and training-step times of VGG/ResNet models, the conv kernels' GFLOP/s, and the
//! ratio to PyTorch's times measured by `tools/bench_torch.py` on the same machine and thread count.

use crate::cli::BenchArgs;
use crate::common;
use anyhow::{bail, Context, Result};
use asymml_core::layers::Conv2d;
use asymml_core::models::{ConvExec, ModelSpec, Style};
use asymml_core::optim::{LrSchedule, OptimizerKind};
use asymml_core::rng::Rng;
use asymml_core::Tensor;
use asymml_trusted::{Mode, Session, TrainConfig};
use serde::Serialize;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Computes convolutions locally and accumulates their time and floating-point operations.
/// The totals are shared with the caller, which reads them between steps.
#[derive(Default, Clone)]
struct TimedLocal {
    totals: Arc<Mutex<(f64, f64)>>,
}

impl TimedLocal {
    fn add(&self, seconds: f64, flops: f64) {
        if let Ok(mut t) = self.totals.lock() {
            t.0 += seconds;
            t.1 += flops;
        }
    }
    fn get(&self) -> (f64, f64) {
        self.totals.lock().map(|t| *t).unwrap_or_default()
    }
}

impl ConvExec for TimedLocal {
    fn conv_forward(
        &mut self,
        conv: &mut Conv2d,
        x: &Tensor,
        y: &mut Tensor,
        _t: bool,
    ) -> asymml_core::Result<()> {
        let t = Instant::now();
        conv.forward(x, y)?;
        self.add(t.elapsed().as_secs_f64(), 2.0 * conv.macs(&x.shape) as f64);
        Ok(())
    }
    fn conv_backward(
        &mut self,
        conv: &mut Conv2d,
        x: &Tensor,
        dy: &Tensor,
        dx: Option<&mut Tensor>,
    ) -> asymml_core::Result<()> {
        let passes = if dx.is_some() { 2.0 } else { 1.0 };
        let t = Instant::now();
        conv.backward(x, dy, dx)?;
        self.add(
            t.elapsed().as_secs_f64(),
            passes * 2.0 * conv.macs(&x.shape) as f64,
        );
        Ok(())
    }
}

/// Timings of one model in one mode.
#[derive(Serialize, Debug)]
pub struct BenchResult {
    pub model: String,
    pub mode: String,
    /// The split's rank policy (empty for trusted-only).
    pub rank: String,
    pub batch: usize,
    pub input_size: usize,
    pub threads: usize,
    pub forward_ms_median: f64,
    pub forward_ms_min: f64,
    pub train_ms_median: f64,
    pub train_ms_min: f64,
    /// The trusted runtime's own time (wall time less the time spent waiting for the accelerator).
    pub trusted_forward_ms_median: f64,
    pub trusted_train_ms_median: f64,
    /// Conv kernels' GFLOP/s (trusted-only, where every conv runs here).
    pub conv_gflops_forward: Option<f64>,
    pub conv_gflops_train: Option<f64>,
    /// Tensor bytes per sample sent to / received from the accelerator in one training step.
    pub train_bytes_to_untrusted_per_sample: f64,
    pub train_bytes_from_untrusted_per_sample: f64,
    /// PyTorch's median time divided by ours (> 1: we are faster), when --torch is given.
    pub torch_forward_ratio: Option<f64>,
    pub torch_train_ratio: Option<f64>,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// PyTorch's medians (ms) per model name from tools/bench_torch.py --json.
fn torch_times(path: &std::path::Path) -> Result<Vec<(String, f64, f64)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not JSON from bench_torch.py", path.display()))?;
    let rows = v["results"].as_array().context("no \"results\" array")?;
    Ok(rows
        .iter()
        .filter_map(|r| {
            Some((
                r["model"].as_str()?.to_string(),
                r["forward_ms_median"].as_f64()?,
                r["train_ms_median"].as_f64()?,
            ))
        })
        .collect())
}

/// What one timed phase measured.
struct Phase {
    wall_ms: Vec<f64>,
    trusted_ms: Vec<f64>,
    gflops: Option<f64>,
    bytes: (f64, f64),
}

/// Runs `asymml bench`.
pub fn run(a: BenchArgs) -> Result<()> {
    let threads = common::init_threads(a.threads)?;
    if a.steps == 0 || a.batch_size < 2 {
        bail!("--steps must be ≥ 1 and --batch-size ≥ 2");
    }
    let modes: Vec<Mode> = a
        .modes
        .iter()
        .map(|m| m.parse())
        .collect::<Result<_, _>>()?;
    let torch = a.torch.as_deref().map(torch_times).transpose()?;
    let mut results = Vec::new();
    let pb = common::progress(
        (a.models.len() * modes.len() * 2 * (a.warmup + a.steps)) as u64,
        "bench",
        a.json,
    );
    for name in &a.models {
        let size = a
            .input_size
            .unwrap_or(if name.ends_with("-imagenet") { 224 } else { 32 });
        let spec = ModelSpec::parse(name, a.channels, a.classes, size)?;
        let mut rng = Rng::new(7);
        let x = Tensor {
            shape: vec![a.batch_size, a.channels, size, size],
            data: (0..a.batch_size * a.channels * size * size)
                .map(|_| rng.normal())
                .collect(),
        };
        let labels: Vec<usize> = (0..a.batch_size).map(|i| i % a.classes).collect();
        for &mode in &modes {
            let config = TrainConfig {
                optimizer: OptimizerKind::Sgd {
                    momentum: 0.9,
                    nesterov: false,
                },
                lr: 1e-3,
                weight_decay: 5e-4,
                schedule: LrSchedule::Constant,
            };
            let mut s = Session::new(spec.build(1)?, config, mode);
            let _accel = common::attach_accelerator(&mut s, &a.split, threads, 1)?;
            let split_stats = s.split_stats();
            let measure = |train: bool, s: &mut Session| -> Result<Phase> {
                let timer = TimedLocal::default();
                if mode == Mode::TrustedOnly {
                    s.set_exec(Box::new(timer.clone()));
                }
                let read = || {
                    split_stats
                        .as_ref()
                        .and_then(|st| st.lock().ok().map(|v| v.clone()))
                        .unwrap_or_default()
                };
                let mut p = Phase {
                    wall_ms: Vec::new(),
                    trusted_ms: Vec::new(),
                    gflops: None,
                    bytes: (0.0, 0.0),
                };
                let (mut conv_s, mut conv_f) = (0.0, 0.0);
                for i in 0..a.warmup + a.steps {
                    let (before, sb, rb) = (timer.get(), read(), s.remote_wait_s().unwrap_or(0.0));
                    let t = Instant::now();
                    if train {
                        s.train_step(&x, &labels, 0, i)?;
                    } else {
                        s.predict(&x)?;
                    }
                    let dt = t.elapsed().as_secs_f64();
                    let (after, sa, ra) = (timer.get(), read(), s.remote_wait_s().unwrap_or(0.0));
                    if i >= a.warmup {
                        p.wall_ms.push(dt * 1e3);
                        p.trusted_ms
                            .push((dt - (sa.wait_s - sb.wait_s) - (ra - rb)) * 1e3);
                        conv_s += after.0 - before.0;
                        conv_f += after.1 - before.1;
                        let per = a.batch_size as f64;
                        p.bytes = (
                            (sa.bytes_to_untrusted - sb.bytes_to_untrusted) as f64 / per,
                            (sa.bytes_from_untrusted - sb.bytes_from_untrusted) as f64 / per,
                        );
                    }
                    pb.inc(1);
                }
                if conv_s > 0.0 {
                    p.gflops = Some(conv_f / conv_s / 1e9);
                }
                Ok(p)
            };
            let mut fwd = measure(false, &mut s)?;
            let mut trn = measure(true, &mut s)?;
            let canonical = spec.name();
            let theirs = torch.as_ref().and_then(|t| {
                t.iter()
                    .find(|(m, _, _)| {
                        *m == canonical || (*m == *name && spec.style == Style::Cifar)
                    })
                    .map(|(_, f, tr)| (*f, *tr))
            });
            let (fm, tm) = (median(&mut fwd.wall_ms), median(&mut trn.wall_ms));
            let min = |v: &[f64]| v.iter().cloned().fold(f64::INFINITY, f64::min);
            results.push(BenchResult {
                model: canonical,
                mode: mode.to_string(),
                rank: if mode == Mode::Split {
                    a.split.rank.clone()
                } else {
                    String::new()
                },
                batch: a.batch_size,
                input_size: size,
                threads,
                forward_ms_median: fm,
                forward_ms_min: min(&fwd.wall_ms),
                train_ms_median: tm,
                train_ms_min: min(&trn.wall_ms),
                trusted_forward_ms_median: median(&mut fwd.trusted_ms),
                trusted_train_ms_median: median(&mut trn.trusted_ms),
                conv_gflops_forward: fwd.gflops,
                conv_gflops_train: trn.gflops,
                train_bytes_to_untrusted_per_sample: trn.bytes.0,
                train_bytes_from_untrusted_per_sample: trn.bytes.1,
                torch_forward_ratio: theirs
                    .filter(|_| mode == Mode::TrustedOnly)
                    .map(|(f, _)| f / fm),
                torch_train_ratio: theirs
                    .filter(|_| mode == Mode::TrustedOnly)
                    .map(|(_, t)| t / tm),
            });
        }
    }
    pb.finish_and_clear();
    if a.json {
        println!(
            "{}",
            serde_json::json!({ "threads": threads, "results": results })
        );
        return Ok(());
    }
    println!(
        "{:<18} {:<13} {:>6} {:>10} {:>11} {:>10} {:>11} {:>9} {:>9} {:>12} {:>12}",
        "model",
        "mode",
        "batch",
        "fwd ms",
        "trusted fwd",
        "train ms",
        "trusted trn",
        "GF/s fwd",
        "GF/s trn",
        "B/sample →",
        "B/sample ←"
    );
    let opt = |v: Option<f64>| v.map_or("-".to_string(), |g| format!("{g:.1}"));
    for r in &results {
        let mode = if r.rank.is_empty() {
            r.mode.clone()
        } else {
            format!("{} {}", r.mode, r.rank)
        };
        println!(
            "{:<18} {:<13} {:>6} {:>10.1} {:>11.1} {:>10.1} {:>11.1} {:>9} {:>9} {:>12.0} {:>12.0}",
            r.model,
            mode,
            r.batch,
            r.forward_ms_median,
            r.trusted_forward_ms_median,
            r.train_ms_median,
            r.trusted_train_ms_median,
            opt(r.conv_gflops_forward),
            opt(r.conv_gflops_train),
            r.train_bytes_to_untrusted_per_sample,
            r.train_bytes_from_untrusted_per_sample
        );
        if let (Some(f), Some(t)) = (r.torch_forward_ratio, r.torch_train_ratio) {
            println!(
                "{:<18} speed vs PyTorch (its time / ours): forward {f:.2}×, training step {t:.2}×",
                ""
            );
        }
    }
    println!("({threads} trusted thread(s); times are medians)");
    Ok(())
}
