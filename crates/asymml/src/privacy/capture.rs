//! The streams: each conv's input X in the trusted runtime, and what the split runtime really sends to the
//! accelerator (X_U per conv, ∇Y of the first conv), taken from a recording of its messages. Images go through
//! a fresh copy of the model in batches, as in training.

use super::plan::Model;
use anyhow::{Context, Result};
use asymml_core::layers::Conv2d;
use asymml_core::models::{ConvExec, Net};
use asymml_core::{CoreError, Tensor};
use asymml_protocol::recording::Transcript;
use asymml_protocol::{inproc_pair, Direction, MessageKind, Recording};
use asymml_trusted::split::{SplitConfig, SplitExec};
use asymml_untrusted::Service;
use std::collections::BTreeMap;

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
fn batch_conv_inputs(net: &mut Net, x: &Tensor) -> Result<Vec<Tensor>> {
    let mut exec = CaptureExec { inputs: Vec::new() };
    net.forward(x, true, &mut exec)
        .context("forward pass of the trusted runtime")?;
    Ok(exec
        .inputs
        .into_iter()
        .map(|t| t.unwrap_or_default())
        .collect())
}

/// Every conv's input for the images `x` (training-mode forward, batches of `batch`).
pub(crate) fn conv_inputs(model: &Model, x: &Tensor, batch: usize) -> Result<Vec<Tensor>> {
    conv_inputs_kept(model, x, batch, None, |_| Ok(()))
}

/// The inputs of the convs in `keep` (every conv with `None`; the others are empty tensors) for the images
/// `x`, in batches of `batch`; `each_batch` sees every conv's input of each batch before the batch is dropped
/// (so that per-sample measures of every layer need not hold every layer of every image).
pub(crate) fn conv_inputs_kept(
    model: &Model,
    x: &Tensor,
    batch: usize,
    keep: Option<&[usize]>,
    mut each_batch: impl FnMut(&[Tensor]) -> Result<()>,
) -> Result<Vec<Tensor>> {
    let n = x.shape[0];
    let mut per_layer: Vec<Gathered> = Vec::new();
    for start in (0..n).step_by(batch.max(1)) {
        let idx: Vec<usize> = (start..(start + batch).min(n)).collect();
        let mut net = model.lease()?;
        let inputs = batch_conv_inputs(&mut net, &rows(x, &idx))?;
        drop(net);
        each_batch(&inputs)?;
        per_layer.resize_with(inputs.len(), Gathered::default);
        for (l, t) in inputs.into_iter().enumerate() {
            if keep.is_none_or(|k| k.contains(&l)) {
                per_layer[l].put(t, start, n)?;
            }
        }
    }
    Ok(per_layer.into_iter().map(Gathered::done).collect())
}

/// Batches [b, ...] gathered into one [n, ...] tensor allocated once, at the first batch (no list of parts
/// copied again at the end: the peak is the result, not twice it).
#[derive(Default)]
struct Gathered {
    out: Option<Tensor>,
    /// Rows written so far.
    rows: usize,
}

impl Gathered {
    /// Writes the rows of `part` ([b, ...]) at row `start` of an [n, ...] result; an empty part (nothing
    /// recorded) leaves the result as it is.
    fn put(&mut self, part: Tensor, start: usize, n: usize) -> Result<()> {
        let Some(&b) = part.shape.first() else {
            return Ok(());
        };
        if b == 0 {
            return Ok(());
        }
        let per = part.len() / b;
        let out = self.out.get_or_insert_with(|| {
            let mut shape = part.shape.clone();
            shape[0] = n;
            Tensor::zeros(&shape)
        });
        anyhow::ensure!(
            out.shape[1..] == part.shape[1..] && start + b <= n,
            "privacy capture: batch shape {:?} differs from {:?}",
            part.shape,
            out.shape
        );
        out.data[start * per..(start + b) * per].copy_from_slice(&part.data);
        self.rows = self.rows.max(start + b);
        Ok(())
    }

    /// The gathered tensor, cut to the rows written (empty when nothing was).
    fn done(self) -> Tensor {
        let Some(mut t) = self.out else {
            return Tensor::default();
        };
        let per = t.len() / t.shape[0].max(1);
        t.shape[0] = self.rows;
        t.data.truncate(self.rows * per);
        t
    }
}

/// What to record of the split runtime for a set of images.
pub(crate) struct StreamRequest<'a> {
    /// The split's settings; `split.seed` seeds the first batch, and each further batch gets its own seed.
    pub split: SplitConfig,
    /// Images per batch.
    pub batch: usize,
    /// The conv layers whose X_U is kept.
    pub layers: &'a [usize],
    /// Also run the backward pass (for ∇Y of the first conv).
    pub backward: bool,
}

/// What crossed the boundary for a set of images, batch after batch.
pub(crate) struct Streams {
    /// X_U of the requested layers, as sent (noise included); empty for a conv that reads a shared residual.
    pub x_u: BTreeMap<usize, Tensor>,
    /// ∇Y of the first conv, as sent (empty without the backward pass).
    pub dy0: Tensor,
    /// The largest rank r of every conv over the batches.
    pub ranks: Vec<usize>,
}

/// What the split runtime sent for the images `x` (with their `labels`), in batches. A forward-only request
/// stops each pass after the last requested conv (the later convs' ranks are then 0): see [`streams_full`].
pub(crate) fn streams(
    model: &Model,
    x: &Tensor,
    labels: &[usize],
    req: &StreamRequest,
) -> Result<Streams> {
    streams_depth(model, x, labels, req, false)
}

/// As [`streams`], but every forward pass runs through the whole network (every conv's rank is known).
pub(crate) fn streams_full(
    model: &Model,
    x: &Tensor,
    labels: &[usize],
    req: &StreamRequest,
) -> Result<Streams> {
    streams_depth(model, x, labels, req, true)
}

fn streams_depth(
    model: &Model,
    x: &Tensor,
    labels: &[usize],
    req: &StreamRequest,
    full: bool,
) -> Result<Streams> {
    let n = x.shape[0];
    let mut x_u: BTreeMap<usize, Gathered> = BTreeMap::new();
    let mut dy = Gathered::default();
    let mut ranks: Vec<usize> = Vec::new();
    for (bi, start) in (0..n).step_by(req.batch).enumerate() {
        let idx: Vec<usize> = (start..(start + req.batch).min(n)).collect();
        let mut net = model.lease()?;
        let split = SplitConfig {
            seed: req.split.seed ^ (bi as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            ..req.split.clone()
        };
        let labels = &labels[start..start + idx.len()];
        let s = batch_streams(
            &mut net,
            &rows(x, &idx),
            labels,
            split,
            req.layers,
            req.backward || full,
            req.backward,
        )?;
        ranks.resize(s.ranks.len(), 0);
        ranks
            .iter_mut()
            .zip(&s.ranks)
            .for_each(|(a, b)| *a = (*a).max(*b));
        for (l, t) in s.x_u.into_iter().enumerate() {
            if req.layers.contains(&l) {
                x_u.entry(l).or_default().put(t, start, n)?;
            }
        }
        dy.put(s.dy0, start, n)?;
    }
    Ok(Streams {
        x_u: x_u.into_iter().map(|(l, g)| (l, g.done())).collect(),
        dy0: dy.done(),
        ranks,
    })
}

/// What crossed the boundary in one training step of the split runtime.
struct BatchStreams {
    /// X_U by conv id, as sent (noise included); empty for a conv that reads a shared residual.
    x_u: Vec<Tensor>,
    /// ∇Y of the first conv, as sent (empty when not asked).
    dy0: Tensor,
    /// The rank r of each conv.
    ranks: Vec<usize>,
}

/// A conv's input shape, where it was seen.
type InputShape = Option<Vec<usize>>;

/// What one step recorded: each conv's rank, the input shapes of the convs on the trusted route, X_U by conv
/// id and ∇Y of the first conv.
type Recorded = (Vec<usize>, Vec<InputShape>, Vec<Tensor>, Tensor);

/// A split executor that also notes each conv's input shape (by conv id), and after each conv keeps only
/// the recorded messages asked for (so that the transcript never holds a whole step's traffic).
struct Shapes<'a, E: ConvExec> {
    inner: E,
    trusted: Vec<InputShape>,
    transcript: Transcript,
    /// The convs whose X_U is kept.
    layers: &'a [usize],
    /// X_U by conv id, as sent.
    x_u: Vec<Tensor>,
    /// ∇Y of the first conv, as sent.
    dy0: Tensor,
    /// Stop the forward pass (with [`STOP`]) at the first conv after this one.
    stop_after: Option<usize>,
    stopped: bool,
}

/// The message of the error that ends a forward pass early on purpose (see [`Shapes::stop_after`]).
const STOP: &str = "privacy capture: the requested layers are recorded";

impl<E: ConvExec> Shapes<'_, E> {
    fn note(&mut self, conv: &Conv2d, x: &Tensor) -> asymml_core::Result<()> {
        if self.stop_after.is_some_and(|s| conv.id > s) {
            self.stopped = true;
            return Err(CoreError::Invalid(STOP.into()));
        }
        if self.trusted.len() <= conv.id {
            self.trusted.resize(conv.id + 1, None);
        }
        self.trusted[conv.id] = Some(x.shape.clone());
        Ok(())
    }

    /// Takes what the transcript recorded since the last call and keeps X_U of the requested convs and ∇Y of
    /// the first conv.
    fn collect(&mut self) -> asymml_core::Result<()> {
        for r in self.transcript.take() {
            if r.direction != Direction::Sent {
                continue;
            }
            let layer = r.layer.unwrap_or(u32::MAX) as usize;
            for t in r.tensors {
                let keep = match (r.kind, t.field) {
                    (Some(MessageKind::ConvForward), "x_u") => self.layers.contains(&layer),
                    (Some(MessageKind::ConvBackward | MessageKind::ConvInputGrad), "dy") => {
                        layer == 0
                    }
                    _ => false,
                };
                if !keep {
                    continue;
                }
                let tensor = Tensor::from_vec(&t.shape, t.data)?;
                if r.kind == Some(MessageKind::ConvForward) {
                    if self.x_u.len() <= layer {
                        self.x_u.resize(layer + 1, Tensor::default());
                    }
                    self.x_u[layer] = tensor;
                } else {
                    self.dy0 = tensor;
                }
            }
        }
        Ok(())
    }
}

impl<E: ConvExec> ConvExec for Shapes<'_, E> {
    fn conv_forward(
        &mut self,
        conv: &mut Conv2d,
        x: &Tensor,
        y: &mut Tensor,
        train: bool,
    ) -> asymml_core::Result<()> {
        self.note(conv, x)?;
        self.inner.conv_forward(conv, x, y, train)?;
        self.collect()
    }

    fn conv_forward_same_input(
        &mut self,
        conv: &mut Conv2d,
        x: &Tensor,
        y: &mut Tensor,
        train: bool,
        same_input_as: usize,
    ) -> asymml_core::Result<()> {
        self.note(conv, x)?;
        self.inner
            .conv_forward_same_input(conv, x, y, train, same_input_as)?;
        self.collect()
    }

    fn conv_backward(
        &mut self,
        conv: &mut Conv2d,
        x: &Tensor,
        dy: &Tensor,
        dx: Option<&mut Tensor>,
    ) -> asymml_core::Result<()> {
        self.inner.conv_backward(conv, x, dy, dx)?;
        self.collect()
    }

    fn backward_end(&mut self, net: &mut Net) -> asymml_core::Result<()> {
        self.inner.backward_end(net)?;
        self.collect()
    }

    fn step_end(&mut self) {
        self.inner.step_end()
    }
}

/// Runs one forward (and, with `backward`, one backward) pass of the split runtime on `x`, with an in-process
/// accelerator behind a recording transport, and returns what the recording saw leave the trusted side: X_U of
/// the convs in `layers` and ∇Y of the first conv. Unless `full`, a forward-only pass stops after the last
/// conv of `layers` (nothing later is recorded, and later convs report rank 0).
fn batch_streams(
    net: &mut Net,
    x: &Tensor,
    labels: &[usize],
    cfg: SplitConfig,
    layers: &[usize],
    full: bool,
    backward: bool,
) -> Result<BatchStreams> {
    let (client, server) = inproc_pair();
    let service = std::thread::spawn(move || -> Result<()> {
        // All cores: the trusted side waits while the accelerator computes.
        let mut s = Service::new(0).context("starting the accelerator")?;
        s.serve(server).context("the accelerator")
    });
    let rec = Recording::new(client);
    let transcript = rec.transcript();
    let stop_after = if full || backward {
        None
    } else {
        layers.iter().copied().max()
    };
    let run = (|| -> Result<Recorded> {
        let split = SplitExec::connect(rec, net, cfg)?;
        let stats = split.stats();
        // Registration carries only the public weights: drop it before the step.
        transcript.take();
        let mut exec = Shapes {
            inner: split,
            trusted: Vec::new(),
            transcript: transcript.clone(),
            layers,
            x_u: Vec::new(),
            dy0: Tensor::default(),
            stop_after,
            stopped: false,
        };
        if backward {
            // Only a backward pass writes gradients: a forward-only capture leaves them untouched (never
            // resident, over 500 MB for VGG16).
            net.zero_grad();
        }
        match net.forward_loss(x, labels, true, &mut exec) {
            Ok(_) => {}
            Err(_) if exec.stopped => {}
            Err(e) => return Err(e.into()),
        }
        if backward {
            net.backward(&mut exec, false)?;
        }
        let ranks = exec.inner.ranks().into_iter().map(|(_, r)| r).collect();
        // The convs run wholly in the trusted runtime, with their input's shape: nothing of it was sent.
        let routed = stats
            .lock()
            .map_err(|_| anyhow::anyhow!("split counters poisoned"))?
            .layers
            .iter()
            .map(|l| l.trusted_route)
            .collect::<Vec<_>>();
        let trusted = exec
            .trusted
            .iter()
            .enumerate()
            .map(|(l, s)| {
                s.clone()
                    .filter(|_| routed.get(l).copied().unwrap_or(false))
            })
            .collect();
        exec.collect()?;
        let (x_u, dy0) = (std::mem::take(&mut exec.x_u), std::mem::take(&mut exec.dy0));
        exec.inner.shutdown()?;
        transcript.take();
        Ok((ranks, trusted, x_u, dy0))
    })();
    let joined = service
        .join()
        .map_err(|_| anyhow::anyhow!("the accelerator thread panicked"))?;
    let (ranks, trusted, sent, dy0) = run.context("split runtime")?;
    joined?;
    let mut x_u = vec![Tensor::default(); ranks.len()];
    for (l, t) in sent.into_iter().enumerate() {
        if let Some(slot) = x_u.get_mut(l) {
            *slot = t;
        }
    }
    // A conv on the fully-trusted route sent nothing: what the accelerator saw of its input is all zeros.
    for (l, shape) in trusted.into_iter().enumerate() {
        if let (Some(shape), Some(t)) = (shape, x_u.get_mut(l)) {
            if layers.contains(&l) {
                *t = Tensor::zeros(&shape);
            }
        }
    }
    Ok(BatchStreams { x_u, dy0, ranks })
}

/// Rows `idx` of a [n, ...] tensor.
pub(crate) fn rows(t: &Tensor, idx: &[usize]) -> Tensor {
    let n = t.shape.first().copied().unwrap_or(0);
    let per = t.len().checked_div(n).unwrap_or(0);
    let mut shape = t.shape.clone();
    if let Some(s) = shape.first_mut() {
        *s = idx.len();
    }
    let mut data = Vec::with_capacity(idx.len() * per);
    for &i in idx {
        data.extend_from_slice(&t.data[i * per..(i + 1) * per]);
    }
    Tensor { shape, data }
}
