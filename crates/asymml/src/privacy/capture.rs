//! The streams: each conv's input X in the trusted runtime, and what the split runtime really sends to the
//! accelerator (X_U per conv, ∇Y of the first conv), taken from a recording of its messages.

use anyhow::{Context, Result};
use asymml_core::decomp::RankPolicy;
use asymml_core::layers::Conv2d;
use asymml_core::models::{ConvExec, Net};
use asymml_core::optim::OptimizerKind;
use asymml_core::{CoreError, Tensor};
use asymml_protocol::{inproc_pair, Direction, MessageKind, Recording};
use asymml_trusted::split::{SplitConfig, SplitExec};
use asymml_untrusted::Service;

/// Computes every conv locally and keeps a copy of each conv's input (by conv id).
struct CaptureExec {
    inputs: Vec<Option<Tensor>>,
}

impl ConvExec for CaptureExec {
    fn conv_forward(
        &mut self,
        conv: &mut Conv2d,
        x: &Tensor,
        y: &mut Tensor,
        _train: bool,
    ) -> Result<(), CoreError> {
        if self.inputs.len() <= conv.id {
            self.inputs.resize(conv.id + 1, None);
        }
        self.inputs[conv.id] = Some(x.clone());
        conv.forward(x, y)
    }
    fn conv_backward(
        &mut self,
        conv: &mut Conv2d,
        x: &Tensor,
        dy: &Tensor,
        dx: Option<&mut Tensor>,
    ) -> Result<(), CoreError> {
        conv.backward(x, dy, dx)
    }
}

/// x: [B, C, H, W] → the input of every conv (by conv id) in a training-mode forward (batch statistics, as
/// the split runtime sees them in training).
pub fn conv_inputs(net: &mut Net, x: &Tensor) -> Result<Vec<Tensor>> {
    let mut exec = CaptureExec { inputs: Vec::new() };
    net.forward(x, true, &mut exec)
        .context("forward pass of the trusted runtime")?;
    Ok(exec
        .inputs
        .into_iter()
        .map(|t| t.unwrap_or_default())
        .collect())
}

/// What crossed the boundary in one training step of the split runtime.
pub struct Streams {
    /// X_U by conv id, as sent (noise included); empty for a conv that reads a shared residual.
    pub x_u: Vec<Tensor>,
    /// ∇Y of the first conv, as sent (empty when not asked).
    pub dy0: Tensor,
    /// The rank r of each conv.
    pub ranks: Vec<usize>,
}

/// Runs one forward (and, with `backward`, one backward) pass of the split runtime on `x`, with an in-process
/// accelerator behind a recording transport, and returns what the recording saw leave the trusted side.
#[allow(clippy::too_many_arguments)]
pub fn split_streams(
    net: &mut Net,
    x: &Tensor,
    labels: &[usize],
    policy: RankPolicy,
    nsr: f32,
    iters: usize,
    seed: u64,
    shared_basis: bool,
    backward: bool,
) -> Result<Streams> {
    let (client, server) = inproc_pair();
    let service = std::thread::spawn(move || -> Result<()> {
        let mut s = Service::new(1).map_err(|e| anyhow::anyhow!("accelerator: {e}"))?;
        s.serve(server)
            .map_err(|e| anyhow::anyhow!("accelerator: {e}"))
    });
    let rec = Recording::new(client);
    let transcript = rec.transcript();
    let cfg = SplitConfig {
        policy,
        iters,
        nsr,
        seed,
        shared_basis,
    };
    let sgd = OptimizerKind::Sgd {
        momentum: 0.0,
        nesterov: false,
    };
    let run = (|| -> Result<Vec<usize>> {
        let mut exec = SplitExec::connect(rec, net, sgd, 0.0, cfg)?;
        // Registration carries only the public weights: drop it before the step.
        transcript.take();
        net.zero_grad();
        net.forward_loss(x, labels, true, &mut exec)?;
        if backward {
            net.backward(&mut exec, false)?;
        }
        let ranks = exec.ranks().into_iter().map(|(_, r)| r).collect();
        exec.shutdown()?;
        Ok(ranks)
    })();
    let joined = service
        .join()
        .map_err(|_| anyhow::anyhow!("the accelerator thread panicked"))?;
    let ranks = run.context("split runtime")?;
    joined?;
    let mut x_u = vec![Tensor::default(); ranks.len()];
    let mut dy0 = Tensor::default();
    for r in transcript.take() {
        if r.direction != Direction::Sent {
            continue;
        }
        let layer = r.layer.unwrap_or(u32::MAX) as usize;
        for t in r.tensors {
            let tensor = || Tensor::from_vec(&t.shape, t.data.clone());
            match (r.kind, t.field) {
                (Some(MessageKind::ConvForward), "x_u") if layer < x_u.len() => {
                    x_u[layer] = tensor()?;
                }
                (Some(MessageKind::ConvBackward), "dy") if layer == 0 => dy0 = tensor()?,
                _ => {}
            }
        }
    }
    Ok(Streams { x_u, dy0, ranks })
}
