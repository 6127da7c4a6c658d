//! `asymml train`: the training loop with per-epoch evaluation, metrics, atomic checkpoints, resume and plots.

use crate::cli::TrainArgs;
use crate::common::{self, Batch, META_ARGS};
use crate::data::{self, epoch_order, Augment, DatasetKind};
use crate::plot::{self, EpochPoint};
use anyhow::{bail, Context, Result};
use asymml_core::models::ModelSpec;
use asymml_core::optim::{LrSchedule, OptimizerKind};
use asymml_core::rng::Rng;
use asymml_core::weights;
use asymml_trusted::checkpoint::{self, Progress};
use asymml_trusted::{Mode, TrainConfig};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The settings of a training run, stored in its checkpoint so that `--resume` continues it unchanged.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Plan {
    pub model: String,
    pub dataset: String,
    pub data_dir: Option<PathBuf>,
    pub input_size: Option<usize>,
    pub batch_size: usize,
    pub seed: u64,
    pub optimizer: String,
    pub momentum: f32,
    pub nesterov: bool,
    pub lr: Option<f32>,
    pub weight_decay: Option<f32>,
    pub schedule: String,
    pub augment: Option<String>,
    pub limit_train: Option<usize>,
}

/// One line of metrics.jsonl (and of `--json` output).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EpochMetrics {
    pub epoch: usize,
    pub train_loss: f64,
    pub train_acc: f64,
    pub test_loss: f64,
    pub test_acc: f64,
    pub seconds: f64,
}

const CHECKPOINT: &str = "checkpoint.safetensors";
const MODEL: &str = "model.safetensors";
const METRICS: &str = "metrics.jsonl";
const CURVES: &str = "curves.png";

impl Plan {
    fn from_args(a: &TrainArgs) -> Self {
        let c = &a.common;
        Plan {
            model: c.model.clone().unwrap_or_else(|| "vgg-small".into()),
            dataset: c.dataset.clone(),
            data_dir: c.data_dir.clone(),
            input_size: c.input_size,
            batch_size: c.batch_size,
            seed: c.seed,
            optimizer: a.optimizer.clone(),
            momentum: a.momentum,
            nesterov: a.nesterov,
            lr: a.lr,
            weight_decay: a.weight_decay,
            schedule: a.schedule.clone(),
            augment: a.augment.clone(),
            limit_train: a.limit_train,
        }
    }

    /// The optimizer configuration; `steps_per_epoch` and `epochs` size the schedule.
    fn train_config(&self, steps_per_epoch: u64, epochs: usize) -> Result<TrainConfig> {
        let adamw = match self.optimizer.as_str() {
            "sgd" => false,
            "adamw" => true,
            other => bail!("unknown optimizer '{other}': use sgd or adamw"),
        };
        let optimizer = if adamw {
            OptimizerKind::AdamW {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
            }
        } else {
            OptimizerKind::Sgd {
                momentum: self.momentum,
                nesterov: self.nesterov,
            }
        };
        let lr = self.lr.unwrap_or(if adamw { 1e-3 } else { 0.05 });
        let weight_decay = self.weight_decay.unwrap_or(if adamw { 0.01 } else { 5e-4 });
        if !(lr.is_finite() && lr > 0.0 && weight_decay.is_finite() && weight_decay >= 0.0) {
            bail!("--lr must be positive and --weight-decay non-negative");
        }
        let schedule = parse_schedule(&self.schedule, steps_per_epoch, epochs)?;
        Ok(TrainConfig {
            optimizer,
            lr,
            weight_decay,
            schedule,
        })
    }

    fn augment(&self, kind: DatasetKind, size: usize) -> Result<Option<Augment>> {
        let default = match kind {
            DatasetKind::Cifar10 | DatasetKind::Folder => "crop+flip",
            _ => "none",
        };
        let pad = (size / 8).max(1);
        Ok(match self.augment.as_deref().unwrap_or(default) {
            "none" => None,
            "crop" => Some(Augment { pad, hflip: false }),
            "flip" => Some(Augment {
                pad: 0,
                hflip: true,
            }),
            "crop+flip" | "flip+crop" => Some(Augment { pad, hflip: true }),
            other => bail!("unknown --augment '{other}': use none, crop, flip or crop+flip"),
        })
    }
}

/// Parses `constant`, `cosine` or `step:EPOCHS:GAMMA` into a per-step schedule.
pub fn parse_schedule(s: &str, steps_per_epoch: u64, epochs: usize) -> Result<LrSchedule> {
    let total = steps_per_epoch * epochs as u64;
    let parts: Vec<&str> = s.split(':').collect();
    Ok(match parts.as_slice() {
        ["constant"] => LrSchedule::Constant,
        ["cosine"] => LrSchedule::Cosine { total, min_lr: 0.0 },
        ["step", e, g] => {
            let e: u64 = e
                .parse()
                .context("step schedule: EPOCHS must be a whole number")?;
            let g: f32 = g.parse().context("step schedule: GAMMA must be a number")?;
            if e == 0 || !(g.is_finite() && g > 0.0) {
                bail!("step schedule: EPOCHS must be ≥ 1 and GAMMA positive");
            }
            LrSchedule::Step {
                every: e * steps_per_epoch,
                gamma: g,
            }
        }
        _ => bail!("unknown --schedule '{s}': use constant, cosine or step:EPOCHS:GAMMA"),
    })
}

fn read_metrics(path: &Path, upto: usize) -> Vec<EpochMetrics> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<EpochMetrics>(l).ok())
        .filter(|m| m.epoch <= upto)
        .collect()
}

fn write_metrics(path: &Path, all: &[EpochMetrics]) -> Result<()> {
    let mut text = String::new();
    for m in all {
        text.push_str(&serde_json::to_string(m)?);
        text.push('\n');
    }
    weights::write_atomic(path, text.as_bytes())?;
    Ok(())
}

/// Runs `asymml train`.
pub fn run(a: TrainArgs) -> Result<()> {
    let threads = common::init_threads(a.common.threads)?;
    let mode: Mode = a.common.mode.parse()?;
    let json = a.common.json;
    if a.epochs == 0 {
        bail!("--epochs must be at least 1");
    }
    // Settings: from the flags, or from the checkpoint being resumed.
    let (plan, out_dir, resume_from) = match &a.resume {
        Some(dir) => {
            let ck = dir.join(CHECKPOINT);
            if !ck.is_file() {
                bail!("--resume {}: no {CHECKPOINT} there", dir.display());
            }
            let (_, info) = common::weight_info(&ck)?;
            let plan: Plan = info
                .meta
                .get(META_ARGS)
                .and_then(|s| serde_json::from_str(s).ok())
                .with_context(|| format!("{}: not an asymml training checkpoint", ck.display()))?;
            (plan, dir.clone(), Some(ck))
        }
        None => {
            let plan = Plan::from_args(&a);
            let out = a
                .out
                .clone()
                .unwrap_or_else(|| PathBuf::from("runs").join(&plan.model));
            (plan, out, None)
        }
    };
    if plan.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let kind: DatasetKind = plan.dataset.parse()?;
    let folder_size = plan.input_size.unwrap_or(224);
    let (mut train, test) = data::load(kind, plan.data_dir.as_deref(), 3, folder_size, plan.seed)?;
    if let Some(n) = plan.limit_train {
        if n == 0 {
            bail!("--limit-train must be at least 1");
        }
        train = train.select(&(0..n.min(train.len())).collect::<Vec<_>>());
    }
    let size = plan.input_size.unwrap_or(train.h);
    let (train, test) = (common::fit_to(train, size), common::fit_to(test, size));
    let spec = ModelSpec::parse(&plan.model, train.c, train.num_classes, size)?;
    common::check_fit(&spec, &test, "test")?;
    let mut net = spec.build(plan.seed)?;
    if let (Some(w), None) = (&a.common.weights, &resume_from) {
        let (bytes, _) = common::weight_info(w)?;
        common::load_weights(&mut net, &bytes, w)?;
    }
    let steps_per_epoch = train.len().div_ceil(plan.batch_size) as u64;
    let config = plan.train_config(steps_per_epoch, a.epochs)?;
    let aug = plan.augment(kind, size)?;
    let mut session = asymml_trusted::Session::new(net, config, mode);
    let mut start_epoch = 0;
    if let Some(ck) = &resume_from {
        let (progress, _) = checkpoint::load(ck, &mut session)?;
        start_epoch = progress.epoch;
        if start_epoch >= a.epochs {
            bail!(
                "{} already holds {start_epoch} epoch(s); pass a larger --epochs to continue",
                out_dir.display()
            );
        }
        // The schedule spans the new total number of epochs.
        session.config.schedule = parse_schedule(&plan.schedule, steps_per_epoch, a.epochs)?;
    }
    // The accelerator is registered with the weights as they are now (initial, loaded or resumed).
    let _accel = common::attach_accelerator(&mut session, &a.common.split, threads, plan.seed)?;
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let mut meta = common::model_metadata(&spec, &train, &plan.dataset);
    meta.insert(META_ARGS.into(), common::to_json(&plan));
    let mut history = if resume_from.is_some() {
        read_metrics(&out_dir.join(METRICS), start_epoch)
    } else {
        Vec::new()
    };
    if !json {
        let params = session.net.num_params();
        eprintln!(
            "asymml: {} {} ({:.2} M parameters) on {}{} — {} train / {} test images, {} px, batch {}, {mode}, {threads} thread(s)",
            if resume_from.is_some() { "resuming" } else { "training" },
            spec.name(),
            params as f64 / 1e6,
            plan.dataset,
            if plan.data_dir.is_none() { " (embedded sample)" } else { "" },
            train.len(),
            test.len(),
            size,
            plan.batch_size,
        );
    }
    let mut batch = Batch::new();
    for epoch in start_epoch..a.epochs {
        let t0 = Instant::now();
        let mut rng = Rng::new(plan.seed ^ (epoch as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let order = epoch_order(train.len(), &mut rng);
        let pb = common::progress(train.len() as u64, &format!("epoch {}", epoch + 1), json);
        let (mut loss_sum, mut correct, mut seen) = (0.0f64, 0usize, 0usize);
        for (bi, idx) in order.chunks(plan.batch_size).enumerate() {
            if idx.len() < 2 && seen > 0 {
                continue; // a last batch of one image would give BatchNorm no batch statistics
            }
            batch.fill(&train, idx, aug.as_ref(), &mut rng);
            let (loss, c) = session
                .train_step(&batch.x, &batch.labels, epoch + 1, bi + 1)
                .with_context(|| {
                    format!("training stopped at epoch {}, step {}", epoch + 1, bi + 1)
                })?;
            loss_sum += loss as f64 * idx.len() as f64;
            correct += c;
            seen += idx.len();
            pb.inc(idx.len() as u64);
            pb.set_message(format!("loss {:.4}", loss_sum / seen as f64));
        }
        pb.finish_and_clear();
        let pb = common::progress(test.len() as u64, "test", json);
        let (test_loss, test_acc) = common::evaluate(&mut session, &test, plan.batch_size, &pb)?;
        pb.finish_and_clear();
        let m = EpochMetrics {
            epoch: epoch + 1,
            train_loss: loss_sum / seen.max(1) as f64,
            train_acc: correct as f64 / seen.max(1) as f64,
            test_loss,
            test_acc,
            seconds: t0.elapsed().as_secs_f64(),
        };
        session.sync_weights()?;
        let progress = Progress {
            epoch: epoch + 1,
            step: session.step,
        };
        checkpoint::save(&out_dir.join(CHECKPOINT), &mut session, &progress, &meta)?;
        weights::save(&mut session.net, &out_dir.join(MODEL), &meta)?;
        history.push(m.clone());
        write_metrics(&out_dir.join(METRICS), &history)?;
        let points: Vec<EpochPoint> = history
            .iter()
            .map(|h| EpochPoint {
                epoch: h.epoch,
                train_loss: h.train_loss,
                train_acc: h.train_acc,
                test_loss: h.test_loss,
                test_acc: h.test_acc,
            })
            .collect();
        if let Err(e) = plot::training_curves(
            &out_dir.join(CURVES),
            &points,
            &format!("{} on {}", spec.name(), plan.dataset),
        ) {
            eprintln!("warning: could not draw {CURVES}: {e}");
        }
        let mut out = std::io::stdout().lock();
        if json {
            writeln!(out, "{}", serde_json::to_string(&m)?)?;
        } else {
            writeln!(
                out,
                "epoch {}/{}  train loss {:.4} acc {:.2}%  test loss {:.4} acc {:.2}%  ({:.1} s)",
                m.epoch,
                a.epochs,
                m.train_loss,
                m.train_acc * 100.0,
                m.test_loss,
                m.test_acc * 100.0,
                m.seconds
            )?;
        }
        out.flush()?;
    }
    if !json {
        if let Some(last) = history.last() {
            println!(
                "test accuracy {:.2}% after {} epoch(s); weights: {}, curves: {}",
                last.test_acc * 100.0,
                last.epoch,
                out_dir.join(MODEL).display(),
                out_dir.join(CURVES).display()
            );
        }
    }
    Ok(())
}
