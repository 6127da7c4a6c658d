//! The privacy–accuracy trade-off (the paper's Fig. 7): the model trained in split mode once per noise level,
//! its test accuracy beside the leakage of the first conv's X_U at that noise level.

use super::measure::Setting;
use super::plan::Plan;
use crate::batch::{self, check_fit, fit_to, Batch};
use crate::data::{self, epoch_order, Dataset};
use crate::progress;
use crate::setup::{self, SplitSetup};
use anyhow::Result;
use asymml_core::optim::{LrSchedule, OptimizerKind};
use asymml_core::rng::Rng;
use asymml_trusted::{Mode, TrainConfig};
use serde::Serialize;

/// Leakage of one (policy, nsr) setting: (rel_mi, Linfoot) at the first conv, (rel_mi, layer) at its worst.
#[derive(Clone, Debug, Default)]
pub(crate) struct Leakage {
    pub policy: String,
    pub nsr: f32,
    pub first: Option<(f64, f64)>,
    pub max: Option<(f64, usize)>,
}

/// One training run of the trade-off.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct TradeoffEntry {
    pub nsr: f32,
    pub rank_policy: String,
    pub epochs: usize,
    pub train_images: usize,
    pub test_images: usize,
    pub test_acc: f64,
    pub test_loss: f64,
    /// rel_mi and Linfoot coefficient of X_U at the first conv for this policy and noise (when measured).
    pub rel_mi: Option<f64>,
    pub linfoot: Option<f64>,
    /// The largest rel_mi of X_U over the measured convs, and that conv.
    pub max_rel_mi: Option<f64>,
    pub max_rel_mi_layer: Option<usize>,
    pub seconds: f64,
}

/// Leakage of X_U by (policy, nsr): at the first conv, and the largest over the measured convs with its layer.
pub(crate) fn leakage_of(settings: &[Setting]) -> Vec<Leakage> {
    let mut out: Vec<Leakage> = Vec::new();
    for s in settings
        .iter()
        .filter(|s| s.stream == "x_u" && s.rel_mi.is_finite())
    {
        let i = match out
            .iter()
            .position(|l| l.policy == s.rank_policy && l.nsr == s.nsr)
        {
            Some(i) => i,
            None => {
                out.push(Leakage {
                    policy: s.rank_policy.clone(),
                    nsr: s.nsr,
                    ..Default::default()
                });
                out.len() - 1
            }
        };
        let l = &mut out[i];
        if s.layer == 0 {
            l.first = Some((s.rel_mi, s.linfoot));
        }
        if l.max.is_none_or(|(m, _)| s.rel_mi > m) {
            l.max = Some((s.rel_mi, s.layer));
        }
    }
    out
}

/// Trains the plan's model from the same initial weights once per `--nsr` (SGD, momentum 0.9, lr 0.05,
/// weight decay 5e-4, cosine schedule) on the dataset's training split and evaluates it on the test split;
/// `leakage` (from [`leakage_of`]) gives each run the leakage measured at its policy and noise.
pub(crate) fn run(plan: &Plan, leakage: &[Leakage]) -> Result<Vec<TradeoffEntry>> {
    let a = &plan.args;
    let (train, test) = load(plan)?;
    let mut out = Vec::new();
    for &nsr in &a.nsr {
        let start = std::time::Instant::now();
        let (test_loss, test_acc) = train_and_evaluate(plan, nsr, &train, &test)?;
        let lk = leakage
            .iter()
            .find(|l| l.policy == a.tradeoff_rank.text && l.nsr == nsr);
        out.push(TradeoffEntry {
            nsr,
            rank_policy: a.tradeoff_rank.text.clone(),
            epochs: a.tradeoff_epochs,
            train_images: train.len(),
            test_images: test.len(),
            test_acc,
            test_loss,
            rel_mi: lk.and_then(|l| l.first.map(|f| f.0)),
            linfoot: lk.and_then(|l| l.first.map(|f| f.1)),
            max_rel_mi: lk.and_then(|l| l.max.map(|m| m.0)),
            max_rel_mi_layer: lk.and_then(|l| l.max.map(|m| m.1)),
            seconds: start.elapsed().as_secs_f64(),
        });
    }
    Ok(out)
}

/// The dataset's training split (its first `--tradeoff-train` images) and test split, at the model's size.
fn load(plan: &Plan) -> Result<(Dataset, Dataset)> {
    let (a, spec) = (&plan.args, &plan.model.spec);
    let (train, test) = data::load(
        a.dataset,
        a.data_dir.as_deref(),
        spec.in_ch,
        spec.input_size,
        a.seed,
    )?;
    let train = fit_to(train, spec.input_size);
    let test = fit_to(test, spec.input_size);
    check_fit(spec, &train, "training")?;
    let train = match a.tradeoff_train {
        Some(n) => train.select(&(0..n.min(train.len())).collect::<Vec<_>>()),
        None => train,
    };
    Ok((train, test))
}

/// One trade-off run: the model trained in split mode at noise level `nsr`; its (test loss, test accuracy).
fn train_and_evaluate(
    plan: &Plan,
    nsr: f32,
    train: &Dataset,
    test: &Dataset,
) -> Result<(f64, f64)> {
    let (a, quiet) = (&plan.args, plan.args.json);
    let steps_per_epoch = train.len().div_ceil(a.batch_size) as u64;
    let net = plan.model.spec.build(a.seed)?;
    let config = TrainConfig {
        optimizer: OptimizerKind::Sgd {
            momentum: 0.9,
            nesterov: false,
        },
        lr: 0.05,
        weight_decay: 5e-4,
        schedule: LrSchedule::Cosine {
            total: steps_per_epoch * a.tradeoff_epochs as u64,
            min_lr: 0.0,
        },
    };
    let split = SplitSetup::inproc(plan.split(&a.tradeoff_rank, nsr, a.seed), plan.threads);
    let (mut session, _handle) = setup::make_session(net, config, Mode::Split, &split)?;
    let mut rng = Rng::new(a.seed ^ 0x7EAD);
    let mut batch = Batch::new();
    let pb = progress::bar(
        steps_per_epoch * a.tradeoff_epochs as u64,
        &format!("trade-off, nsr {nsr}"),
        quiet,
    );
    for epoch in 0..a.tradeoff_epochs {
        let order = epoch_order(train.len(), &mut rng);
        for (i, idx) in order.chunks(a.batch_size).enumerate() {
            batch.fill(train, idx, None, &mut rng);
            session.train_step(&batch.x, &batch.labels, epoch + 1, i)?;
            pb.inc(1);
        }
    }
    pb.finish_and_clear();
    let pb = progress::bar(test.len() as u64, "evaluating", quiet);
    let result = batch::evaluate(&mut session, test, a.batch_size, &pb)?;
    pb.finish_and_clear();
    Ok(result)
}
