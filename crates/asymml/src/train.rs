//! `asymml train`: the training loop with per-epoch evaluation, metrics, atomic checkpoints, resume and plots.

use crate::accelerator::AcceleratorHandle;
use crate::batch::{self, Batch};
use crate::cli::TrainArgs;
use crate::data::{self, epoch_order, Augment, Dataset, DatasetKind};
use crate::plot::{self, EpochPoint};
use crate::privacy::accounting::{self, Accounting, ConvRelease};
use crate::setup::{self, SplitSetup};
use crate::values::{
    as_text, check_batch_bytes, AugmentChoice, ModelName, OptimizerChoice, Schedule,
};
use crate::weightfile::{self, META_ARGS};
use crate::{progress, threads};
use anyhow::{bail, Context, Result};
use asymml_core::models::ModelSpec;
use asymml_core::optim::OptimizerKind;
use asymml_core::rng::Rng;
use asymml_core::weights;
use asymml_trusted::checkpoint::{self, Progress};
use asymml_trusted::{Session, TrainConfig};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The settings of a training run, stored in its checkpoint (as the strings given on the command line) so
/// that `--resume` continues it unchanged.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Plan {
    #[serde(with = "as_text")]
    model: ModelName,
    #[serde(with = "as_text")]
    dataset: DatasetKind,
    data_dir: Option<PathBuf>,
    input_size: Option<usize>,
    batch_size: usize,
    seed: u64,
    optimizer: OptimizerChoice,
    momentum: f32,
    nesterov: bool,
    lr: Option<f32>,
    weight_decay: Option<f32>,
    #[serde(with = "as_text")]
    schedule: Schedule,
    augment: Option<AugmentChoice>,
    limit_train: Option<usize>,
}

/// One line of metrics.jsonl (and of `--json` output).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct EpochMetrics {
    epoch: usize,
    train_loss: f64,
    train_acc: f64,
    test_loss: f64,
    test_acc: f64,
    seconds: f64,
    /// Split mode with --clip/--noise: the (ε, δ) spent so far (see [`EpochPrivacy`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    privacy: Option<EpochPrivacy>,
    /// Split mode with --integrity on: the checks of the accelerator's results made so far (this run), and
    /// how many failed (a failure stops the run, so a finished epoch has 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    integrity: Option<IntegrityCount>,
    /// Split mode: where the convs ran in the epoch's last forward (see [`EpochRoutes`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    routes: Option<EpochRoutes>,
}

/// Split mode: how many convs ran split and how many wholly in the trusted runtime in the epoch's last
/// forward (the rank policy's, the rank table's and `--route auto`'s choices), and `--route auto`'s check of
/// the whole step: whether it put every conv on the trusted route (the steps with the convs' own routes were
/// not cheaper), with the median trusted seconds of a step each way.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct EpochRoutes {
    split: usize,
    trusted: usize,
    all_trusted_by_check: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    settled_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    trusted_s: Option<f64>,
}

impl EpochRoutes {
    /// The split runtime's counters (`None` outside split mode).
    fn of(session: &asymml_trusted::Session) -> Option<Self> {
        let stats = session.split_stats()?;
        let s = stats.lock().ok()?;
        let trusted = s.layers.iter().filter(|l| l.trusted_route).count();
        Some(EpochRoutes {
            split: s.layers.len() - trusted,
            trusted,
            all_trusted_by_check: s.route_check.all_trusted,
            settled_s: s.route_check.settled_s,
            trusted_s: s.route_check.trusted_s,
        })
    }

    /// The epoch's line about the routes.
    fn line(&self) -> String {
        let ms = |v: Option<f64>| v.map_or("-".into(), |v| format!("{:.0} ms", v * 1e3));
        if self.all_trusted_by_check {
            format!(
                "  routes: every conv ran trusted (nothing left): --route auto measured a step with the split convs at {} of trusted time, with every conv trusted {}",
                ms(self.settled_s),
                ms(self.trusted_s)
            )
        } else {
            format!(
                "  routes: {} of {} convs split, {} wholly trusted",
                self.split,
                self.split + self.trusted,
                self.trusted
            )
        }
    }
}

/// Integrity checks made and failed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct IntegrityCount {
    checks: u64,
    failures: u64,
}

impl IntegrityCount {
    /// The split runtime's counters (`None` outside split mode or with the checks off).
    fn of(session: &asymml_trusted::Session) -> Option<Self> {
        let stats = session.split_stats()?;
        let s = stats.lock().ok()?;
        (s.integrity.checks > 0 || s.integrity.failures > 0).then(|| IntegrityCount {
            checks: s.integrity.checks,
            failures: s.integrity.failures,
        })
    }
}

/// The formal accounting after an epoch: local DP of each example's forward residuals X_U, composed over
/// the convs whose X_U leaves and the epochs so far (each example is processed once per epoch, in training
/// or in the test evaluation). `eps: null` means ε = ∞.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct EpochPrivacy {
    eps: Option<f64>,
    delta: f64,
    /// Releases of one example's residual so far (releasing convs × epochs).
    releases_per_example: u64,
    scope: String,
    /// Why ε is ∞, when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    why_infinite: Option<String>,
}

/// What the accounting of a run needs: the convs and the mechanism's settings.
struct RunAccounting {
    layout: Vec<ConvRelease>,
    clip: Option<f32>,
    nsr: f32,
    delta: f64,
}

impl RunAccounting {
    /// In split mode with --clip or --noise: the convs of the session's network.
    fn new(a: &TrainArgs, session: &mut asymml_trusted::Session) -> Result<Option<Self>> {
        let s = &a.common.run.split;
        if session.mode != asymml_trusted::Mode::Split || (s.clip.is_none() && s.noise == 0.0) {
            return Ok(None);
        }
        let rank = s.rank.first();
        let table = rank.and_then(|r| r.table.as_deref());
        let layout =
            accounting::release_layout(&mut session.net, table, rank.and_then(|r| r.guard))?;
        Ok(Some(RunAccounting {
            layout,
            clip: s.clip,
            nsr: s.noise,
            delta: a.delta,
        }))
    }

    /// The accounting of `epochs` epochs.
    fn after(&self, epochs: usize) -> Result<Accounting> {
        accounting::account(&self.layout, self.clip, self.nsr, self.delta, epochs as u64)
    }

    fn epoch(&self, epochs: usize) -> Result<EpochPrivacy> {
        let acc = self.after(epochs)?;
        Ok(EpochPrivacy {
            eps: acc.total.eps,
            delta: acc.delta,
            releases_per_example: acc.releases,
            scope: "local DP per example of the forward residuals X_U only; ∇Y (backward), the weights and \
                    BatchNorm's cross-example batch statistics are not covered"
                .into(),
            why_infinite: acc.unbounded.map(str::to_string),
        })
    }

    /// The closing report on stdout (text mode).
    fn print(&self, epochs: usize, resumed: bool) -> Result<()> {
        let acc = self.after(epochs)?;
        println!(
            "formal privacy accounting (local DP per example; forward X_U only — ∇Y, sent in the backward \
             pass, is NOT covered by this noise):"
        );
        for l in acc.layer_lines() {
            println!("{l}");
        }
        println!(
            "  whole run: {} at δ = {} — {} release(s) of each example's residual ({} conv(s) × {} epoch(s); \
             each example is processed once per epoch){}",
            acc.total.text(),
            accounting::fmt_delta(acc.delta),
            acc.releases,
            acc.releases_per_forward,
            epochs,
            if resumed {
                "; the epochs before --resume are assumed to have used the same --clip and --noise"
            } else {
                ""
            }
        );
        for l in acc.scope_lines() {
            println!("{l}");
        }
        Ok(())
    }
}

const CHECKPOINT: &str = "checkpoint.safetensors";
const MODEL: &str = "model.safetensors";
const METRICS: &str = "metrics.jsonl";
const CURVES: &str = "curves.png";

impl Plan {
    fn from_args(a: &TrainArgs) -> Self {
        let c = &a.common;
        Plan {
            model: c.run.model.clone().unwrap_or_default(),
            dataset: c.dataset,
            data_dir: c.data_dir.clone(),
            input_size: c.run.input_size,
            batch_size: c.batch_size,
            seed: c.seed,
            optimizer: a.optimizer,
            momentum: a.momentum,
            nesterov: a.nesterov,
            lr: a.lr,
            weight_decay: a.weight_decay,
            schedule: a.schedule,
            augment: a.augment,
            limit_train: a.limit_train,
        }
    }

    /// The settings of the checkpoint in `dir` (`--resume`).
    fn from_checkpoint(dir: &Path) -> Result<Self> {
        let ck = dir.join(CHECKPOINT);
        if !ck.is_file() {
            bail!("--resume {}: no {CHECKPOINT} there", dir.display());
        }
        let (_, info) = weightfile::read(&ck)?;
        info.meta
            .get(META_ARGS)
            .and_then(|s| serde_json::from_str(s).ok())
            .with_context(|| format!("{}: not an asymml training checkpoint", ck.display()))
    }

    /// The optimizer configuration; `steps_per_epoch` and `epochs` size the schedule.
    fn train_config(&self, steps_per_epoch: u64, epochs: usize) -> Result<TrainConfig> {
        let (optimizer, lr, weight_decay) = match self.optimizer {
            OptimizerChoice::Sgd => (
                OptimizerKind::Sgd {
                    momentum: self.momentum,
                    nesterov: self.nesterov,
                },
                self.lr.unwrap_or(0.05),
                self.weight_decay.unwrap_or(5e-4),
            ),
            OptimizerChoice::Adamw => (
                OptimizerKind::AdamW {
                    beta1: 0.9,
                    beta2: 0.999,
                    eps: 1e-8,
                },
                self.lr.unwrap_or(1e-3),
                self.weight_decay.unwrap_or(0.01),
            ),
        };
        // The flags are checked where they are parsed; this guards the settings read from a checkpoint.
        if !(lr.is_finite()
            && lr > 0.0
            && weight_decay.is_finite()
            && weight_decay >= 0.0
            && (0.0..1.0).contains(&self.momentum))
        {
            bail!("--lr must be positive, --weight-decay non-negative and --momentum in [0, 1)");
        }
        Ok(TrainConfig {
            optimizer,
            lr,
            weight_decay,
            schedule: self.schedule.per_step(steps_per_epoch, epochs),
        })
    }

    /// The training and test data at the model's input size, and that size (refused before resizing when
    /// the resized images would not fit the memory limit).
    fn load_data(&self) -> Result<(Dataset, Dataset, usize)> {
        let folder_size = self.input_size.unwrap_or(224);
        let (mut train, test) = data::load(
            self.dataset,
            self.data_dir.as_deref(),
            3,
            folder_size,
            self.seed,
        )?;
        if let Some(n) = self.limit_train {
            if n == 0 {
                bail!("--limit-train must be at least 1");
            }
            train = train.select(&(0..n.min(train.len())).collect::<Vec<_>>());
        }
        let size = self.input_size.unwrap_or(train.h);
        for d in [&train, &test] {
            data::check_images_bytes(d.len(), d.c, size)?;
        }
        Ok((batch::fit_to(train, size), batch::fit_to(test, size), size))
    }
}

/// A training run resolved from the flags (or from the checkpoint it resumes): its data, model, session and
/// outputs, and the epochs done so far.
struct Training {
    plan: Plan,
    epochs: usize,
    out_dir: PathBuf,
    resumed: bool,
    train: Dataset,
    test: Dataset,
    size: usize,
    spec: ModelSpec,
    aug: Option<Augment>,
    /// Declared before the session so that it is dropped first, as the accelerator always was.
    _accel: Option<AcceleratorHandle>,
    session: Session,
    start_epoch: usize,
    meta: BTreeMap<String, String>,
    history: Vec<EpochMetrics>,
    /// The formal (ε, δ) accounting (split mode with --clip or --noise).
    accounting: Option<RunAccounting>,
}

impl Training {
    /// Checks the flags, loads the data, builds (or resumes) the model and reaches the accelerator.
    fn prepare(a: &TrainArgs, threads: usize) -> Result<Self> {
        // Settings: from the flags, or from the checkpoint being resumed.
        let (plan, out_dir) = match &a.resume {
            Some(dir) => (Plan::from_checkpoint(dir)?, dir.clone()),
            None => {
                let plan = Plan::from_args(a);
                let out = a
                    .out
                    .clone()
                    .unwrap_or_else(|| PathBuf::from("runs").join(plan.model.as_str()));
                (plan, out)
            }
        };
        if plan.batch_size == 0 {
            bail!("--batch-size must be at least 1");
        }
        if let Some(size) = plan.input_size {
            // A size the model cannot take is refused before any image is resized to it.
            plan.model.spec(1, 2, size)?;
        }
        let (train, test, size) = plan.load_data()?;
        let spec = plan.model.spec(train.c, train.num_classes, size)?;
        batch::check_fit(&spec, &test, "test")?;
        check_batch_bytes(plan.batch_size, train.c, spec.width, size)?;
        let mut net = spec.build(plan.seed)?;
        if let (Some(w), None) = (&a.common.weights, &a.resume) {
            let (bytes, _) = weightfile::read(w)?;
            weightfile::load_into(&mut net, &bytes, w)?;
        }
        let steps_per_epoch = train.len().div_ceil(plan.batch_size) as u64;
        let config = plan.train_config(steps_per_epoch, a.epochs)?;
        let aug = plan
            .augment
            .unwrap_or(AugmentChoice::default_for(plan.dataset))
            .augment(size);
        let mut session = Session::new(net, config, a.common.run.mode);
        let accounting = RunAccounting::new(a, &mut session)?;
        let start_epoch = match &a.resume {
            Some(_) => resume(&mut session, &plan, &out_dir, steps_per_epoch, a.epochs)?,
            None => 0,
        };
        // The accelerator is registered with the weights as they are now (initial, loaded or resumed).
        let split = SplitSetup::from_args(&a.common.run.split, threads, plan.seed)?;
        let accel = setup::attach_accelerator(&mut session, &split)?;
        std::fs::create_dir_all(&out_dir)
            .with_context(|| format!("creating {}", out_dir.display()))?;
        let mut meta = weightfile::metadata(&spec, &train, plan.dataset.name());
        meta.insert(META_ARGS.into(), weightfile::to_json(&plan));
        let history = match &a.resume {
            Some(_) => read_metrics(&out_dir.join(METRICS), start_epoch),
            None => Vec::new(),
        };
        Ok(Training {
            plan,
            epochs: a.epochs,
            out_dir,
            resumed: a.resume.is_some(),
            train,
            test,
            size,
            spec,
            aug,
            _accel: accel,
            session,
            start_epoch,
            meta,
            history,
            accounting,
        })
    }

    /// The line that opens the run on stderr.
    fn banner(&mut self, threads: usize) -> String {
        let plan = &self.plan;
        format!(
            "asymml: {} {} ({:.2} M parameters) on {}{} — {} train / {} test images, {} px, batch {}, {}, {threads} thread(s)",
            if self.resumed { "resuming" } else { "training" },
            self.spec.name(),
            self.session.net.num_params() as f64 / 1e6,
            plan.dataset,
            if plan.data_dir.is_none() { " (embedded sample)" } else { "" },
            self.train.len(),
            self.test.len(),
            self.size,
            plan.batch_size,
            self.session.mode,
        )
    }

    /// Trains one epoch (0-based `epoch`) and evaluates on the test split.
    fn run_epoch(&mut self, epoch: usize, batch: &mut Batch, quiet: bool) -> Result<EpochMetrics> {
        let t0 = Instant::now();
        let (train, session) = (&self.train, &mut self.session);
        let mut rng =
            Rng::new(self.plan.seed ^ (epoch as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let order = epoch_order(train.len(), &mut rng);
        let pb = progress::bar(train.len() as u64, &format!("epoch {}", epoch + 1), quiet);
        let (mut loss_sum, mut correct, mut seen) = (0.0f64, 0usize, 0usize);
        for (bi, idx) in order.chunks(self.plan.batch_size).enumerate() {
            if idx.len() < 2 && seen > 0 {
                continue; // a last batch of one image would give BatchNorm no batch statistics
            }
            batch.fill(train, idx, self.aug.as_ref(), &mut rng);
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
        let pb = progress::bar(self.test.len() as u64, "test", quiet);
        let (test_loss, test_acc) =
            batch::evaluate(session, &self.test, self.plan.batch_size, &pb)?;
        pb.finish_and_clear();
        Ok(EpochMetrics {
            epoch: epoch + 1,
            train_loss: loss_sum / seen.max(1) as f64,
            train_acc: correct as f64 / seen.max(1) as f64,
            test_loss,
            test_acc,
            seconds: t0.elapsed().as_secs_f64(),
            privacy: self
                .accounting
                .as_ref()
                .map(|acc| acc.epoch(epoch + 1))
                .transpose()?,
            integrity: IntegrityCount::of(&self.session),
            routes: EpochRoutes::of(&self.session),
        })
    }

    /// Saves the epoch: checkpoint, model weights, metrics.jsonl and curves.png.
    fn save(&mut self, m: EpochMetrics) -> Result<()> {
        let session = &mut self.session;
        session.sync_weights()?;
        let progress = Progress {
            epoch: m.epoch,
            step: session.step,
        };
        checkpoint::save(
            &self.out_dir.join(CHECKPOINT),
            session,
            &progress,
            &self.meta,
        )?;
        weights::save(&mut session.net, &self.out_dir.join(MODEL), &self.meta)?;
        self.history.push(m);
        write_metrics(&self.out_dir.join(METRICS), &self.history)?;
        let points: Vec<EpochPoint> = self
            .history
            .iter()
            .map(|h| EpochPoint {
                epoch: h.epoch,
                train_loss: h.train_loss,
                train_acc: h.train_acc,
                test_loss: h.test_loss,
                test_acc: h.test_acc,
            })
            .collect();
        let title = format!("{} on {}", self.spec.name(), self.plan.dataset);
        if let Err(e) = plot::training_curves(&self.out_dir.join(CURVES), &points, &title) {
            eprintln!("warning: could not draw {CURVES}: {e}");
        }
        Ok(())
    }
}

/// Loads the checkpoint in `out_dir` into `session`; returns the epochs it holds, which must be fewer than
/// `epochs`. The schedule is sized for the new total.
fn resume(
    session: &mut Session,
    plan: &Plan,
    out_dir: &Path,
    steps_per_epoch: u64,
    epochs: usize,
) -> Result<usize> {
    let (progress, _) = checkpoint::load(&out_dir.join(CHECKPOINT), session)?;
    if progress.epoch >= epochs {
        bail!(
            "{} already holds {} epoch(s); pass a larger --epochs to continue",
            out_dir.display(),
            progress.epoch
        );
    }
    session.config.schedule = plan.schedule.per_step(steps_per_epoch, epochs);
    Ok(progress.epoch)
}

/// Runs `asymml train`.
pub fn run(a: TrainArgs) -> Result<()> {
    let threads = threads::init(a.common.run.threads)?;
    threads::in_pool(threads, || train(a, threads))
}

/// `asymml train` on a worker of the pool of `threads` ([`threads::in_pool`]).
fn train(a: TrainArgs, threads: usize) -> Result<()> {
    let json = a.common.run.json;
    let mut t = Training::prepare(&a, threads)?;
    if !json {
        let mut banner = t.banner(threads);
        if t.session.mode == asymml_trusted::Mode::Split {
            // Which rank policy splits the convs (the default `guard` keeps image-like maps trusted).
            let split = &a.common.run.split;
            if let Some(rank) = split.rank.first() {
                banner.push_str(&format!(", --rank {rank}"));
            }
            if let Ok(svd) = crate::values::svd_method(split.svd, split.svd_iters) {
                banner.push_str(&format!(", --svd {svd}"));
            }
        }
        eprintln!("{banner}");
    }
    let mut batch = Batch::new();
    for epoch in t.start_epoch..t.epochs {
        let m = match t.run_epoch(epoch, &mut batch, json) {
            Ok(m) => m,
            Err(e) => {
                // With --json, a failed run still ends with one machine-readable line (the error itself goes
                // to stderr as for every command).
                if json {
                    let line = serde_json::json!({
                        "error": format!("{e:#}"),
                        "epoch": epoch + 1,
                        "integrity": IntegrityCount::of(&t.session),
                    });
                    println!("{line}");
                }
                return Err(e);
            }
        };
        t.save(m.clone())?;
        print_epoch(&m, t.epochs, json)?;
    }
    if !json {
        if let Some(last) = t.history.last() {
            println!(
                "test accuracy {:.2}% after {} epoch(s); weights: {}, curves: {}",
                last.test_acc * 100.0,
                last.epoch,
                t.out_dir.join(MODEL).display(),
                t.out_dir.join(CURVES).display()
            );
        }
        if let Some(acc) = &t.accounting {
            acc.print(t.epochs, t.resumed)?;
        }
    }
    Ok(())
}

/// The epoch's line on stdout: JSON, or text.
fn print_epoch(m: &EpochMetrics, epochs: usize, json: bool) -> Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string(m)?)?;
    } else {
        writeln!(
            out,
            "epoch {}/{}  train loss {:.4} acc {:.2}%  test loss {:.4} acc {:.2}%  ({:.1} s)",
            m.epoch,
            epochs,
            m.train_loss,
            m.train_acc * 100.0,
            m.test_loss,
            m.test_acc * 100.0,
            m.seconds
        )?;
        if let Some(r) = &m.routes {
            writeln!(out, "{}", r.line())?;
        }
        if let Some(p) = &m.privacy {
            let eps = p.eps.map_or("∞".into(), |e| format!("{e:.4e}"));
            writeln!(
                out,
                "  privacy: ε = {eps} at δ = {} after {} release(s) per example (local DP of X_U; ∇Y not covered)",
                accounting::fmt_delta(p.delta),
                p.releases_per_example
            )?;
        }
    }
    out.flush()?;
    Ok(())
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
