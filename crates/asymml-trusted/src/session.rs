//! A training/inference session: the network, its optimizer and learning-rate schedule, and the executor of
//! its convolutions.

use asymml_core::models::{ConvExec, LocalExec, Net};
use asymml_core::optim::{LrSchedule, Optimizer, OptimizerKind};
use asymml_core::{CoreError, Tensor};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Errors of the trusted runtime.
#[derive(Debug, Error)]
pub enum SessionError {
    #[error(transparent)]
    Core(#[from] CoreError),
    #[error("non-finite loss ({loss}) at epoch {epoch}, step {step}: training stopped (try a lower --lr)")]
    NonFinite {
        loss: f32,
        epoch: usize,
        step: usize,
    },
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    #[error("unknown mode '{0}'; available: split, trusted-only, untrusted-only")]
    UnknownMode(String),
}

/// Where each layer runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mode {
    /// AsymML: each conv input is split; the low-rank part stays trusted, the residual goes to the accelerator.
    Split,
    /// Every layer in the trusted runtime (the TEE-only baseline).
    TrustedOnly,
    /// Every layer on the accelerator (the GPU-only baseline; no privacy: the raw input leaves).
    UntrustedOnly,
}

impl std::str::FromStr for Mode {
    type Err = SessionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "trusted-only" => Ok(Mode::TrustedOnly),
            "split" => Ok(Mode::Split),
            "untrusted-only" => Ok(Mode::UntrustedOnly),
            other => Err(SessionError::UnknownMode(other.to_string())),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::TrustedOnly => "trusted-only",
            Mode::Split => "split",
            Mode::UntrustedOnly => "untrusted-only",
        })
    }
}

/// Optimizer, learning rate and schedule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub optimizer: OptimizerKind,
    pub lr: f32,
    pub weight_decay: f32,
    pub schedule: LrSchedule,
}

/// The network plus everything needed to train it.
pub struct Session {
    pub net: Net,
    pub opt: Optimizer,
    pub config: TrainConfig,
    pub mode: Mode,
    /// Optimizer steps taken so far (drives the schedule).
    pub step: u64,
    exec: Box<dyn ConvExec + Send>,
    split_stats: Option<std::sync::Arc<std::sync::Mutex<crate::split::SplitStats>>>,
    remote: Option<Box<dyn crate::remote::RemoteNet>>,
}

impl Session {
    /// A session whose convolutions run locally (trusted-only).
    pub fn new(net: Net, config: TrainConfig, mode: Mode) -> Self {
        Self::with_exec(net, config, mode, Box::new(LocalExec))
    }

    /// A session whose convolutions run through `exec` (the split runtime passes its executor here).
    pub fn with_exec(
        net: Net,
        config: TrainConfig,
        mode: Mode,
        exec: Box<dyn ConvExec + Send>,
    ) -> Self {
        let opt = Optimizer::new(config.optimizer, config.weight_decay);
        Session {
            net,
            opt,
            config,
            mode,
            step: 0,
            exec,
            split_stats: None,
            remote: None,
        }
    }

    /// Replaces the convolution executor (used for timing).
    pub fn set_exec(&mut self, exec: Box<dyn ConvExec + Send>) {
        self.exec = exec;
        self.split_stats = None;
    }

    /// Makes `exec` the convolution executor and keeps a handle on its boundary counters.
    pub fn set_split_exec<T: asymml_protocol::Transport + Send + 'static>(
        &mut self,
        exec: crate::split::SplitExec<T>,
    ) {
        let stats = exec.stats();
        self.exec = Box::new(exec);
        self.split_stats = Some(stats);
    }

    /// Runs the whole network through `remote` (untrusted-only mode).
    pub fn set_remote(&mut self, remote: Box<dyn crate::remote::RemoteNet>) {
        self.remote = Some(remote);
    }

    /// Seconds the untrusted-only session has waited for the accelerator.
    pub fn remote_wait_s(&self) -> Option<f64> {
        self.remote.as_ref().map(|r| r.wait_s())
    }

    /// Brings the local copy of the weights up to date (untrusted-only mode keeps them on the accelerator);
    /// call before saving weights or a checkpoint.
    pub fn sync_weights(&mut self) -> Result<(), SessionError> {
        if let Some(r) = self.remote.as_mut() {
            r.sync(&mut self.net)?;
        }
        Ok(())
    }

    /// The split executor's counters (bytes each way, waiting time), when the session is split.
    pub fn split_stats(
        &self,
    ) -> Option<std::sync::Arc<std::sync::Mutex<crate::split::SplitStats>>> {
        self.split_stats.clone()
    }

    /// The convolution executor.
    pub fn exec_mut(&mut self) -> &mut (dyn ConvExec + Send) {
        self.exec.as_mut()
    }

    /// Learning rate of the next step.
    pub fn lr(&self) -> f32 {
        self.config.schedule.lr(self.config.lr, self.step)
    }

    /// One training step on a batch x: [B, C, H, W] with labels: returns (mean loss, number correct).
    /// `epoch`/`batch` only label the error if the loss is not finite (then no update is made).
    pub fn train_step(
        &mut self,
        x: &Tensor,
        labels: &[usize],
        epoch: usize,
        batch: usize,
    ) -> Result<(f32, usize), SessionError> {
        if let Some(remote) = self.remote.as_mut() {
            let logits = remote.forward(x, true)?;
            let loss = self.net.loss.forward(&logits, labels)?;
            if !loss.is_finite() {
                return Err(SessionError::NonFinite {
                    loss,
                    epoch,
                    step: batch,
                });
            }
            let mut g = Tensor::default();
            self.net.loss.backward(&mut g);
            remote.backward(&g)?;
            remote.step(self.config.schedule.lr(self.config.lr, self.step))?;
            self.step += 1;
            return Ok((loss, self.net.loss.correct()));
        }
        self.net.zero_grad();
        let (loss, correct) = self.net.forward_loss(x, labels, true, self.exec.as_mut())?;
        if !loss.is_finite() {
            return Err(SessionError::NonFinite {
                loss,
                epoch,
                step: batch,
            });
        }
        self.net.backward(self.exec.as_mut(), false)?;
        let lr = self.lr();
        self.opt.begin_step();
        let opt = &mut self.opt;
        let mut i = 0;
        self.net.visit_params(&mut |_, p| {
            opt.update(i, p, lr);
            i += 1;
        });
        self.exec.after_update(&mut self.net)?;
        self.exec.step_end();
        self.step += 1;
        Ok((loss, correct))
    }

    /// Evaluation on a batch (running BN statistics, no dropout): (mean loss, number correct).
    pub fn eval_batch(
        &mut self,
        x: &Tensor,
        labels: &[usize],
    ) -> Result<(f32, usize), SessionError> {
        if let Some(remote) = self.remote.as_mut() {
            let logits = remote.forward(x, false)?;
            let loss = self.net.loss.forward(&logits, labels)?;
            return Ok((loss, self.net.loss.correct()));
        }
        let out = self
            .net
            .forward_loss(x, labels, false, self.exec.as_mut())?;
        self.exec.step_end();
        Ok(out)
    }

    /// Class probabilities [B, K] for a batch, in evaluation mode.
    pub fn predict(&mut self, x: &Tensor) -> Result<Tensor, SessionError> {
        let mut probs = match self.remote.as_mut() {
            Some(remote) => remote.forward(x, false)?,
            None => {
                let probs = self.net.forward(x, false, self.exec.as_mut())?.clone();
                self.exec.step_end();
                probs
            }
        };
        let k = probs.shape[1];
        for row in probs.data.chunks_mut(k) {
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0f64;
            for v in row.iter_mut() {
                *v = (*v - max).exp();
                sum += *v as f64;
            }
            row.iter_mut().for_each(|v| *v = (*v as f64 / sum) as f32);
        }
        Ok(probs)
    }
}
