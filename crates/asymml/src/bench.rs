//! `asymml bench`: step times of VGG/ResNet models in trusted-only, split and untrusted-only mode, where the
//! time goes (the trusted runtime, the accelerator, the boundary), FLOPs, bytes, peak memory, a per-layer
//! breakdown, and the ratio to PyTorch's times measured by `tools/bench_torch.py` on the same machine.

use crate::accelerator::AcceleratorHandle;
use crate::cli::BenchArgs;
use crate::setup::{self, SplitSetup};
use crate::values::{check_batch_bytes, AcceleratorSpec, ModelName, Phase, RankArg, RouteChoice};
use crate::{progress, threads};
use anyhow::{anyhow, bail, Context, Result};
use asymml_core::decomp::RankPolicy;
use asymml_core::layers::Conv2d;
use asymml_core::models::{ConvExec, ModelSpec, Style};
use asymml_core::optim::{LrSchedule, OptimizerKind};
use asymml_core::rng::Rng;
use asymml_core::Tensor;
use asymml_trusted::split::{Basis, RouteCheck, SplitStats};
use asymml_trusted::{Mode, Session, TrainConfig};
use indicatif::ProgressBar;
use serde::Serialize;
use std::path::Path;
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

/// One conv layer's share of a split step (means per step).
#[derive(Serialize, Debug, Clone, Default)]
pub(crate) struct LayerRow {
    pub(crate) layer: usize,
    pub(crate) name: String,
    pub(crate) rank: usize,
    /// The conv ran wholly in the trusted runtime (its rank keeps every channel, or a table says so).
    pub(crate) trusted_route: bool,
    /// The split took one basis for the batch (`--basis shared`, or `auto` where it measured cheaper).
    pub(crate) shared_basis: bool,
    pub(crate) trusted_s: f64,
    /// Of `trusted_s`: the decomposition (lightweight SVD, residual, noise) and the merge Y_T + Y_U; the
    /// rest is Conv_T (and ∇W_T in training).
    pub(crate) decompose_s: f64,
    pub(crate) merge_s: f64,
    /// Of `trusted_s`: the integrity checks of this layer's results (Y_U, ∇X, ∇W_U).
    pub(crate) integrity_s: f64,
    pub(crate) untrusted_s: Option<f64>,
    pub(crate) transfer_s: f64,
    pub(crate) wait_s: f64,
    pub(crate) bytes_to_untrusted: f64,
    pub(crate) bytes_from_untrusted: f64,
    pub(crate) trusted_flops: f64,
    pub(crate) untrusted_flops: f64,
}

/// One top-level node of the network (a layer, or a whole residual block): its time in the trusted
/// runtime per step, waits on the accelerator included.
#[derive(Serialize, Debug, Clone, Default)]
pub(crate) struct NodeRow {
    pub(crate) name: String,
    /// conv, batchnorm, relu, maxpool, avgpool, linear, dropout, flatten, block.
    pub(crate) kind: String,
    pub(crate) forward_s: f64,
    pub(crate) backward_s: f64,
}

/// Timings of one model, phase, mode and rank policy.
#[derive(Serialize, Debug, Clone)]
pub(crate) struct BenchResult {
    pub(crate) model: String,
    /// `infer` (a forward pass in evaluation mode) or `train` (forward, loss, backward, optimizer step).
    pub(crate) phase: String,
    pub(crate) mode: String,
    /// The split's rank policy (empty otherwise).
    pub(crate) rank: String,
    /// The split's decomposition (`--svd`: `block`, `light`, …; empty otherwise).
    pub(crate) svd: String,
    /// The split's `--route` (`auto`, `auto-wall` or `split`; empty otherwise).
    pub(crate) route: String,
    /// The split's parts per batch in each conv's forward (`--micro-batches`; 1 otherwise).
    pub(crate) micro_batches: usize,
    /// The timed inference forwards streamed their parts through the network (each part's next conv begun
    /// while the accelerator works on the others), not conv by conv.
    pub(crate) streamed: bool,
    /// The split's training backward was pipelined (∇X first, ∇W_U taken at the next split conv; false with
    /// `--no-pipelined-backward`, and outside the split).
    pub(crate) pipelined_backward: bool,
    /// The split's accelerator computed only while the trusted runtime waited (`--lockstep`).
    pub(crate) lockstep: bool,
    /// The runs were timed step by step in turn (`--interleave`); the peaks are then null.
    pub(crate) interleaved: bool,
    pub(crate) batch: usize,
    pub(crate) input_size: usize,
    pub(crate) trusted_threads: usize,
    pub(crate) accelerator_threads: Option<usize>,
    /// Wall time per step: median and minimum.
    pub(crate) median_s: f64,
    pub(crate) min_s: f64,
    /// The trusted runtime's own time per step (median): wall time less the time blocked on the accelerator.
    pub(crate) trusted_s: f64,
    /// The accelerator's compute time per step (median; in-process accelerator only).
    pub(crate) untrusted_s: Option<f64>,
    /// Encoding, sending and decoding messages per step (part of `trusted_s`).
    pub(crate) transfer_s: f64,
    /// Blocked waiting for the accelerator per step.
    pub(crate) wait_s: f64,
    /// Of `untrusted_s`, an in-process GPU accelerator's host↔device copies (through pinned buffers) and its
    /// kernels per step (medians; `None` on the CPU).
    pub(crate) device_copy_s: Option<f64>,
    pub(crate) device_kernel_s: Option<f64>,
    /// The trusted runtime's convolution work per step (part of `trusted_s`): the conv kernels in
    /// trusted-only mode; decomposition, Conv_T, merging and transfer in split mode (0 in untrusted-only).
    pub(crate) conv_s: f64,
    /// The rest of the trusted runtime's time per step: BatchNorm, ReLU, pooling, the classifier, the loss
    /// and the optimizer (`trusted_s − conv_s`).
    pub(crate) other_s: f64,
    /// Of `conv_s`, split mode: the integrity (Freivalds) checks of the accelerator's results per step
    /// (median; 0 with `--integrity off` and in the other modes, whose results need no check).
    pub(crate) integrity_s: f64,
    /// Time per step during which both sides computed: trusted_s + untrusted_s − median_s (in-process
    /// accelerator; 0 when they ran one after the other).
    pub(crate) overlap_s: Option<f64>,
    pub(crate) bytes_to_untrusted: f64,
    pub(crate) bytes_from_untrusted: f64,
    /// Convolution FLOPs per step on each side: all convs in trusted-only; the lightweight SVD and Conv_T
    /// (trusted) and the convs of X_U (untrusted) in split; all convs on the accelerator in untrusted-only.
    pub(crate) trusted_flops: f64,
    pub(crate) untrusted_flops: f64,
    /// Peak heap bytes of the trusted runtime and of the in-process accelerator during the run. The frames
    /// that cross the boundary are counted apart (in a TEE they are untrusted memory): `frames_peak_bytes`.
    pub(crate) trusted_peak_bytes: Option<u64>,
    pub(crate) accelerator_peak_bytes: Option<u64>,
    pub(crate) frames_peak_bytes: Option<u64>,
    /// Conv kernels' GFLOP/s (trusted-only).
    pub(crate) conv_gflops: Option<f64>,
    /// Split: trusted-only's trusted time over this one's (the paper's speedup of the TEE), trusted-only's
    /// wall time over this one's, and this wall time over untrusted-only's.
    pub(crate) trusted_speedup: Option<f64>,
    pub(crate) wall_speedup: Option<f64>,
    pub(crate) slowdown_vs_untrusted_only: Option<f64>,
    /// Split: trusted-only's conv FLOPs over this one's trusted FLOPs (the bound on `trusted_speedup` from
    /// arithmetic alone).
    pub(crate) flop_bound: Option<f64>,
    /// Split: the bound on `trusted_speedup` given this run's `other_s`: trusted-only's trusted time over
    /// (`other_s` + trusted-only's `conv_s` / `flop_bound`), i.e. if the split's conv work ran at the
    /// trusted-only convolutions' FLOP rate and transferred nothing.
    pub(crate) time_bound: Option<f64>,
    /// PyTorch's median time divided by ours (> 1: we are faster), trusted-only with --torch.
    pub(crate) torch_ratio: Option<f64>,
    /// Split with `--route auto`/`auto-wall`, per round (`--repeat`): the check of the whole step at the last
    /// timed step — the median trusted time of the last steps with the convs' settled routes and with every
    /// conv trusted, and whether every conv then took the trusted route.
    pub(crate) route_check: Vec<RouteCheck>,
    /// Split: per conv layer.
    pub(crate) layers: Vec<LayerRow>,
    /// Every top-level node's trusted time (per step; empty in untrusted-only mode).
    pub(crate) nodes: Vec<NodeRow>,
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// PyTorch's times from `tools/bench_torch.py --json`: the settings it ran at and its medians per model.
#[derive(Debug)]
struct TorchRef {
    threads: usize,
    batch: usize,
    /// (model, input size, forward ms, train ms).
    rows: Vec<(String, usize, f64, f64)>,
}

/// The channels and classes of `tools/bench_torch.py`'s models (RGB, `NUM_CLASSES`).
const TORCH_CHANNELS: usize = 3;
const TORCH_CLASSES: usize = 10;

impl TorchRef {
    /// Parses `text`, the output of `tools/bench_torch.py --json` (`what` names it in errors).
    fn parse(text: &str, what: &str) -> Result<Self> {
        let v: serde_json::Value = serde_json::from_str(text)
            .with_context(|| format!("{what}: not JSON from tools/bench_torch.py --json"))?;
        let count = |key: &str| {
            v[key]
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .with_context(|| {
                    format!("{what}: no \"{key}\" count (not from tools/bench_torch.py --json?)")
                })
        };
        let (threads, batch) = (count("threads")?, count("batch")?);
        let rows = v["results"]
            .as_array()
            .with_context(|| format!("{what}: no \"results\" array"))?
            .iter()
            .map(|r| {
                let ms = |key: &str| r[key].as_f64().filter(|t| t.is_finite() && *t > 0.0);
                Some((
                    r["model"].as_str()?.to_string(),
                    usize::try_from(r["input_size"].as_u64()?).ok()?,
                    ms("forward_ms_median")?,
                    ms("train_ms_median")?,
                ))
            })
            .collect::<Option<Vec<_>>>()
            .with_context(|| {
                format!("{what}: a result lacks its model, input_size or a positive median time")
            })?;
        Ok(TorchRef {
            threads,
            batch,
            rows,
        })
    }

    /// Refuses a comparison of different work: PyTorch's run must have had `bench`'s batch, thread count,
    /// channels and classes, and a row for every model at its input size.
    fn check(&self, a: &BenchArgs, threads: usize, what: &str) -> Result<()> {
        let differ = |name: &str, theirs: usize, ours: usize, flag: &str| {
            anyhow!(
                "{what} was measured with {name} {theirs}, this bench runs {ours} ({flag}): the ratio would \
                 compare different work; run tools/bench_torch.py with the same setting"
            )
        };
        if self.batch != a.batch_size {
            return Err(differ("batch", self.batch, a.batch_size, "--batch-size"));
        }
        if self.threads != threads {
            return Err(differ(
                "threads",
                self.threads,
                threads,
                "--trusted-threads",
            ));
        }
        if (a.channels, a.classes) != (TORCH_CHANNELS, TORCH_CLASSES) {
            bail!(
                "{what}: tools/bench_torch.py times {TORCH_CHANNELS}-channel models with {TORCH_CLASSES} \
                 classes; this bench has --channels {} and --classes {}",
                a.channels,
                a.classes
            );
        }
        for name in &a.models {
            let size = input_size(a, name);
            let spec = name.spec(a.channels, a.classes, size)?;
            if self.times(name.as_str(), &spec).is_none() {
                bail!(
                    "{what} has no row for {name} at {size} px: run tools/bench_torch.py --models {name} \
                     --input-size {size}",
                    name = name.as_str()
                );
            }
        }
        Ok(())
    }

    /// PyTorch's (forward ms, train ms) for `spec` (its rows name CIFAR models with the suffix, which
    /// `spec.name()` leaves out, so the name as given counts too).
    fn times(&self, name: &str, spec: &ModelSpec) -> Option<(f64, f64)> {
        let canonical = spec.name();
        self.rows
            .iter()
            .find(|(m, size, _, _)| {
                *size == spec.input_size
                    && (*m == canonical || (*m == name && spec.style == Style::Cifar))
            })
            .map(|&(_, _, f, t)| (f, t))
    }
}

/// Counters read before and after each step.
#[derive(Clone, Default)]
struct Snapshot {
    conv: (f64, f64),
    split: SplitStats,
    remote_wait: f64,
    accel: Option<crate::accelerator::ServiceTimes>,
}

/// Per-step differences of the layer counters, summed over the timed steps.
fn add_layers(sum: &mut Vec<LayerRow>, before: &Snapshot, after: &Snapshot) {
    let layers = &after.split.layers;
    if sum.len() < layers.len() {
        sum.resize_with(layers.len(), LayerRow::default);
    }
    for (i, l) in layers.iter().enumerate() {
        let b = before.split.layers.get(i).cloned().unwrap_or_default();
        let row = &mut sum[i];
        row.layer = i;
        row.name.clone_from(&l.name);
        row.rank = l.rank;
        row.trusted_route = l.trusted_route;
        row.shared_basis = l.shared_basis;
        row.trusted_s += l.trusted_s - b.trusted_s;
        row.decompose_s += l.decompose_s - b.decompose_s;
        row.merge_s += l.merge_s - b.merge_s;
        row.integrity_s += l.integrity_s - b.integrity_s;
        row.transfer_s += l.transfer_s - b.transfer_s;
        row.wait_s += l.wait_s - b.wait_s;
        row.bytes_to_untrusted += (l.bytes_to - b.bytes_to) as f64;
        row.bytes_from_untrusted += (l.bytes_from - b.bytes_from) as f64;
        row.trusted_flops += l.trusted_flops - b.trusted_flops;
        row.untrusted_flops += l.untrusted_flops - b.untrusted_flops;
        if let (Some(ta), Some(tb)) = (&after.accel, &before.accel) {
            let d = ta.layer_s(i) - tb.layer_s(i);
            row.untrusted_s = Some(row.untrusted_s.unwrap_or(0.0) + d);
        }
    }
}

/// The batch to time: random normal noise, or with `--images` real images repeated to fill the batch.
fn bench_input(a: &BenchArgs, size: usize) -> Result<Tensor> {
    let (b, c) = (a.batch_size, a.channels);
    let per = c * size * size;
    let Some(path) = &a.images else {
        let mut rng = Rng::new(7);
        return Ok(Tensor {
            shape: vec![b, c, size, size],
            data: (0..b * per).map(|_| rng.normal()).collect(),
        });
    };
    let (mean, std) = match c {
        3 => (vec![0.485, 0.456, 0.406], vec![0.229, 0.224, 0.225]),
        1 => (vec![0.5], vec![0.25]),
        _ => bail!("--images needs --channels 1 (grey) or 3 (RGB), not {c}"),
    };
    let files = crate::data::list_images(path)?;
    let mut images = Vec::with_capacity(files.len().min(b));
    for f in files.iter().take(b) {
        images.push(crate::data::load_image(f, c, size)?);
    }
    let mut x = Tensor::zeros(&[b, c, size, size]);
    for (i, dst) in x.data.chunks_mut(per).enumerate() {
        crate::data::normalize_into(&images[i % images.len()], &mean, &std, dst);
    }
    Ok(x)
}

/// The input size of `name`: `--input-size`, else 224 for -imagenet models and 32 for the others.
fn input_size(a: &BenchArgs, name: &ModelName) -> usize {
    a.input_size
        .unwrap_or(if name.as_str().ends_with("-imagenet") {
            224
        } else {
            32
        })
}

/// What `bench` times: for every model and phase, one run per mode — in split mode, one per rank policy.
struct Plan {
    threads: usize,
    accel_threads: usize,
    /// (mode, rank policy): the policy only in split mode.
    runs: Vec<(Mode, Option<RankArg>)>,
    /// PyTorch's times from `--torch`.
    torch: Option<TorchRef>,
}

impl Plan {
    fn new(a: &BenchArgs, threads: usize) -> Result<Self> {
        if a.batch_size < 2 {
            bail!("--batch-size must be at least 2 (BatchNorm needs batch statistics)");
        }
        // Every model's batch is checked against the memory limit before any is timed.
        for name in &a.models {
            let size = input_size(a, name);
            let spec = name.spec(a.channels, a.classes, size)?;
            check_batch_bytes(a.batch_size, a.channels, spec.width, size)?;
        }
        let torch = match a.torch.as_deref() {
            Some(path) => {
                let what = path.display().to_string();
                let text =
                    std::fs::read_to_string(path).with_context(|| format!("reading {what}"))?;
                let torch = TorchRef::parse(&text, &what)?;
                torch.check(a, threads, &what)?;
                Some(torch)
            }
            None => None,
        };
        let mut runs = Vec::new();
        for &m in &a.modes {
            if m == Mode::Split {
                runs.extend(a.split.rank.iter().map(|r| (m, Some(r.clone()))));
            } else {
                runs.push((m, None));
            }
        }
        Ok(Plan {
            threads,
            accel_threads: a.split.accelerator_threads.unwrap_or(threads),
            runs,
            torch,
        })
    }

    /// Times every model, phase and run.
    fn measure_all(&self, a: &BenchArgs) -> Result<Vec<BenchResult>> {
        let mut results = Vec::new();
        let pb = self.bar(a, a.models.len());
        for name in &a.models {
            let size = input_size(a, name);
            let spec = name.spec(a.channels, a.classes, size)?;
            let x = bench_input(a, size)?;
            let labels: Vec<usize> = (0..a.batch_size).map(|i| i % a.classes).collect();
            for &phase in &a.phase {
                let cases = self.cases(&spec, phase, &x, &labels, None);
                let torch_ms = self.torch_ms(name.as_str(), &spec, phase);
                results.extend(self.measure_rounds(a, &cases, &pb, torch_ms)?);
            }
        }
        pb.finish_and_clear();
        Ok(results)
    }

    /// The progress bar of `models` models' runs, phases, rounds and steps.
    fn bar(&self, a: &BenchArgs, models: usize) -> ProgressBar {
        let steps = models * self.runs.len() * a.phase.len() * a.repeat * (a.warmup + a.steps);
        progress::bar(steps as u64, "bench", a.json)
    }

    /// One case per run of the plan, for `spec` in `phase`.
    fn cases<'a>(
        &'a self,
        spec: &'a ModelSpec,
        phase: Phase,
        x: &'a Tensor,
        labels: &'a [usize],
        net: Option<NetBuilder<'a>>,
    ) -> Vec<Case<'a>> {
        self.runs
            .iter()
            .map(|(mode, rank)| Case {
                spec,
                phase,
                mode: *mode,
                rank: rank.as_ref(),
                x,
                labels,
                net,
            })
            .collect()
    }

    /// Times `cases` (one model and phase) in `a.repeat` rounds, each round timing every case in turn, and gives
    /// each case's row over all its rounds' steps (peak memory: the largest of its rounds). Round k starts at
    /// case k mod n (A B C, B C A, C A B, …): on this kind of machine the first case of a round ran a few per
    /// cent faster than the same code later in it (VGG16 at 32 px: a split whose every conv took the trusted
    /// route timed 0.97× trusted-only after it, 1.00× before it), so over n rounds each case has each place
    /// once.
    fn measure_rounds(
        &self,
        a: &BenchArgs,
        cases: &[Case<'_>],
        pb: &ProgressBar,
        torch_ms: Option<f64>,
    ) -> Result<Vec<BenchResult>> {
        let mut acc: Vec<(Samples, Vec<NodeRow>, Peaks)> = (0..cases.len())
            .map(|_| (Samples::default(), Vec::new(), Peaks::none()))
            .collect();
        for round in 0..a.repeat {
            let of = if a.repeat > 1 {
                format!(" (round {}/{})", round + 1, a.repeat)
            } else {
                String::new()
            };
            if a.interleave {
                let order: Vec<usize> = round_order(cases.len(), round).collect();
                self.interleaved_round(a, cases, &order, pb, &mut acc, &of)?;
                continue;
            }
            for i in round_order(cases.len(), round) {
                let case = &cases[i];
                pb.set_message(case.label(&of));
                let (samples, nodes, peaks) = &mut acc[i];
                let (n, p) = self.measure(a, case, pb, samples)?;
                add_nodes(nodes, n);
                peaks.keep_larger(p);
            }
        }
        let steps = (a.steps * a.repeat) as f64;
        Ok(cases
            .iter()
            .zip(acc)
            .map(|(case, (mut samples, mut nodes, peaks))| {
                samples.per_step(steps, case.mode);
                for n in &mut nodes {
                    n.forward_s /= steps;
                    n.backward_s /= steps;
                }
                let torch = torch_ms.filter(|_| case.net.is_none());
                samples.result(a, self, case, nodes, peaks, torch)
            })
            .collect())
    }

    /// PyTorch's median for `spec` in `phase`.
    fn torch_ms(&self, name: &str, spec: &ModelSpec, phase: Phase) -> Option<f64> {
        let (forward, train) = self.torch.as_ref()?.times(name, spec)?;
        Some(match phase {
            Phase::Train => train,
            Phase::Infer => forward,
        })
    }

    /// Times one case: a fresh session (and accelerator), the warm-up steps, then the timed steps, added to
    /// `samples`; gives the nodes' times summed over the timed steps, and the peaks.
    fn measure(
        &self,
        a: &BenchArgs,
        case: &Case<'_>,
        pb: &ProgressBar,
        samples: &mut Samples,
    ) -> Result<(Vec<NodeRow>, Peaks)> {
        crate::alloc::reset_peak();
        let mut run = self.open(a, case)?;
        while !run.done() {
            run.step(pb, samples)?;
        }
        let nodes = run.finish(samples);
        Ok((nodes, Peaks::read()))
    }

    /// One round of `--interleave`: every case opened (in `order`) and its untimed steps run, one case after
    /// another; then the timed steps by [`interleaved_steps`]; then every case's nodes added to its row.
    /// Peaks are not read: every case's session is alive at once.
    fn interleaved_round(
        &self,
        a: &BenchArgs,
        cases: &[Case<'_>],
        order: &[usize],
        pb: &ProgressBar,
        acc: &mut [(Samples, Vec<NodeRow>, Peaks)],
        of: &str,
    ) -> Result<()> {
        let mut runs = Vec::new();
        for &i in order {
            let case = &cases[i];
            pb.set_message(format!("{}, warm-up", case.label(of)));
            let mut run = self.open(a, case)?;
            while run.untimed() {
                run.step(pb, &mut acc[i].0)?;
            }
            runs.push((i, run));
        }
        if let Some(case) = cases.first() {
            pb.set_message(format!(
                "{} {} interleaved{of}",
                case.spec.name(),
                case.phase.name()
            ));
        }
        for j in interleaved_steps(runs.len(), a.steps) {
            let (i, run) = &mut runs[j];
            run.step(pb, &mut acc[*i].0)?;
        }
        for (i, run) in runs {
            let nodes = run.finish(&mut acc[i].0);
            add_nodes(&mut acc[i].1, nodes);
        }
        Ok(())
    }

    /// A case ready to step: a fresh session (and accelerator) with its counters attached.
    fn open<'c>(&self, a: &BenchArgs, case: &'c Case<'c>) -> Result<Running<'c>> {
        let config = TrainConfig {
            optimizer: OptimizerKind::Sgd {
                momentum: 0.9,
                nesterov: false,
            },
            lr: 1e-3,
            weight_decay: 5e-4,
            schedule: LrSchedule::Constant,
        };
        let net = match case.net {
            Some(build) => build()?,
            None => case.spec.build(1)?,
        };
        let mut s = Session::new(net, config, case.mode);
        let policy = case.rank.map_or(RankPolicy::Schedule, |r| r.policy);
        let mut split = SplitSetup::with_policy(&a.split, policy, self.threads, 1)?;
        split.lockstep = a.lockstep && case.mode == Mode::Split;
        if let Some(r) = case.rank {
            r.apply(&mut split.config);
        }
        let accel = setup::attach_accelerator(&mut s, &split)?;
        let probes = Probes::attach(&mut s, accel.as_ref(), case.mode);
        // Untrusted-only: every conv on the accelerator, forward, and in training ∇W and ∇X.
        let untrusted_only_flops = (case.mode == Mode::UntrustedOnly).then(|| {
            let f = 2.0 * s.net.conv_macs(a.batch_size) as f64;
            match case.phase {
                Phase::Train => 3.0 * f,
                Phase::Infer => f,
            }
        });
        // With `--route auto` (and `--basis auto`), the steps that try the routes (and bases) of every conv come
        // first, untimed (and not counted by the progress bar): the timed steps show what it settles on.
        let probe = if case.mode == Mode::Split {
            split.config.probe_steps()
        } else {
            0
        };
        Ok(Running {
            case,
            s,
            accel,
            probes,
            untrusted_only_flops,
            probe,
            warmup: a.warmup + probe,
            steps: a.steps,
            i: 0,
        })
    }
}

/// A case being timed (see [`Plan::open`]): its session, accelerator and counters, and its steps so far.
struct Running<'c> {
    case: &'c Case<'c>,
    s: Session,
    accel: Option<AcceleratorHandle>,
    probes: Probes,
    untrusted_only_flops: Option<f64>,
    /// The untimed steps: the probe steps (not counted by the progress bar) and then the warm-up.
    probe: usize,
    warmup: usize,
    /// Timed steps.
    steps: usize,
    /// Steps run.
    i: usize,
}

impl Running<'_> {
    /// Whether the next step is untimed (a probe or warm-up step).
    fn untimed(&self) -> bool {
        self.i < self.warmup
    }

    /// Whether every step has run.
    fn done(&self) -> bool {
        self.i >= self.warmup + self.steps
    }

    /// Runs the next step; a timed one is added to `samples`.
    fn step(&mut self, pb: &ProgressBar, samples: &mut Samples) -> Result<()> {
        let i = self.i;
        if i == self.warmup {
            // Node times from here on: the timed steps only.
            self.s.net.set_profiling(true);
        }
        let before = self.probes.read(&self.s);
        let t = Instant::now();
        match self.case.phase {
            Phase::Train => {
                self.s.train_step(self.case.x, self.case.labels, 0, i)?;
            }
            Phase::Infer => {
                self.s.predict(self.case.x)?;
            }
        }
        let dt = t.elapsed().as_secs_f64();
        let after = self.probes.read(&self.s);
        if i >= self.probe {
            pb.inc(1);
        }
        if i >= self.warmup {
            samples.add(dt, &before, &after, self.untrusted_only_flops);
        }
        self.i += 1;
        Ok(())
    }

    /// The round's end: the check of the whole step added to `samples`; the nodes' times over the timed steps.
    /// The session goes, then its accelerator.
    fn finish(self, samples: &mut Samples) -> Vec<NodeRow> {
        samples
            .route_checks
            .push(self.probes.read(&self.s).split.route_check);
        let nodes = node_rows(&self.s, self.case.mode);
        let Running { s, accel, .. } = self;
        drop(s);
        drop(accel);
        nodes
    }
}

/// `--interleave`'s timed steps of `n` cases, as case indices: step k of every case, from case k mod n on,
/// before step k + 1 of any (so no case always follows the same one).
fn interleaved_steps(n: usize, steps: usize) -> impl Iterator<Item = usize> {
    (0..steps).flat_map(move |k| round_order(n, k))
}

/// The order in which round `round` times `n` cases: from case `round mod n` on, wrapping around.
fn round_order(n: usize, round: usize) -> impl Iterator<Item = usize> {
    let first = if n == 0 { 0 } else { round % n };
    (0..n).map(move |k| (first + k) % n)
}

/// One timed case: a model's input batch, the phase, the mode and (in split mode) the rank policy.
struct Case<'a> {
    spec: &'a ModelSpec,
    phase: Phase,
    mode: Mode,
    rank: Option<&'a RankArg>,
    x: &'a Tensor,
    labels: &'a [usize],
    /// Builds the network to time (`privacy --frontier`: the privacy run's weights); `None`: fresh weights.
    net: Option<NetBuilder<'a>>,
}

impl Case<'_> {
    /// The progress bar's words for this case: model, phase, mode, rank policy, and `of` (the round).
    fn label(&self, of: &str) -> String {
        let rank_text = self.rank.map_or("", |r| r.text.as_str());
        format!(
            "{} {} {} {rank_text}{of}",
            self.spec.name(),
            self.phase.name(),
            self.mode
        )
    }
}

/// Builds the network a case is timed on.
pub(crate) type NetBuilder<'a> = &'a dyn Fn() -> Result<asymml_core::models::Net>;

/// The counters a step is measured with: the local conv timer (trusted-only), the split's statistics and the
/// in-process accelerator's compute time.
struct Probes {
    timer: TimedLocal,
    split: Option<Arc<Mutex<SplitStats>>>,
    accel: Option<Arc<Mutex<crate::accelerator::ServiceTimes>>>,
}

impl Probes {
    /// The session's counters; in trusted-only mode its convolutions are timed locally from now on.
    fn attach(s: &mut Session, accel: Option<&AcceleratorHandle>, mode: Mode) -> Self {
        let probes = Probes {
            timer: TimedLocal::default(),
            split: s.split_stats(),
            accel: accel.and_then(|h| h.times()),
        };
        if mode == Mode::TrustedOnly {
            s.set_exec(Box::new(probes.timer.clone()));
        }
        probes
    }

    fn read(&self, s: &Session) -> Snapshot {
        Snapshot {
            conv: self.timer.get(),
            split: self
                .split
                .as_ref()
                .and_then(|st| st.lock().ok().map(|v| v.clone()))
                .unwrap_or_default(),
            remote_wait: s.remote_wait_s().unwrap_or(0.0),
            accel: self
                .accel
                .as_ref()
                .and_then(|t| t.lock().ok().map(|v| v.clone())),
        }
    }
}

/// Peak heap bytes of the trusted runtime and of the in-process accelerator (`None` without the counting
/// allocator).
struct Peaks {
    trusted: Option<u64>,
    accelerator: Option<u64>,
    frames: Option<u64>,
}

impl Peaks {
    fn none() -> Self {
        Peaks {
            trusted: None,
            accelerator: None,
            frames: None,
        }
    }

    /// Keeps, per side, the larger of these peaks and `other`'s.
    fn keep_larger(&mut self, other: Peaks) {
        let max = |a: Option<u64>, b: Option<u64>| a.max(b);
        self.trusted = max(self.trusted, other.trusted);
        self.accelerator = max(self.accelerator, other.accelerator);
        self.frames = max(self.frames, other.frames);
    }

    fn read() -> Self {
        let installed = crate::alloc::installed();
        let peak = |d| installed.then(|| crate::alloc::peak(d) as u64);
        Peaks {
            trusted: peak(crate::alloc::Domain::Trusted),
            accelerator: peak(crate::alloc::Domain::Accelerator),
            frames: peak(crate::alloc::Domain::Frames),
        }
    }
}

/// Adds a round's node times to those of the rounds before (the same nodes, in order).
fn add_nodes(acc: &mut Vec<NodeRow>, round: Vec<NodeRow>) {
    if acc.is_empty() {
        *acc = round;
        return;
    }
    for (a, r) in acc.iter_mut().zip(round) {
        a.forward_s += r.forward_s;
        a.backward_s += r.backward_s;
    }
}

/// Every top-level node's trusted time summed over the timed steps (none in untrusted-only mode: the whole
/// network runs on the accelerator).
fn node_rows(s: &Session, mode: Mode) -> Vec<NodeRow> {
    let node_times = s.net.node_times().filter(|_| mode != Mode::UntrustedOnly);
    s.net
        .nodes
        .iter()
        .zip(node_times.unwrap_or_default())
        .map(|(n, t)| NodeRow {
            name: n.name.clone(),
            kind: n.layer.kind().into(),
            forward_s: t.forward_s,
            backward_s: t.backward_s,
        })
        .collect()
}

/// The timed steps' measurements.
#[derive(Default)]
struct Samples {
    wall: Vec<f64>,
    trusted: Vec<f64>,
    untrusted: Vec<f64>,
    /// A GPU accelerator's copy and kernel seconds per step.
    device_copy: Vec<f64>,
    device_kernel: Vec<f64>,
    transfer: Vec<f64>,
    wait: Vec<f64>,
    /// The trusted runtime's conv work per step: local conv kernels, the split's trusted conv time, transfer.
    conv_own: Vec<f64>,
    /// The split's integrity checks per step (part of `conv_own`).
    integrity: Vec<f64>,
    /// Local conv kernels: seconds and FLOPs in all.
    conv_s: f64,
    conv_f: f64,
    /// Bytes to and from the accelerator, and conv FLOPs on each side, of the last step.
    bytes: (f64, f64),
    flops: (f64, f64),
    layers: Vec<LayerRow>,
    /// Some timed step was a streamed forward.
    streamed: bool,
    /// Per round, the check of the whole step after its last timed step (`--route auto`).
    route_checks: Vec<RouteCheck>,
}

impl Samples {
    /// One timed step of `dt` seconds between two readings of the counters.
    fn add(
        &mut self,
        dt: f64,
        before: &Snapshot,
        after: &Snapshot,
        untrusted_only_flops: Option<f64>,
    ) {
        let w =
            (after.split.wait_s - before.split.wait_s) + (after.remote_wait - before.remote_wait);
        let transfer = after.split.transfer_s - before.split.transfer_s;
        self.streamed |= after.split.streamed_forwards > before.split.streamed_forwards;
        self.wall.push(dt);
        self.trusted.push(dt - w);
        self.wait.push(w);
        self.transfer.push(transfer);
        self.integrity
            .push(after.split.integrity.seconds - before.split.integrity.seconds);
        if let (Some(ta), Some(tb)) = (&after.accel, &before.accel) {
            self.untrusted.push(ta.total_s - tb.total_s);
            if let (Some(da), Some(db)) = (ta.device, tb.device) {
                self.device_copy.push(da.copy_s - db.copy_s);
                self.device_kernel.push(da.kernel_s - db.kernel_s);
            }
        }
        let split_conv = after.split.layers.iter().map(|l| l.trusted_s).sum::<f64>()
            - before.split.layers.iter().map(|l| l.trusted_s).sum::<f64>();
        self.conv_own
            .push(after.conv.0 - before.conv.0 + split_conv + transfer);
        self.conv_s += after.conv.0 - before.conv.0;
        self.conv_f += after.conv.1 - before.conv.1;
        self.bytes = (
            (after.split.bytes_to_untrusted - before.split.bytes_to_untrusted) as f64,
            (after.split.bytes_from_untrusted - before.split.bytes_from_untrusted) as f64,
        );
        let lf = |snap: &Snapshot| {
            snap.split.layers.iter().fold((0.0, 0.0), |acc, l| {
                (acc.0 + l.trusted_flops, acc.1 + l.untrusted_flops)
            })
        };
        let (fa, fb) = (lf(after), lf(before));
        self.flops = (fa.0 - fb.0, fa.1 - fb.1);
        if let Some(f) = untrusted_only_flops {
            self.flops.1 = f;
        }
        add_layers(&mut self.layers, before, after);
    }

    /// The per-layer sums as means per step; trusted-only's FLOPs are those of the local conv kernels.
    fn per_step(&mut self, steps: f64, mode: Mode) {
        for l in &mut self.layers {
            l.trusted_s /= steps;
            l.decompose_s /= steps;
            l.merge_s /= steps;
            l.integrity_s /= steps;
            l.transfer_s /= steps;
            l.wait_s /= steps;
            l.bytes_to_untrusted /= steps;
            l.bytes_from_untrusted /= steps;
            l.trusted_flops /= steps;
            l.untrusted_flops /= steps;
            l.untrusted_s = l.untrusted_s.map(|v| v / steps);
        }
        if mode == Mode::TrustedOnly {
            self.flops = (self.conv_f / steps, 0.0);
        }
    }

    /// The case's row: medians of the timed steps; the ratios between modes are filled by [`relate`].
    fn result(
        mut self,
        a: &BenchArgs,
        plan: &Plan,
        case: &Case<'_>,
        nodes: Vec<NodeRow>,
        peaks: Peaks,
        torch_ms: Option<f64>,
    ) -> BenchResult {
        let mode = case.mode;
        let med = median(&mut self.wall.clone());
        let trusted_med = median(&mut self.trusted);
        let conv_med = median(&mut self.conv_own).min(trusted_med);
        let untrusted_med = (!self.untrusted.is_empty()).then(|| median(&mut self.untrusted));
        let local_accelerator = a.split.accelerator == AcceleratorSpec::InProc;
        BenchResult {
            model: case.spec.name(),
            phase: case.phase.name().into(),
            mode: mode.to_string(),
            rank: case.rank.map_or(String::new(), |r| r.text.clone()),
            route: if mode == Mode::Split {
                a.split.route.to_string()
            } else {
                String::new()
            },
            svd: if mode == Mode::Split {
                crate::values::svd_method(a.split.svd, a.split.svd_iters)
                    .map(|m| m.to_string())
                    .unwrap_or_default()
            } else {
                String::new()
            },
            micro_batches: if mode == Mode::Split && a.split.basis() != Basis::Shared {
                usize::from(a.split.micro_batches).min(a.batch_size)
            } else {
                1
            },
            streamed: self.streamed,
            pipelined_backward: mode == Mode::Split && !a.split.no_pipelined_backward,
            lockstep: mode == Mode::Split && a.lockstep,
            interleaved: a.interleave,
            batch: a.batch_size,
            input_size: case.spec.input_size,
            trusted_threads: plan.threads,
            accelerator_threads: (mode != Mode::TrustedOnly).then_some(plan.accel_threads),
            median_s: med,
            min_s: self.wall.iter().cloned().fold(f64::INFINITY, f64::min),
            trusted_s: trusted_med,
            untrusted_s: untrusted_med,
            transfer_s: median(&mut self.transfer),
            wait_s: median(&mut self.wait),
            device_copy_s: (!self.device_copy.is_empty()).then(|| median(&mut self.device_copy)),
            device_kernel_s: (!self.device_kernel.is_empty())
                .then(|| median(&mut self.device_kernel)),
            conv_s: conv_med,
            other_s: trusted_med - conv_med,
            integrity_s: median(&mut self.integrity),
            overlap_s: untrusted_med
                .filter(|_| mode == Mode::Split)
                .map(|u| (trusted_med + u - med).max(0.0)),
            bytes_to_untrusted: self.bytes.0,
            bytes_from_untrusted: self.bytes.1,
            trusted_flops: self.flops.0,
            untrusted_flops: self.flops.1,
            trusted_peak_bytes: peaks.trusted,
            accelerator_peak_bytes: peaks
                .accelerator
                .filter(|_| mode != Mode::TrustedOnly && local_accelerator),
            frames_peak_bytes: peaks.frames.filter(|_| mode != Mode::TrustedOnly),
            conv_gflops: (self.conv_s > 0.0).then(|| self.conv_f / self.conv_s / 1e9),
            trusted_speedup: None,
            wall_speedup: None,
            slowdown_vs_untrusted_only: None,
            flop_bound: None,
            time_bound: None,
            torch_ratio: torch_ms
                .filter(|_| mode == Mode::TrustedOnly)
                .map(|t| t / 1e3 / med),
            route_check: if mode == Mode::Split && a.split.route != RouteChoice::Split {
                self.route_checks
            } else {
                Vec::new()
            },
            layers: self.layers,
            nodes,
        }
    }
}

/// Runs `asymml bench`.
pub fn run(a: BenchArgs) -> Result<()> {
    let threads = threads::init(a.threads)?;
    let plan = Plan::new(&a, threads)?;
    let mut results = threads::in_pool(threads, || plan.measure_all(&a))?;
    relate(&mut results);
    if let Some(out) = &a.out {
        write_outputs(out, &results)?;
    }
    if a.json {
        println!("{}", serde_json::json!({ "results": results }));
        return Ok(());
    }
    print_table(&results);
    Ok(())
}

/// Times `a`'s modes (in split mode each of its rank policies) in each of its phases on the batch `x` of the
/// caller's images, with the networks of `net`, and fills the split rows' ratios (`privacy --frontier`).
/// `a.models`, `a.images` and `a.input_size` are not read: the model is `spec` and the batch `x`, whose size
/// must be `a.batch_size`. Run it inside a rayon pool of `threads` threads: the trusted runtime's kernels use
/// the current pool.
pub(crate) fn time_batch(
    a: &BenchArgs,
    spec: &ModelSpec,
    x: &Tensor,
    net: NetBuilder<'_>,
    threads: usize,
) -> Result<Vec<BenchResult>> {
    if x.shape.first() != Some(&a.batch_size) {
        bail!(
            "bench: the batch holds {:?} images, not --batch-size {}",
            x.shape.first(),
            a.batch_size
        );
    }
    check_batch_bytes(a.batch_size, spec.in_ch, spec.width, spec.input_size)?;
    let plan = Plan::new(a, threads)?;
    let labels: Vec<usize> = (0..a.batch_size).map(|i| i % spec.classes).collect();
    let pb = plan.bar(a, 1);
    let mut results = Vec::new();
    for &phase in &a.phase {
        let cases = plan.cases(spec, phase, x, &labels, Some(net));
        results.extend(plan.measure_rounds(a, &cases, &pb, None)?);
    }
    pb.finish_and_clear();
    relate(&mut results);
    Ok(results)
}

/// Fills the split rows' ratios against the trusted-only and untrusted-only rows of the same model and phase.
fn relate(results: &mut [BenchResult]) {
    let find = |rs: &[BenchResult], model: &str, phase: &str, mode: &str| {
        rs.iter()
            .find(|r| r.model == model && r.phase == phase && r.mode == mode)
            .map(|r| (r.trusted_s, r.median_s, r.trusted_flops, r.conv_s))
    };
    let snapshot = results.to_vec();
    for r in results.iter_mut().filter(|r| r.mode == "split") {
        if let Some((t, w, f, c)) = find(&snapshot, &r.model, &r.phase, "trusted-only") {
            r.trusted_speedup = Some(t / r.trusted_s);
            r.wall_speedup = Some(w / r.median_s);
            r.flop_bound = (r.trusted_flops > 0.0).then(|| f / r.trusted_flops);
            r.time_bound = r.flop_bound.map(|b| t / (r.other_s + c / b));
        }
        if let Some((_, w, _, _)) = find(&snapshot, &r.model, &r.phase, "untrusted-only") {
            r.slowdown_vs_untrusted_only = Some(r.median_s / w);
        }
    }
}

/// bench.json, and one stacked-bar PNG per split row: trusted compute, untrusted compute and transfer per layer.
fn write_outputs(out: &Path, results: &[BenchResult]) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let text = serde_json::to_string_pretty(&serde_json::json!({ "results": results }))?;
    asymml_core::weights::write_atomic(&out.join("bench.json"), text.as_bytes())?;
    for r in results.iter().filter(|r| !r.layers.is_empty()) {
        let cats: Vec<String> = r
            .layers
            .iter()
            .map(|l| format!("{} (r={})", l.layer, l.rank))
            .collect();
        let ms = |f: &dyn Fn(&LayerRow) -> f64| r.layers.iter().map(f).collect::<Vec<f64>>();
        let mut series = vec![(
            "trusted compute".to_string(),
            ms(&|l| (l.trusted_s - l.transfer_s).max(0.0) * 1e3),
        )];
        if r.layers.iter().any(|l| l.untrusted_s.is_some()) {
            series.push((
                "untrusted compute".to_string(),
                ms(&|l| l.untrusted_s.unwrap_or(0.0) * 1e3),
            ));
        }
        series.push((
            "transfer (encode/decode)".to_string(),
            ms(&|l| l.transfer_s * 1e3),
        ));
        let file = format!(
            "layers_{}_{}_{}.png",
            r.model,
            r.phase,
            r.rank.replace([':', '.'], "_")
        );
        crate::plot::stacked_bars(
            &out.join(file),
            &format!(
                "{} {} split ({}), batch {}: time per conv layer",
                r.model, r.phase, r.rank, r.batch
            ),
            &cats,
            &series,
            "ms per step",
        )?;
    }
    Ok(())
}

fn print_table(results: &[BenchResult]) {
    println!(
        "{:<20} {:<6} {:<22} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "model",
        "phase",
        "mode",
        "median ms",
        "trusted",
        "T conv",
        "T check",
        "T other",
        "untrust.",
        "transfer",
        "MB →",
        "T GFLOP",
        "U GFLOP",
        "T peak MB",
        "A peak MB",
        "F peak MB"
    );
    let mb = |v: Option<u64>| v.map_or("-".into(), |b| format!("{:.0}", b as f64 / 1e6));
    let ms = |v: Option<f64>| v.map_or("-".into(), |s| format!("{:.1}", s * 1e3));
    for r in results {
        let mode = if r.rank.is_empty() {
            r.mode.clone()
        } else {
            format!("{} {}", r.mode, r.rank)
        };
        println!(
            "{:<20} {:<6} {:<22} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9} {:>9.1} {:>8.1} {:>9.2} {:>9.2} {:>9} {:>9} {:>9}",
            r.model,
            r.phase,
            mode,
            r.median_s * 1e3,
            r.trusted_s * 1e3,
            r.conv_s * 1e3,
            r.integrity_s * 1e3,
            r.other_s * 1e3,
            ms(r.untrusted_s),
            r.transfer_s * 1e3,
            r.bytes_to_untrusted / 1e6,
            r.trusted_flops / 1e9,
            r.untrusted_flops / 1e9,
            mb(r.trusted_peak_bytes),
            mb(r.accelerator_peak_bytes),
            mb(r.frames_peak_bytes),
        );
        if let Some(c) = r.route_check.iter().find(|c| c.all_trusted) {
            let ms = |v: Option<f64>| v.map_or("-".into(), |v| format!("{:.1} ms", v * 1e3));
            println!(
                "{:<20} {:<6} --route {}: every conv trusted in {} of {} round(s): a step with the convs' own routes took {} of trusted time, with every conv trusted {} (to be kept, {} less)",
                "",
                "",
                r.route,
                r.route_check.iter().filter(|c| c.all_trusted).count(),
                r.route_check.len(),
                ms(c.settled_s),
                ms(c.trusted_s),
                ms(c.needed_s)
            );
        }
        if let (Some(ts), Some(fb)) = (r.trusted_speedup, r.flop_bound) {
            println!(
                "{:<20} {:<6} trusted runtime {ts:.2}× faster than trusted-only (FLOP bound {fb:.2}×, {} with this non-conv time); wall {}{}",
                "",
                "",
                r.time_bound.map_or("-".into(), |b| format!("{b:.2}×")),
                r.wall_speedup.map_or("-".into(), |w| format!("{w:.2}×")),
                r.slowdown_vs_untrusted_only
                    .map_or(String::new(), |s| format!("; {s:.2}× the untrusted-only time")),
            );
            if let Some(o) = r.overlap_s {
                let how = if r.streamed {
                    format!(" ({} parts streamed through the network)", r.micro_batches)
                } else if r.micro_batches > 1 {
                    format!(" ({} parts per conv)", r.micro_batches)
                } else {
                    String::new()
                };
                let how = if r.phase == "train" && r.pipelined_backward {
                    format!("{how} (backward pipelined)")
                } else {
                    how
                };
                let how = if r.lockstep {
                    format!("{how} (lockstep: the accelerator computes only while the trusted runtime waits)")
                } else {
                    how
                };
                println!(
                    "{:<20} {:<6} both sides computing at once: {:.1} ms per step{how}",
                    "",
                    "",
                    o * 1e3
                );
            }
        }
        if let (Some(c), Some(k)) = (r.device_copy_s, r.device_kernel_s) {
            println!(
                "{:<20} {:<6} accelerator device: copies {:.1} ms, kernels {:.1} ms per step",
                "",
                "",
                c * 1e3,
                k * 1e3
            );
        }
        if let Some(g) = r.conv_gflops {
            let t = r.torch_ratio.map_or(String::new(), |t| {
                format!("; speed vs PyTorch (its time / ours) {t:.2}×")
            });
            println!("{:<20} {:<6} conv kernels {g:.1} GFLOP/s{t}", "", "");
        }
    }
    if let Some(r) = results.first() {
        let svd = results
            .iter()
            .find(|r| !r.svd.is_empty())
            .map_or(String::new(), |r| {
                format!(
                    ", the split's decomposition --svd {} and --route {}",
                    r.svd, r.route
                )
            });
        let how = if r.interleaved {
            "; runs timed step by step in turn (--interleave), peaks not measured"
        } else {
            ""
        };
        println!(
            "(batch {}, {} trusted thread(s){svd}; medians over the timed steps{how})",
            r.batch, r.trusted_threads
        );
    }
}

#[cfg(test)]
mod tests {
    use super::{interleaved_steps, round_order, TorchRef};
    use crate::cli::BenchArgs;

    /// `asymml bench` with `flags`.
    fn bench_args(flags: &[&str]) -> BenchArgs {
        use clap::{Args, FromArgMatches};
        let cmd = BenchArgs::augment_args(clap::Command::new("bench"));
        let m = cmd
            .try_get_matches_from(std::iter::once("bench").chain(flags.iter().copied()))
            .unwrap();
        BenchArgs::from_arg_matches(&m).unwrap()
    }

    /// A report of `tools/bench_torch.py --json` (its fields; the per-step lists left out).
    const TORCH: &str = r#"{"threads": 1, "batch": 8, "warmup": 2, "steps": 5, "torch": "2.15.0",
        "results": [
          {"model": "vgg16-cifar", "input_size": 32, "forward_ms_median": 40.5, "train_ms_median": 120.0},
          {"model": "resnet18-imagenet", "input_size": 224, "forward_ms_median": 300.0,
           "train_ms_median": 900.0}]}"#;

    #[test]
    fn pytorchs_times_are_taken_for_the_same_model_size_batch_and_threads() {
        let torch = TorchRef::parse(TORCH, "torch.json").unwrap();
        let a = bench_args(&[
            "--models",
            "vgg16-cifar,resnet18-imagenet",
            "--batch-size",
            "8",
        ]);
        torch.check(&a, 1, "torch.json").unwrap();
        let spec = |name: &str, size: usize| {
            name.parse::<crate::values::ModelName>()
                .unwrap()
                .spec(3, 10, size)
                .unwrap()
        };
        assert_eq!(
            torch.times("vgg16-cifar", &spec("vgg16-cifar", 32)),
            Some((40.5, 120.0))
        );
        assert_eq!(
            torch.times("resnet18-imagenet", &spec("resnet18-imagenet", 224)),
            Some((300.0, 900.0))
        );
        // The same model at another size is other work.
        assert_eq!(torch.times("vgg16-cifar", &spec("vgg16-cifar", 64)), None);
    }

    #[test]
    fn pytorchs_times_for_other_work_are_refused_before_any_is_timed() {
        let torch = TorchRef::parse(TORCH, "torch.json").unwrap();
        let err = |flags: &[&str], threads: usize| {
            torch
                .check(&bench_args(flags), threads, "torch.json")
                .unwrap_err()
                .to_string()
        };
        let batch = err(&["--models", "vgg16-cifar", "--batch-size", "32"], 1);
        assert!(batch.contains("batch 8, this bench runs 32"), "{batch}");
        let threads = err(&["--models", "vgg16-cifar", "--batch-size", "8"], 2);
        assert!(
            threads.contains("threads 1, this bench runs 2"),
            "{threads}"
        );
        let size = err(
            &[
                "--models",
                "vgg16-cifar",
                "--batch-size",
                "8",
                "--input-size",
                "64",
            ],
            1,
        );
        assert!(size.contains("no row for vgg16-cifar at 64 px"), "{size}");
        let model = err(&["--models", "resnet34-cifar", "--batch-size", "8"], 1);
        assert!(
            model.contains("no row for resnet34-cifar at 32 px"),
            "{model}"
        );
        let classes = err(
            &[
                "--models",
                "vgg16-cifar",
                "--batch-size",
                "8",
                "--classes",
                "5",
            ],
            1,
        );
        assert!(classes.contains("--classes 5"), "{classes}");
        for bad in [
            "not json",
            r#"{"batch": 8, "results": []}"#,
            r#"{"threads": 1, "batch": 8, "results": [{"model": "vgg16-cifar", "input_size": 32}]}"#,
            r#"{"threads": 1, "batch": 8, "results": [{"model": "vgg16-cifar", "input_size": 32,
                "forward_ms_median": -1.0, "train_ms_median": 2.0}]}"#,
        ] {
            let e = TorchRef::parse(bad, "torch.json").unwrap_err().to_string();
            assert!(e.starts_with("torch.json"), "{e}");
        }
    }

    #[test]
    fn interleaved_steps_take_step_k_of_every_case_before_step_k_plus_one() {
        let order: Vec<usize> = interleaved_steps(3, 4).collect();
        assert_eq!(order, [0, 1, 2, 1, 2, 0, 2, 0, 1, 0, 1, 2]);
        assert_eq!(interleaved_steps(1, 3).collect::<Vec<_>>(), [0, 0, 0]);
        assert_eq!(interleaved_steps(2, 0).count(), 0);
    }

    #[test]
    fn each_case_takes_each_place_once_over_n_rounds() {
        let orders: Vec<Vec<usize>> = (0..4).map(|r| round_order(3, r).collect()).collect();
        assert_eq!(
            orders,
            [vec![0, 1, 2], vec![1, 2, 0], vec![2, 0, 1], vec![0, 1, 2]]
        );
        for place in 0..3 {
            let mut at: Vec<usize> = orders[..3].iter().map(|o| o[place]).collect();
            at.sort();
            assert_eq!(at, [0, 1, 2], "place {place}");
        }
        assert_eq!(round_order(0, 5).count(), 0);
        assert_eq!(round_order(1, 7).collect::<Vec<_>>(), [0]);
    }
}
