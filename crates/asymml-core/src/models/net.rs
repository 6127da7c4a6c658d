//! The network container: an ordered list of named nodes, their activations and gradients.

use super::resnet::BasicBlock;
use super::spec::ModelSpec;
use crate::error::{CoreError, Result};
use crate::layers::fused;
use crate::layers::loss::SoftmaxCrossEntropy;
use crate::layers::{
    AdaptiveAvgPool2d, AvgPool2d, BatchNorm2d, ChannelMap, Conv2d, Dropout, Linear, MaxPool2d,
    Param, Relu,
};
use crate::rng::Rng;
use crate::tensor::Tensor;
use std::ops::Range;

/// Runs convolutions. The trusted-only runtime computes them in place ([`LocalExec`]); the split runtime
/// decomposes the input and sends the residual across the boundary.
pub trait ConvExec {
    /// x: [B, C, H, W] → y: [B, M, OH, OW].
    fn conv_forward(
        &mut self,
        conv: &mut Conv2d,
        x: &Tensor,
        y: &mut Tensor,
        train: bool,
    ) -> Result<()>;
    /// As [`ConvExec::conv_forward`], for a conv that reads the very input that conv `same_input_as` read in
    /// the call just before (a ResNet block's downsample shortcut reads the block's input, as its conv1 does):
    /// the executor may reuse the work it did on that input. The default ignores the hint.
    fn conv_forward_same_input(
        &mut self,
        conv: &mut Conv2d,
        x: &Tensor,
        y: &mut Tensor,
        train: bool,
        same_input_as: usize,
    ) -> Result<()> {
        let _ = same_input_as;
        self.conv_forward(conv, x, y, train)
    }
    /// An inference forward of `conv` whose output goes next through BatchNorm's inference map `map`: the
    /// executor may apply the map as it writes `y` (returns true: `y` holds the map's output), or not (false:
    /// `y` holds the conv's output, and BatchNorm runs as usual). The split runtime applies it in the pass that
    /// checks the accelerator's part and adds it to its own, so BatchNorm's pass over the output is saved. The
    /// default runs [`ConvExec::conv_forward`] and does not.
    fn conv_forward_mapped(
        &mut self,
        conv: &mut Conv2d,
        x: &Tensor,
        y: &mut Tensor,
        map: ChannelMap<'_>,
    ) -> Result<bool> {
        let _ = map;
        self.conv_forward(conv, x, y, false)?;
        Ok(false)
    }
    /// x: [B, C, H, W], dy: [B, M, OH, OW] → dx (if asked); accumulates the conv's ∇W (and ∇b).
    fn conv_backward(
        &mut self,
        conv: &mut Conv2d,
        x: &Tensor,
        dy: &Tensor,
        dx: Option<&mut Tensor>,
    ) -> Result<()>;

    /// Called at the end of every backward of `net` (also when it failed: then its error is the one returned,
    /// and this one's is dropped): an executor that finished a conv's gradient after that conv's
    /// [`ConvExec::conv_backward`] returned (the split runtime's pipelined backward) completes it here.
    fn backward_end(&mut self, _net: &mut Net) -> Result<()> {
        Ok(())
    }

    /// Called after the optimizer has updated every parameter of `net` (conv weights included: the trusted
    /// runtime owns them); the split runtime sends the new conv weights to the accelerator.
    fn after_update(&mut self, _net: &mut Net) -> Result<()> {
        Ok(())
    }

    /// Called when a step has ended: a training step after [`ConvExec::after_update`], an evaluation or
    /// inference forward after its output. An executor that times whole steps (the split runtime's check of
    /// the whole step) stops its clock here, so that what runs between steps — another run's step, loading
    /// the next batch — is not counted to the step. A caller that never calls it leaves the clock running to
    /// the next step's first conv.
    fn step_end(&mut self) {}

    /// The parts (consecutive samples) an inference forward of a batch of `b` samples is to be streamed in:
    /// each part goes through the network on its own, and the parts' convs are interleaved so that one part's
    /// conv can be in flight while the next part is worked on ([`Net::forward`]). Fewer than two: the forward
    /// is not streamed (the default).
    fn stream_parts(&self, _b: usize) -> Vec<Range<usize>> {
        Vec::new()
    }

    /// Starts the inference forward of `conv` on one part of a streamed forward (x: that part's input
    /// [len, C, H, W]); `y` holds its output once [`ConvExec::conv_forward_finish`] of the same part has
    /// returned. Until then the executor may start other parts, of this conv and of later ones. The default
    /// computes the whole output now.
    fn conv_forward_begin(
        &mut self,
        conv: &mut Conv2d,
        x: &Tensor,
        y: &mut Tensor,
        _part: &StreamPart,
    ) -> Result<()> {
        self.conv_forward(conv, x, y, false)
    }

    /// Completes what [`ConvExec::conv_forward_begin`] started for `part` (called once, with the same
    /// tensors, before that part's next conv begins). The default has nothing left to do.
    fn conv_forward_finish(
        &mut self,
        _conv: &mut Conv2d,
        _x: &Tensor,
        _y: &mut Tensor,
        _part: &StreamPart,
    ) -> Result<()> {
        Ok(())
    }
}

/// One part of a streamed inference forward (see [`ConvExec::stream_parts`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamPart {
    /// The part's place among the parts (0 first).
    pub index: usize,
    /// Its samples in the batch.
    pub samples: Range<usize>,
    /// The batch's size.
    pub batch: usize,
}

/// Computes every convolution locally.
pub struct LocalExec;

impl ConvExec for LocalExec {
    fn conv_forward(
        &mut self,
        conv: &mut Conv2d,
        x: &Tensor,
        y: &mut Tensor,
        _train: bool,
    ) -> Result<()> {
        conv.forward(x, y)
    }
    fn conv_backward(
        &mut self,
        conv: &mut Conv2d,
        x: &Tensor,
        dy: &Tensor,
        dx: Option<&mut Tensor>,
    ) -> Result<()> {
        conv.backward(x, dy, dx)
    }
}

/// One layer of a network.
pub enum Layer {
    Conv(Conv2d),
    BatchNorm(BatchNorm2d),
    Relu(Relu),
    /// Max pooling; fused with the preceding ReLU when its `relu` flag is set.
    MaxPool(MaxPool2d),
    AvgPool(AvgPool2d),
    AdaptiveAvgPool(AdaptiveAvgPool2d),
    /// [B, C, H, W] → [B, C·H·W].
    Flatten,
    Linear(Linear),
    Dropout(Dropout),
    Block(Box<BasicBlock>),
}

impl Layer {
    /// The layer's kind in one lowercase word (`maxpool` also when it has a fused ReLU).
    pub fn kind(&self) -> &'static str {
        match self {
            Layer::Conv(_) => "conv",
            Layer::BatchNorm(_) => "batchnorm",
            Layer::Relu(_) => "relu",
            Layer::MaxPool(_) => "maxpool",
            Layer::AvgPool(_) => "avgpool",
            Layer::AdaptiveAvgPool(_) => "adaptiveavgpool",
            Layer::Flatten => "flatten",
            Layer::Linear(_) => "linear",
            Layer::Dropout(_) => "dropout",
            Layer::Block(_) => "block",
        }
    }
}

/// A layer with its torchvision name prefix (`features.3`, `layer2.1`, `fc`).
pub struct Node {
    pub name: String,
    pub layer: Layer,
}

/// A read-only view of one state-dict entry.
pub enum StateRef<'a> {
    Tensor(&'a Tensor),
    /// BatchNorm's `num_batches_tracked` (an int64 scalar in torchvision state dicts).
    Counter(i64),
}

/// A mutable view of one state-dict entry.
pub enum StateMut<'a> {
    Tensor(&'a mut Tensor),
    Counter(&'a mut i64),
}

/// A network, its activations (reused across steps) and its loss.
pub struct Net {
    pub spec: ModelSpec,
    pub nodes: Vec<Node>,
    /// acts[i] is the input of node i; acts[n] the logits.
    acts: Vec<Tensor>,
    grad_a: Tensor,
    grad_b: Tensor,
    /// ∇ of the loss w.r.t. the network input, filled by `backward(.., true)`.
    pub input_grad: Tensor,
    pub loss: SoftmaxCrossEntropy,
    pub rng: Rng,
    /// Seconds spent in each node, forward and backward, accumulated while profiling is on
    /// ([`Net::set_profiling`]).
    node_times: Option<Vec<NodeTime>>,
    /// Run BatchNorm → (ReLU+)MaxPool node pairs fused ([`crate::layers::fused`]); on by default.
    fuse: bool,
    /// fused[i]: the last forward ran nodes i and i + 1 as one fused pass (acts[i + 1] was not written).
    fused: Vec<bool>,
    /// A streamed forward's activations per part (as `acts`, for the part's samples), up to the node where the
    /// parts are gathered; empty after a forward that was not streamed (so non-empty: the last forward was
    /// streamed, and there is nothing to run a backward on).
    part_acts: Vec<Vec<Tensor>>,
    /// The last forward had a conv whose executor applied the BatchNorm after it
    /// ([`ConvExec::conv_forward_mapped`]): the conv's own output was not kept, so no backward can follow.
    mapped: bool,
}

/// Time spent in one node (see [`Net::set_profiling`]).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct NodeTime {
    pub forward_s: f64,
    pub backward_s: f64,
}

/// Calls `f` with the (name, tensor) state entries of a conv.
/// A fallible visitor of state-dict entries (see [`Net::try_visit_state`]).
pub type StateVisitor<'a, E> = dyn FnMut(String, StateMut) -> std::result::Result<(), E> + 'a;

pub(crate) fn conv_state<E>(
    prefix: &str,
    c: &mut Conv2d,
    f: &mut StateVisitor<'_, E>,
) -> std::result::Result<(), E> {
    f(
        format!("{prefix}.weight"),
        StateMut::Tensor(&mut c.weight.value),
    )?;
    if let Some(b) = c.bias.as_mut() {
        f(format!("{prefix}.bias"), StateMut::Tensor(&mut b.value))?;
    }
    Ok(())
}

pub(crate) fn bn_state<E>(
    prefix: &str,
    b: &mut BatchNorm2d,
    f: &mut StateVisitor<'_, E>,
) -> std::result::Result<(), E> {
    f(
        format!("{prefix}.weight"),
        StateMut::Tensor(&mut b.weight.value),
    )?;
    f(
        format!("{prefix}.bias"),
        StateMut::Tensor(&mut b.bias.value),
    )?;
    f(
        format!("{prefix}.running_mean"),
        StateMut::Tensor(&mut b.running_mean),
    )?;
    f(
        format!("{prefix}.running_var"),
        StateMut::Tensor(&mut b.running_var),
    )?;
    f(
        format!("{prefix}.num_batches_tracked"),
        StateMut::Counter(&mut b.num_batches_tracked),
    )
}

/// A parameter visitor: (name, parameter, belongs to a convolution).
pub type ParamVisitor<'a> = dyn FnMut(&str, &mut Param, bool) + 'a;

pub(crate) fn conv_params(prefix: &str, c: &mut Conv2d, f: &mut ParamVisitor) {
    f(&format!("{prefix}.weight"), &mut c.weight, true);
    if let Some(b) = c.bias.as_mut() {
        f(&format!("{prefix}.bias"), b, true);
    }
}

pub(crate) fn bn_params(prefix: &str, b: &mut BatchNorm2d, f: &mut ParamVisitor) {
    f(&format!("{prefix}.weight"), &mut b.weight, false);
    f(&format!("{prefix}.bias"), &mut b.bias, false);
}

/// The parts' activations at node g (each [len, …]) one after the other into `out` ([B, …]).
fn gather(pa: &[Vec<Tensor>], g: usize, out: &mut Tensor) -> Result<()> {
    let Some(first) = pa.first().and_then(|a| a.get(g)) else {
        return Err(CoreError::Invalid("streamed forward: no parts".into()));
    };
    let mut shape = first.shape.clone();
    let mut b = 0;
    for a in pa {
        let t = &a[g];
        if t.shape.get(1..) != first.shape.get(1..) {
            return Err(CoreError::Shape(format!(
                "streamed forward: parts of shapes {:?} and {:?}",
                first.shape, t.shape
            )));
        }
        b += t.shape.first().copied().unwrap_or(0);
    }
    if let Some(s0) = shape.first_mut() {
        *s0 = b;
    }
    out.resize(&shape);
    let mut at = 0;
    for a in pa {
        let d = &a[g].data;
        out.data[at..at + d.len()].copy_from_slice(d);
        at += d.len();
    }
    Ok(())
}

impl Net {
    /// A network from its nodes (numbers the convolutions in execution order).
    pub fn new(spec: ModelSpec, nodes: Vec<Node>, seed: u64) -> Self {
        let mut net = Net {
            spec,
            nodes,
            acts: Vec::new(),
            grad_a: Tensor::default(),
            grad_b: Tensor::default(),
            input_grad: Tensor::default(),
            loss: SoftmaxCrossEntropy::default(),
            rng: Rng::new(seed ^ 0xD00D),
            node_times: None,
            fuse: true,
            fused: Vec::new(),
            part_acts: Vec::new(),
            mapped: false,
        };
        let mut id = 0;
        net.visit_convs(&mut |_, c| {
            c.id = id;
            id += 1;
        });
        net
    }

    /// Turns the fused execution of BatchNorm → ReLU+MaxPool node pairs on (the default) or off (each node
    /// by itself: the reference path). Results are equal either way.
    pub fn set_fusion(&mut self, on: bool) {
        self.fuse = on;
    }

    /// Whether nodes i and i + 1 run fused. Pools other than 2×2 stride 2 (ResNet's 3×3 stem pool) run fused
    /// in evaluation only: their training pass (argmax over overlapping windows) measured no faster fused.
    fn fusable(&self, i: usize, train: bool) -> bool {
        if !self.fuse || i + 1 >= self.nodes.len() {
            return false;
        }
        match (&self.nodes[i].layer, &self.nodes[i + 1].layer) {
            (Layer::BatchNorm(b), Layer::MaxPool(p)) => {
                fused::can_fuse(b, p) && (!train || (p.k, p.stride, p.pad) == (2, 2, 0))
            }
            _ => false,
        }
    }

    /// Whether nodes i, i + 1 are a conv and a BatchNorm of its output channels that an inference forward may
    /// give to the executor as one ([`ConvExec::conv_forward_mapped`]): not where the BatchNorm is fused with
    /// the pooling after it (that pass reads the conv's output once already and writes a quarter of it).
    fn mappable(&self, i: usize, train: bool) -> bool {
        if train || !self.fuse || i + 1 >= self.nodes.len() || self.fusable(i + 1, train) {
            return false;
        }
        match (&self.nodes[i].layer, &self.nodes[i + 1].layer) {
            (Layer::Conv(c), Layer::BatchNorm(b)) => b.channels == c.out_ch,
            _ => false,
        }
    }

    /// Turns per-node timing on (counters reset to zero) or off.
    pub fn set_profiling(&mut self, on: bool) {
        self.node_times = on.then(|| vec![NodeTime::default(); self.nodes.len()]);
    }

    /// Accumulated time per node (in `nodes` order) while profiling is on.
    pub fn node_times(&self) -> Option<&[NodeTime]> {
        self.node_times.as_deref()
    }

    fn add_time(&mut self, i: usize, since: Option<std::time::Instant>, backward: bool) {
        if let (Some(t), Some(times)) = (since, self.node_times.as_mut()) {
            if let Some(nt) = times.get_mut(i) {
                let dt = t.elapsed().as_secs_f64();
                if backward {
                    nt.backward_s += dt;
                } else {
                    nt.forward_s += dt;
                }
            }
        }
    }

    /// Calls `f` on every conv in execution order, with its name prefix.
    pub fn visit_convs(&mut self, f: &mut dyn FnMut(&str, &mut Conv2d)) {
        for node in &mut self.nodes {
            match &mut node.layer {
                Layer::Conv(c) => f(&node.name, c),
                Layer::Block(b) => b.visit_convs(&node.name, f),
                _ => {}
            }
        }
    }

    /// Every conv, in execution order (as [`Net::visit_convs`]), for loops that may stop at an error.
    pub fn convs_mut(&mut self) -> Vec<&mut Conv2d> {
        let mut out = Vec::new();
        for node in &mut self.nodes {
            match &mut node.layer {
                Layer::Conv(c) => out.push(c),
                Layer::Block(b) => out.extend(b.convs_mut()),
                _ => {}
            }
        }
        out
    }

    /// Calls `f` on every trainable parameter, in the fixed order optimizers rely on (torchvision order).
    pub fn visit_params(&mut self, f: &mut dyn FnMut(&str, &mut Param)) {
        self.visit_params_tagged(&mut |n, p, _| f(n, p));
    }

    /// As [`Net::visit_params`], with a flag telling whether the parameter belongs to a convolution.
    pub fn visit_params_tagged(&mut self, f: &mut ParamVisitor) {
        for node in &mut self.nodes {
            let n = &node.name;
            match &mut node.layer {
                Layer::Conv(c) => conv_params(n, c, f),
                Layer::BatchNorm(b) => bn_params(n, b, f),
                Layer::Linear(l) => {
                    f(&format!("{n}.weight"), &mut l.weight, false);
                    f(&format!("{n}.bias"), &mut l.bias, false);
                }
                Layer::Block(b) => b.visit_params(n, f),
                _ => {}
            }
        }
    }

    /// Calls `f` on every state-dict entry (parameters and buffers) in torchvision's order.
    pub fn visit_state(&mut self, f: &mut dyn FnMut(String, StateMut)) {
        let r = self.try_visit_state::<std::convert::Infallible>(&mut |name, s| {
            f(name, s);
            Ok(())
        });
        let Ok(()) = r;
    }

    /// As [`Net::visit_state`], stopping at the first error `f` returns, and returning it.
    pub fn try_visit_state<E>(
        &mut self,
        f: &mut StateVisitor<'_, E>,
    ) -> std::result::Result<(), E> {
        for node in &mut self.nodes {
            let n = &node.name;
            match &mut node.layer {
                Layer::Conv(c) => conv_state(n, c, f)?,
                Layer::BatchNorm(b) => bn_state(n, b, f)?,
                Layer::Linear(l) => {
                    f(format!("{n}.weight"), StateMut::Tensor(&mut l.weight.value))?;
                    f(format!("{n}.bias"), StateMut::Tensor(&mut l.bias.value))?;
                }
                Layer::Block(b) => b.try_visit_state(n, f)?,
                _ => {}
            }
        }
        Ok(())
    }

    /// (name, shape) of every state-dict entry; counters have shape [].
    pub fn state_shapes(&mut self) -> Vec<(String, Vec<usize>)> {
        let mut out = Vec::new();
        self.visit_state(&mut |name, s| {
            let shape = match s {
                StateMut::Tensor(t) => t.shape.clone(),
                StateMut::Counter(_) => vec![],
            };
            out.push((name, shape));
        });
        out
    }

    /// Number of trainable scalars.
    pub fn num_params(&mut self) -> usize {
        let mut n = 0;
        self.visit_params(&mut |_, p| n += p.value.len());
        n
    }

    /// Zeroes every parameter gradient.
    pub fn zero_grad(&mut self) {
        self.visit_params(&mut |_, p| p.zero_grad());
    }

    /// x: [B, C, H, W] → logits [B, K]. `train` selects batch statistics in BatchNorm and active dropout.
    pub fn forward(&mut self, x: &Tensor, train: bool, exec: &mut dyn ConvExec) -> Result<&Tensor> {
        let expect = [self.spec.in_ch, self.spec.input_size, self.spec.input_size];
        if x.shape.len() != 4 || x.shape[1..] != expect {
            return Err(CoreError::Shape(format!(
                "model {} expects input [B, {}, {}, {}], got {:?}",
                self.spec.name(),
                expect[0],
                expect[1],
                expect[2],
                x.shape
            )));
        }
        let n = self.nodes.len();
        if !train {
            let parts = exec.stream_parts(x.shape[0]);
            if parts.len() > 1 {
                if let Some(g) = self.stream_end() {
                    return self.forward_streamed(x, &parts, g, exec);
                }
            }
        }
        self.part_acts = Vec::new();
        self.mapped = false;
        self.acts.resize_with(n + 1, Tensor::default);
        self.acts[0].copy_from(x);
        self.fused.clear();
        self.fused.resize(n, false);
        let mut acts = std::mem::take(&mut self.acts);
        let res = self.run_nodes(&mut acts, 0..n, train, exec);
        self.acts = acts;
        res?;
        Ok(&self.acts[n])
    }

    /// Runs nodes `range` on `acts` (acts[i] is the input of node i), the convs through `exec`.
    fn run_nodes(
        &mut self,
        acts: &mut [Tensor],
        range: Range<usize>,
        train: bool,
        exec: &mut dyn ConvExec,
    ) -> Result<()> {
        let mut i = range.start;
        while i < range.end {
            let t0 = self.node_times.is_some().then(std::time::Instant::now);
            if i + 1 < range.end && self.fusable(i, train) {
                // BN → ReLU+MaxPool in one pass from acts[i] to acts[i + 2]; the time goes to the BN node.
                let (before, after) = acts.split_at_mut(i + 1);
                let (lo, hi) = self.nodes.split_at_mut(i + 1);
                if let (Layer::BatchNorm(b), Layer::MaxPool(p)) =
                    (&mut lo[i].layer, &mut hi[0].layer)
                {
                    fused::bn_relu_maxpool_forward(b, p, &before[i], &mut after[1], train, train)
                        .map_err(|e| in_layer(&lo[i].name, e))?;
                }
                self.fused[i] = true;
                self.add_time(i, t0, false);
                i += 2;
                continue;
            }
            if self.mappable(i, train) && i + 2 < acts.len() && i + 1 < range.end {
                // Conv → BatchNorm (no pooling fused after it) in inference: the executor may apply
                // BatchNorm's map as it writes the conv's output; then BatchNorm's output is in acts[i + 2]
                // and its node is done. The time goes to the conv node.
                let (lo, hi) = self.nodes.split_at_mut(i + 1);
                if let (Layer::Conv(c), Layer::BatchNorm(b)) = (&mut lo[i].layer, &mut hi[0].layer)
                {
                    let (before, after) = acts.split_at_mut(i + 1);
                    let mapped = exec
                        .conv_forward_mapped(c, &before[i], &mut after[0], b.inference_map())
                        .map_err(|e| in_layer(&lo[i].name, e))?;
                    self.add_time(i, t0, false);
                    if mapped {
                        after.swap(0, 1);
                        self.mapped = true;
                        i += 2;
                    } else {
                        i += 1;
                    }
                    continue;
                }
            }
            let (before, after) = acts.split_at_mut(i + 1);
            let (input, out) = (&before[i], &mut after[0]);
            let node = &mut self.nodes[i];
            let res = match &mut node.layer {
                Layer::Conv(c) => exec.conv_forward(c, input, out, train),
                Layer::BatchNorm(b) => b.forward(input, out, train),
                Layer::Relu(r) => {
                    r.forward(input, out);
                    Ok(())
                }
                Layer::MaxPool(p) => p.forward(input, out),
                Layer::AvgPool(p) => p.forward(input, out),
                Layer::AdaptiveAvgPool(p) => p.forward(input, out),
                Layer::Flatten => {
                    out.copy_from(input);
                    let b = input.shape[0];
                    out.shape = vec![b, input.len() / b.max(1)];
                    Ok(())
                }
                Layer::Linear(l) => l.forward(input, out),
                Layer::Dropout(d) => {
                    d.forward(input, out, train, &mut self.rng);
                    Ok(())
                }
                Layer::Block(blk) => blk.forward(input, out, train, exec),
            };
            res.map_err(|e| in_layer(&node.name, e))?;
            self.add_time(i, t0, false);
            i += 1;
        }
        Ok(())
    }

    /// Where a streamed forward gathers its parts: the first fully connected node (each part's pass over its
    /// weights would read them all again), or the end. `None` when the network cannot be streamed: a residual
    /// block before that node (its convs run inside the block), a conv after it, or no conv at all.
    fn stream_end(&self) -> Option<usize> {
        let n = self.nodes.len();
        let g = (0..n)
            .find(|&i| matches!(self.nodes[i].layer, Layer::Linear(_)))
            .unwrap_or(n);
        let (head, tail) = self.nodes.split_at(g);
        let streamable = head.iter().all(|nd| !matches!(nd.layer, Layer::Block(_)))
            && head.iter().any(|nd| matches!(nd.layer, Layer::Conv(_)))
            && tail
                .iter()
                .all(|nd| !matches!(nd.layer, Layer::Conv(_) | Layer::Block(_)));
        streamable.then_some(g)
    }

    /// The inference forward in `parts` (see [`ConvExec::stream_parts`]): nodes 0..g run per part, the convs
    /// begun for every part before the first is finished — so that the executor may have one part's conv in
    /// flight while it works on the next part, across convs: stage s of part p finishes conv s − 1 of part p,
    /// runs the nodes up to conv s and begins it; the stages go (s, 0), (s, 1), …, then (s + 1, 0). The parts'
    /// activations at node g are gathered into the batch's, and nodes g.. run on the whole batch.
    fn forward_streamed(
        &mut self,
        x: &Tensor,
        parts: &[Range<usize>],
        g: usize,
        exec: &mut dyn ConvExec,
    ) -> Result<&Tensor> {
        let (n, b) = (self.nodes.len(), x.shape[0]);
        let covers = parts.first().map(|r| r.start) == Some(0)
            && parts.last().map(|r| r.end) == Some(b)
            && parts.windows(2).all(|w| w[0].end == w[1].start)
            && parts.iter().all(|r| !r.is_empty());
        if !covers {
            return Err(CoreError::Invalid(format!(
                "streamed forward: parts {parts:?} do not cover a batch of {b} in order"
            )));
        }
        self.fused.clear();
        self.fused.resize(n, false);
        // The batch's activations before node g are not used here: their memory goes.
        self.acts.resize_with(n + 1, Tensor::default);
        for a in &mut self.acts[..g] {
            *a = Tensor::default();
        }
        let per = x.len() / b.max(1);
        let mut pa = std::mem::take(&mut self.part_acts);
        pa.resize_with(parts.len(), Vec::new);
        for (acts, r) in pa.iter_mut().zip(parts) {
            acts.resize_with(g + 1, Tensor::default);
            let mut shape = x.shape.clone();
            shape[0] = r.len();
            acts[0].resize(&shape);
            acts[0]
                .data
                .copy_from_slice(&x.data[r.start * per..r.end * per]);
        }
        let res = self.run_stages(&mut pa, parts, g, exec);
        let res = res.and_then(|()| gather(&pa, g, &mut self.acts[g]));
        self.part_acts = pa;
        res?;
        let mut acts = std::mem::take(&mut self.acts);
        let res = self.run_nodes(&mut acts, g..n, false, exec);
        self.acts = acts;
        res?;
        Ok(&self.acts[n])
    }

    /// The stages of [`Net::forward_streamed`] over nodes 0..g.
    fn run_stages(
        &mut self,
        pa: &mut [Vec<Tensor>],
        parts: &[Range<usize>],
        g: usize,
        exec: &mut dyn ConvExec,
    ) -> Result<()> {
        let convs: Vec<usize> = (0..g)
            .filter(|&i| matches!(self.nodes[i].layer, Layer::Conv(_)))
            .collect();
        let batch = parts.last().map_or(0, |r| r.end);
        for s in 0..=convs.len() {
            for (p, acts) in pa.iter_mut().enumerate() {
                let part = StreamPart {
                    index: p,
                    samples: parts[p].clone(),
                    batch,
                };
                let start = match s.checked_sub(1).map(|k| convs[k]) {
                    Some(c) => {
                        self.conv_part(c, acts, &part, exec, false)?;
                        c + 1
                    }
                    None => 0,
                };
                let end = convs.get(s).copied().unwrap_or(g);
                self.run_nodes(acts, start..end, false, exec)?;
                if let Some(&c) = convs.get(s) {
                    self.conv_part(c, acts, &part, exec, true)?;
                }
            }
        }
        Ok(())
    }

    /// Begins (`begin`) or finishes conv node `c` of a streamed forward on one part's activations.
    fn conv_part(
        &mut self,
        c: usize,
        acts: &mut [Tensor],
        part: &StreamPart,
        exec: &mut dyn ConvExec,
        begin: bool,
    ) -> Result<()> {
        let t0 = self.node_times.is_some().then(std::time::Instant::now);
        let node = &mut self.nodes[c];
        let Layer::Conv(conv) = &mut node.layer else {
            return Err(CoreError::Invalid(format!("node {c} is not a conv")));
        };
        let (before, after) = acts.split_at_mut(c + 1);
        let (x, y) = (&before[c], &mut after[0]);
        let res = if begin {
            exec.conv_forward_begin(conv, x, y, part)
        } else {
            exec.conv_forward_finish(conv, x, y, part)
        };
        res.map_err(|e| in_layer(&node.name, e))?;
        self.add_time(c, t0, false);
        Ok(())
    }

    /// Forward then the mean cross-entropy loss on `labels`; returns (loss, number correct).
    pub fn forward_loss(
        &mut self,
        x: &Tensor,
        labels: &[usize],
        train: bool,
        exec: &mut dyn ConvExec,
    ) -> Result<(f32, usize)> {
        self.forward(x, train, exec)?;
        let n = self.nodes.len();
        let loss = self.loss.forward(&self.acts[n], labels)?;
        Ok((loss, self.loss.correct()))
    }

    /// The logits of the last forward.
    pub fn logits(&self) -> &Tensor {
        &self.acts[self.nodes.len()]
    }

    /// Backward from the loss of the last `forward_loss`: accumulates every parameter gradient;
    /// with `input_grad` also fills `self.input_grad`.
    pub fn backward(&mut self, exec: &mut dyn ConvExec, input_grad: bool) -> Result<()> {
        let mut g = std::mem::take(&mut self.grad_a);
        self.loss.backward(&mut g);
        self.backward_from(g, exec, input_grad)
    }

    /// Backward from a given gradient of the logits.
    pub fn backward_from(
        &mut self,
        dlogits: Tensor,
        exec: &mut dyn ConvExec,
        input_grad: bool,
    ) -> Result<()> {
        let res = self.backward_nodes(dlogits, exec, input_grad);
        let end = exec.backward_end(self);
        res.and(end)
    }

    fn backward_nodes(
        &mut self,
        dlogits: Tensor,
        exec: &mut dyn ConvExec,
        input_grad: bool,
    ) -> Result<()> {
        let n = self.nodes.len();
        if !self.part_acts.is_empty() {
            return Err(CoreError::Invalid(
                "backward: the last forward was an inference forward in parts; run a training forward first"
                    .into(),
            ));
        }
        if self.mapped {
            return Err(CoreError::Invalid(
                "backward: the last forward was an inference forward whose BatchNorm was applied with its convs; run a training forward first"
                    .into(),
            ));
        }
        if self.acts.len() != n + 1 || dlogits.shape != self.acts[n].shape {
            return Err(CoreError::Shape(
                "backward: run forward first with the same batch".into(),
            ));
        }
        let mut cur = dlogits;
        let mut prev = std::mem::take(&mut self.grad_b);
        let mut i = n;
        while i > 0 {
            i -= 1;
            let t0 = self.node_times.is_some().then(std::time::Instant::now);
            if i > 0 && self.fused.get(i - 1) == Some(&true) {
                // The fused pair (i − 1, i): ∇ of the pooled output straight to ∇ of the BN input.
                let j = i - 1;
                let (lo, hi) = self.nodes.split_at_mut(i);
                if let (Layer::BatchNorm(b), Layer::MaxPool(p)) =
                    (&mut lo[j].layer, &mut hi[0].layer)
                {
                    fused::bn_relu_maxpool_backward(b, p, &self.acts[j], &cur, &mut prev)
                        .map_err(|e| in_layer(&lo[j].name, e))?;
                }
                self.add_time(j, t0, true);
                std::mem::swap(&mut cur, &mut prev);
                i = j;
                continue;
            }
            let want_dx = i > 0 || input_grad;
            let (input, out) = (&self.acts[i], &self.acts[i + 1]);
            let node = &mut self.nodes[i];
            let res = match &mut node.layer {
                Layer::Conv(c) => exec.conv_backward(c, input, &cur, want_dx.then_some(&mut prev)),
                Layer::BatchNorm(b) => b.backward(input, &cur, &mut prev),
                Layer::Relu(r) => {
                    r.backward(out, &cur, &mut prev);
                    Ok(())
                }
                Layer::MaxPool(p) => {
                    p.backward(&input.shape, &cur, &mut prev);
                    Ok(())
                }
                Layer::AvgPool(p) => {
                    p.backward(&input.shape, &cur, &mut prev);
                    Ok(())
                }
                Layer::AdaptiveAvgPool(p) => {
                    p.backward(&input.shape, &cur, &mut prev);
                    Ok(())
                }
                Layer::Flatten => {
                    prev.copy_from(&cur);
                    prev.shape = input.shape.clone();
                    Ok(())
                }
                Layer::Linear(l) => l.backward(input, &cur, want_dx.then_some(&mut prev)),
                Layer::Dropout(d) => {
                    d.backward(&cur, &mut prev);
                    Ok(())
                }
                Layer::Block(blk) => blk.backward(input, out, &cur, &mut prev, exec),
            };
            res.map_err(|e| in_layer(&node.name, e))?;
            self.add_time(i, t0, true);
            std::mem::swap(&mut cur, &mut prev);
        }
        if input_grad {
            self.input_grad.copy_from(&cur);
        }
        self.grad_a = cur;
        self.grad_b = prev;
        Ok(())
    }

    /// Multiply–adds of the convolutions for one forward pass at batch `b`.
    pub fn conv_macs(&mut self, b: usize) -> u64 {
        let mut shape = vec![
            b,
            self.spec.in_ch,
            self.spec.input_size,
            self.spec.input_size,
        ];
        let mut total = 0;
        for node in &mut self.nodes {
            match &mut node.layer {
                Layer::Conv(c) => {
                    total += c.macs(&shape);
                    if let Ok(s) = c.out_shape(&shape) {
                        shape = s.to_vec();
                    }
                }
                Layer::Block(blk) => {
                    let (m, s) = blk.macs(&shape);
                    total += m;
                    shape = s;
                }
                Layer::MaxPool(p) => shape = pool_shape(&shape, p.k, p.stride, p.pad),
                Layer::AvgPool(p) => shape = pool_shape(&shape, p.k, p.stride, p.pad),
                Layer::AdaptiveAvgPool(p) => shape = vec![shape[0], shape[1], p.out, p.out],
                _ => {}
            }
        }
        total
    }
}

fn pool_shape(s: &[usize], k: usize, st: usize, p: usize) -> Vec<usize> {
    let o = |n| crate::layers::out_size(n, k, st, p).unwrap_or(0);
    vec![s[0], s[1], o(s[2]), o(s[3])]
}

/// Prefixes an error with the layer it happened in.
pub(crate) fn in_layer(name: &str, e: CoreError) -> CoreError {
    match e {
        CoreError::Shape(m) => CoreError::Shape(format!("{name}: {m}")),
        CoreError::Invalid(m) => CoreError::Invalid(format!("{name}: {m}")),
        other => other,
    }
}
