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

/// Timings of one model.
#[derive(Serialize, Debug)]
pub struct BenchResult {
    pub model: String,
    pub mode: String,
    pub batch: usize,
    pub input_size: usize,
    pub threads: usize,
    pub forward_ms_median: f64,
    pub forward_ms_min: f64,
    pub train_ms_median: f64,
    pub train_ms_min: f64,
    pub conv_gflops_forward: f64,
    pub conv_gflops_train: f64,
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

/// Runs `asymml bench`.
pub fn run(a: BenchArgs) -> Result<()> {
    let threads = common::init_threads(a.threads)?;
    let mode: Mode = a.mode.parse()?;
    if mode != Mode::TrustedOnly {
        bail!("bench times --mode trusted-only for now; for the split, `asymml verify` checks correctness");
    }
    if a.steps == 0 || a.batch_size < 2 {
        bail!("--steps must be ≥ 1 and --batch-size ≥ 2");
    }
    let torch = a.torch.as_deref().map(torch_times).transpose()?;
    let mut results = Vec::new();
    for name in &a.models {
        let size = a
            .input_size
            .unwrap_or(if name.ends_with("-imagenet") { 224 } else { 32 });
        let spec = ModelSpec::parse(name, a.channels, a.classes, size)?;
        let net = spec.build(1)?;
        let config = TrainConfig {
            optimizer: OptimizerKind::Sgd {
                momentum: 0.9,
                nesterov: false,
            },
            lr: 1e-3,
            weight_decay: 5e-4,
            schedule: LrSchedule::Constant,
        };
        let mut s = Session::new(net, config, mode);
        let mut rng = Rng::new(7);
        let x = Tensor {
            shape: vec![a.batch_size, a.channels, size, size],
            data: (0..a.batch_size * a.channels * size * size)
                .map(|_| rng.normal())
                .collect(),
        };
        let labels: Vec<usize> = (0..a.batch_size).map(|i| i % a.classes).collect();
        let pb = common::progress(2 * (a.warmup + a.steps) as u64, &spec.name(), a.json);
        let measure = |train: bool, s: &mut Session| -> Result<(Vec<f64>, f64)> {
            let timer = TimedLocal::default();
            s.set_exec(Box::new(timer.clone()));
            let (mut times, mut conv_s, mut conv_f) = (Vec::new(), 0.0, 0.0);
            for i in 0..a.warmup + a.steps {
                let before = timer.get();
                let t = Instant::now();
                if train {
                    s.train_step(&x, &labels, 0, i)?;
                } else {
                    s.predict(&x)?;
                }
                let dt = t.elapsed().as_secs_f64();
                let after = timer.get();
                if i >= a.warmup {
                    times.push(dt * 1e3);
                    conv_s += after.0 - before.0;
                    conv_f += after.1 - before.1;
                }
                pb.inc(1);
            }
            Ok((times, conv_f / conv_s.max(1e-12) / 1e9))
        };
        let (mut fwd, gf_fwd) = measure(false, &mut s)?;
        let (mut trn, gf_trn) = measure(true, &mut s)?;
        pb.finish_and_clear();
        let canonical = spec.name();
        let theirs = torch.as_ref().and_then(|t| {
            t.iter()
                .find(|(m, _, _)| *m == canonical || (*m == *name && spec.style == Style::Cifar))
                .map(|(_, f, tr)| (*f, *tr))
        });
        let (fm, tm) = (median(&mut fwd), median(&mut trn));
        results.push(BenchResult {
            model: canonical,
            mode: mode.to_string(),
            batch: a.batch_size,
            input_size: size,
            threads,
            forward_ms_median: fm,
            forward_ms_min: fwd.iter().cloned().fold(f64::INFINITY, f64::min),
            train_ms_median: tm,
            train_ms_min: trn.iter().cloned().fold(f64::INFINITY, f64::min),
            conv_gflops_forward: gf_fwd,
            conv_gflops_train: gf_trn,
            torch_forward_ratio: theirs.map(|(f, _)| f / fm),
            torch_train_ratio: theirs.map(|(_, t)| t / tm),
        });
    }
    if a.json {
        println!(
            "{}",
            serde_json::json!({ "threads": threads, "results": results })
        );
        return Ok(());
    }
    println!(
        "{:<18} {:>6} {:>12} {:>12} {:>12} {:>12} {:>14} {:>14}",
        "model",
        "batch",
        "fwd ms med",
        "fwd ms min",
        "train ms med",
        "train ms min",
        "conv GF/s fwd",
        "conv GF/s train"
    );
    for r in &results {
        println!(
            "{:<18} {:>6} {:>12.1} {:>12.1} {:>12.1} {:>12.1} {:>14.1} {:>14.1}",
            r.model,
            r.batch,
            r.forward_ms_median,
            r.forward_ms_min,
            r.train_ms_median,
            r.train_ms_min,
            r.conv_gflops_forward,
            r.conv_gflops_train
        );
        if let (Some(f), Some(t)) = (r.torch_forward_ratio, r.torch_train_ratio) {
            println!(
                "{:<18} speed vs PyTorch (its time / ours): forward {f:.2}×, training step {t:.2}×",
                ""
            );
        }
    }
    println!("({threads} thread(s), mode {mode})");
    Ok(())
}
