//! The privacy–accuracy trade-off (the paper's Fig. 7): the model trained in split mode once per noise level,
//! its test accuracy beside the leakage of the first conv's X_U at that noise level.

use crate::cli::{PrivacyArgs, SplitArgs};
use crate::common::{self, Batch};
use crate::data::{self, epoch_order, DatasetKind};
use anyhow::Result;
use asymml_core::models::ModelSpec;
use asymml_core::optim::{LrSchedule, OptimizerKind};
use asymml_core::rng::Rng;
use asymml_trusted::{Mode, TrainConfig};
use serde::Serialize;

/// Leakage of one (policy, nsr) setting: (rel_mi, Linfoot) at the first conv, (rel_mi, layer) at its worst.
#[derive(Clone, Debug, Default)]
pub struct Leakage {
    pub policy: String,
    pub nsr: f32,
    pub first: Option<(f64, f64)>,
    pub max: Option<(f64, usize)>,
}

/// One training run of the trade-off.
#[derive(Clone, Debug, Serialize)]
pub struct TradeoffEntry {
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

/// Trains `spec` from the same initial weights once per `--nsr` (SGD, momentum 0.9, lr 0.05, weight decay
/// 5e-4, cosine schedule) on the dataset's training split and evaluates it on the test split.
pub fn run(
    a: &PrivacyArgs,
    spec: &ModelSpec,
    leakage: &[Leakage],
    threads: usize,
    quiet: bool,
) -> Result<Vec<TradeoffEntry>> {
    let kind: DatasetKind = a.dataset.parse()?;
    let (train, test) = data::load(
        kind,
        a.data_dir.as_deref(),
        spec.in_ch,
        spec.input_size,
        a.seed,
    )?;
    let train = common::fit_to(train, spec.input_size);
    let test = common::fit_to(test, spec.input_size);
    common::check_fit(spec, &train, "training")?;
    let train = match a.tradeoff_train {
        Some(n) => train.select(&(0..n.min(train.len())).collect::<Vec<_>>()),
        None => train,
    };
    let steps_per_epoch = train.len().div_ceil(a.batch_size) as u64;
    let mut out = Vec::new();
    for &nsr in &a.nsr {
        let start = std::time::Instant::now();
        let net = spec.build(a.seed)?;
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
        let split = SplitArgs {
            rank: a.tradeoff_rank.clone(),
            svd_iters: a.svd_iters,
            noise: nsr,
            accelerator: "inproc".into(),
            accelerator_threads: None,
            accelerator_device: None,
            shared_basis: a.shared_basis,
        };
        let (mut session, _handle) =
            common::make_session(net, config, Mode::Split, &split, threads, a.seed)?;
        let mut rng = Rng::new(a.seed ^ 0x7EAD);
        let mut batch = Batch::new();
        let pb = common::progress(
            steps_per_epoch * a.tradeoff_epochs as u64,
            &format!("trade-off, nsr {nsr}"),
            quiet,
        );
        for epoch in 0..a.tradeoff_epochs {
            let order = epoch_order(train.len(), &mut rng);
            for (i, idx) in order.chunks(a.batch_size).enumerate() {
                batch.fill(&train, idx, None, &mut rng);
                session.train_step(&batch.x, &batch.labels, epoch + 1, i)?;
                pb.inc(1);
            }
        }
        pb.finish_and_clear();
        let pb = common::progress(test.len() as u64, "evaluating", quiet);
        let (test_loss, test_acc) = common::evaluate(&mut session, &test, a.batch_size, &pb)?;
        pb.finish_and_clear();
        let lk = leakage
            .iter()
            .find(|l| l.policy == a.tradeoff_rank && l.nsr == nsr);
        out.push(TradeoffEntry {
            nsr,
            rank_policy: a.tradeoff_rank.clone(),
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
