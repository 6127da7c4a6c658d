//! The split runtime (AsymML): every convolution's input X is decomposed per sample into a low-rank trusted
//! part X_T = U·V and a residual X_U = X − X_T. Only X_U (and, in backward, ∇Y and ∇W_T) leaves, through the
//! named declassification functions of `asymml-protocol`; the trusted convolution of (U, V) runs here while
//! the accelerator computes conv(X_U, W), and the two outputs are added here. Every reply is validated
//! (kind, layer, shape, finiteness) and, with integrity checks on (the default), checked against the trusted
//! copy of the weights (Freivalds, see [`crate::integrity`]) before it is used. The trusted runtime owns the
//! conv weights: the session's optimizer updates them here, and [`SplitExec`] sends the new weights to the
//! accelerator (`SetWeights`), which is never trusted to update or report them.

mod pipeline;
mod step_check;

use crate::integrity::{Checker, IntegrityStats, Projection, DEFAULT_REPS};
use asymml_core::decomp::{
    add_noise_batch, block_svd_flops, decompose_batch_shared_with, decompose_batch_within,
    decompose_factors_lean_with, decompose_shared_factors_with, light_svd_flops, BatchLowRank,
    RankPolicy, RankTable, SvdMethod, TableRank, TrustedConv,
};
use asymml_core::layers::{ChannelMap, Conv2d};
use asymml_core::models::{ConvExec, Layer, Net, StreamPart};
use asymml_core::rng::Rng;
use asymml_core::{CoreError, Tensor};
use asymml_protocol::{
    declassify_output_grad_into, declassify_residual_into, declassify_residual_owned,
    declassify_updated_weights, declassify_updated_weights_owned, public_weights, Client,
    ConvGradsFrame, ConvLayerSpec, ConvOutputFrame, MessageKind, ProtocolError, Request,
    TensorFrame, Transport,
};
use std::sync::{Arc, Mutex};
use std::time::Instant;
pub use step_check::RouteCheck;
use step_check::StepCheck;

/// Which basis a split conv's decomposition uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Basis {
    /// One basis U_b per sample (the paper's).
    #[default]
    PerSample,
    /// One basis U per batch at every conv: W' = Uᵀ·W is built once per batch, not per sample.
    Shared,
    /// Per conv, the cheaper of the two where they keep the same energy: under an energy policy (`energy:E`,
    /// `asym1`, `asym2`, the guard's deeper convs) with the block method, where the shared basis's rank keeps
    /// ≥ E of every sample's own energy as the per-sample basis does, each conv tries both bases for
    /// [`ROUTE_TRIALS`] steps and then takes the one of the smaller trusted cost; elsewhere (a fixed rank,
    /// at which a shared basis keeps less of each sample; the light SVD; micro-batch parts) per sample.
    Auto,
}

impl Basis {
    /// The CLI's names: `sample`, `shared`, `auto`.
    pub const NAMES: [&'static str; 3] = ["sample", "shared", "auto"];
}

impl std::fmt::Display for Basis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Basis::PerSample => "sample",
            Basis::Shared => "shared",
            Basis::Auto => "auto",
        })
    }
}

impl std::str::FromStr for Basis {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "sample" | "per-sample" => Ok(Basis::PerSample),
            "shared" => Ok(Basis::Shared),
            "auto" => Ok(Basis::Auto),
            _ => Err(format!(
                "unknown basis {s:?}: expected one of {}",
                Basis::NAMES.join(", ")
            )),
        }
    }
}

/// How the split decomposes each conv input.
#[derive(Clone, Debug, PartialEq)]
pub struct SplitConfig {
    pub policy: RankPolicy,
    /// Lightweight-SVD iterations (1 or 2) of the paper's method (`svd: None`).
    pub iters: usize,
    /// The decomposition (`None`: the paper's lightweight SVD with `iters` rounds).
    pub svd: Option<SvdMethod>,
    /// Noise-to-signal ratio added to X_U before it leaves (0: none).
    pub nsr: f32,
    pub seed: u64,
    /// Which basis each conv's decomposition uses: per sample, one per batch (see `decompose_batch_shared`),
    /// or per conv the cheaper of the two at the energy policy's energy ([`Basis::Auto`]).
    pub basis: Basis,
    /// A per-conv rank table (`--rank table:FILE`): overrides `policy` for every conv it lists; a
    /// `"trusted"` entry runs that conv wholly in the trusted runtime.
    pub table: Option<Arc<RankTable>>,
    /// With `clip: Some(C)`, each sample's X_U is clipped to ℓ₂ norm C before the noise (σ = nsr·C/√d).
    pub clip: Option<f32>,
    /// Check every result of the accelerator (Freivalds, [`crate::integrity`]) before using it.
    pub integrity: bool,
    /// With `guard: Some(F)`, every conv whose input map is at least F times the network input's side (the
    /// image-like maps before the downsampling has gone far) runs wholly in the trusted runtime; the others
    /// follow `policy` (the `guard` rank policy of the CLI).
    pub guard: Option<f32>,
    /// Measure each conv's trusted-side cost per step on both routes and take the fully-trusted one where it
    /// is cheaper (it also leaks nothing): see [`RouteCosts`]. `false` always follows the rank policy.
    pub auto_route: bool,
    /// With `auto_route`: a conv's cost also counts the time the trusted runtime is blocked waiting for the
    /// accelerator in it, so the route taken is the one of the shorter step (wall time as the trusted side
    /// sees it), not the one of less trusted work.
    pub route_counts_wait: bool,
    /// Micro-batch pipelining: each split conv's forward cuts the batch into this many parts of consecutive
    /// samples (at most one per sample), so that the accelerator convolves one part while the trusted runtime
    /// decomposes the next (1: the whole batch at once; ignored with [`Basis::Shared`]).
    pub micro_batches: usize,
    /// Pipelined backward: a split conv's backward asks for ∇X first and ∇W_U after it (`ConvInputGrad`,
    /// `ConvWeightGrad`), and goes on with ∇X — through the layers below, to the next conv — while the
    /// accelerator computes ∇W_U, which is taken, checked and added at the next split conv's backward (or the
    /// backward's end). `false`: one `ConvBackward` per conv, both answered before the backward goes on.
    pub pipelined_backward: bool,
}

impl SplitConfig {
    /// Steps spent trying routes and bases before a conv settles ([`ROUTE_TRIALS`] each of the split, the
    /// shared basis with [`Basis::Auto`] and the block method, and the fully-trusted route with
    /// `auto_route`), and then with `auto_route` in the check of the whole step (the settled routes on
    /// [`step_check::STEP_TRIALS`] steps, and as many with every conv trusted where the bases' trials may have
    /// left no step with every conv trusted at once): a benchmark of the settled choice runs these first,
    /// untimed.
    pub fn probe_steps(&self) -> usize {
        let bases = self.basis == Basis::Auto && matches!(self.svd, Some(SvdMethod::Block(_)));
        let tries = 1 + usize::from(bases) + usize::from(self.auto_route);
        let check = if self.auto_route {
            (1 + usize::from(bases)) * step_check::STEP_TRIALS as usize
        } else {
            0
        };
        if tries == 1 {
            0
        } else {
            tries * ROUTE_TRIALS as usize + check
        }
    }
}

impl Default for SplitConfig {
    fn default() -> Self {
        SplitConfig {
            policy: RankPolicy::Schedule,
            iters: 1,
            svd: None,
            nsr: 0.0,
            seed: 0,
            basis: Basis::PerSample,
            table: None,
            clip: None,
            integrity: true,
            guard: None,
            auto_route: false,
            route_counts_wait: false,
            micro_batches: 1,
            pipelined_backward: true,
        }
    }
}

#[derive(Default)]
struct LayerState {
    name: String,
    /// Schedule step (conv index in VGG, residual-block index in ResNet).
    step: usize,
    lr: BatchLowRank,
    /// The conv whose decomposition (and X_U on the accelerator) the last forward reused: a ResNet block's
    /// first conv, for its shortcut conv.
    shared_from: Option<usize>,
    rank: usize,
    /// What the last training forward kept for the ∇W_U check of the backward.
    proj: Projection,
    /// The last forward ran the whole conv here (nothing of its input left): its backward runs here too.
    trusted_route: bool,
    /// What each route has cost this conv per step (with `auto_route`).
    costs: RouteCosts,
    /// The parts of the last forward when it ran in parts (`micro_batches`; `lr` is then unused), with their
    /// factorisations; empty otherwise.
    parts: Vec<pipeline::Part>,
    /// The accelerator holds older weights than the trusted runtime: the conv took the fully-trusted route
    /// in the step of the last update, so its new weights were kept back until it next splits.
    stale_weights: bool,
    /// The last forward decomposed the input and kept every channel (an energy policy's rank), then ran the
    /// conv here: for `auto_route` that step cost what the rank policy's route costs (decomposition included),
    /// so it counts as a step of the split route, and the plain trusted route is tried against it.
    kept_all: bool,
    /// The last forward ran here because the rank policy says so (the guard's image-like map, or a rank
    /// table's `"trusted"`): the next will too, whatever the route costs.
    policy_trusted: bool,
    /// A shortcut conv whose last forward ran here because its block's first conv took the trusted route
    /// (with `auto_route`; see `conv_forward_same_input`): its route follows that conv's.
    follows_first: bool,
    /// A shortcut conv (it reads its block's input, which its block's first conv decomposes): it splits
    /// exactly when that conv does, so `auto_route`'s check of the whole step counts it settled.
    shortcut: bool,
    /// A shortcut conv reads this conv's input too and reuses its decomposition and X_U (whose check needs
    /// X_U again): its X_U is kept whole in the trusted runtime, unless `shortcut_reads` says which of its
    /// pixels the shortcut reads.
    input_shared: bool,
    /// The last split forward's decomposition took one basis for the batch ([`Basis`]).
    split_shared: bool,
    /// The stride s ≥ 2 of that shortcut where it is a 1 × 1 conv without padding (a ResNet's): it reads only
    /// every s-th row and column, so X_U can go into its frame slab by slab while the trusted runtime keeps
    /// those pixels alone for the shortcut's check (a quarter of X_U at s = 2).
    shortcut_reads: Option<usize>,
}

/// Steps `auto_route` tries each route before it compares them (the first step of a route pays for its
/// buffers, so the least cost of the others is what counts).
const ROUTE_TRIALS: u32 = 3;

/// Steps `auto_route` spends trying the routes ([`ROUTE_TRIALS`] each) before it compares them: a benchmark of
/// the settled route runs these first, untimed.
pub const ROUTE_PROBE_STEPS: usize = 2 * ROUTE_TRIALS as usize;

/// From this step count on, `auto_route` tries the route it did not take again on two steps each time the
/// count reaches a power of two (64 and 65, 128 and 129, …): a comparison made on a few noisy trial steps is
/// not final, and the route taken keeps lowering its least cost while the other's is not measured.
const ROUTE_RETRY_FROM: u32 = 64;

/// How much cheaper than the fully-trusted route the split must have measured for `auto_route` to take it: a
/// tenth. A conv's split cost leaves out what the accelerator's concurrent work costs the trusted runtime's
/// other layers (on a machine whose cores share caches and memory bandwidth), and a near tie is not worth the
/// residual that leaves: on one, nothing leaves. (ResNet34 at 32 px, asym2: seven convs measured 3–6 %
/// cheaper split, and the split's whole step was 4–6 % slower than trusted-only's.)
const ROUTE_SPLIT_MARGIN: f64 = 0.1;

/// The trusted runtime's time per step (forward and, in training, backward; time blocked on the accelerator
/// excluded) that one conv has cost on each route, for `auto_route`. Each route is tried on
/// [`ROUTE_TRIALS`] steps before the routes are compared; then the one with the smaller least cost is taken,
/// every further step refines the comparison, and the other route is tried again now and then (see
/// [`ROUTE_RETRY_FROM`]).
///
/// With [`Basis::Auto`] where the conv may take either basis (`try_shared`), the split route has two costs,
/// per-sample basis and shared basis: the shared one is tried after the per-sample one, both before the
/// trusted route, and the split's cost is the smaller of the two.
#[derive(Clone, Debug, Default)]
struct RouteCosts {
    /// Least cost seen on the split route (per-sample basis), on it with the shared basis, and on the
    /// fully-trusted route, and how many steps each.
    split: (f64, u32),
    shared: (f64, u32),
    trusted: (f64, u32),
    /// The route of the step being measured (`Some(true)`: trusted), and its cost so far.
    current: Option<bool>,
    /// The step being measured split with the shared basis.
    current_shared: bool,
    spent: f64,
    /// The route of the last step closed.
    last: Option<bool>,
    /// The conv may take either basis ([`Basis::Auto`]; set at each forward).
    try_shared: bool,
}

impl RouteCosts {
    /// Closes the step being measured (at the next forward of the conv).
    fn close_step(&mut self) {
        if let Some(trusted) = self.current.take() {
            let (least, n) = if trusted {
                &mut self.trusted
            } else if std::mem::take(&mut self.current_shared) {
                &mut self.shared
            } else {
                &mut self.split
            };
            *least = if *n == 0 {
                self.spent
            } else {
                least.min(self.spent)
            };
            *n += 1;
            self.last = Some(trusted);
        }
        self.spent = 0.0;
    }

    /// Notes the route of the step being measured: the trusted one, or the split with the shared basis
    /// (`shared`) or the per-sample one. The shared basis's cost is kept apart only while both bases are on
    /// trial (`try_shared`); a basis the configuration forces (`--basis shared`) is simply the split's, so
    /// that its trials count as the split's and the routes settle.
    fn take_route(&mut self, trusted: bool, shared: bool) {
        self.current = Some(trusted);
        self.current_shared = !trusted && shared && self.try_shared;
    }

    /// Steps closed so far, every route.
    fn steps(&self) -> u32 {
        self.split.1 + self.shared.1 + self.trusted.1
    }

    /// The split's trials are over: the per-sample basis's, and the shared one's where it is tried.
    fn split_tried(&self) -> bool {
        self.split.1 >= ROUTE_TRIALS && (!self.try_shared || self.shared.1 >= ROUTE_TRIALS)
    }

    /// The split's least cost: that of the cheaper basis.
    fn split_cost(&self) -> f64 {
        if self.try_shared && self.shared.1 > 0 {
            self.split.0.min(self.shared.0)
        } else {
            self.split.0
        }
    }

    /// Whether the next step, if it splits, should take the shared basis: while it is on trial (after the
    /// per-sample basis's), and then where it measured cheaper.
    fn prefers_shared(&self) -> bool {
        self.try_shared
            && self.split.1 >= ROUTE_TRIALS
            && (self.shared.1 < ROUTE_TRIALS || self.shared.0 < self.split.0)
    }

    /// The next step is the second of a retry of the route not taken (see [`ROUTE_RETRY_FROM`]).
    fn retry_second_step(&self) -> bool {
        let before = self.steps().wrapping_sub(1);
        before >= ROUTE_RETRY_FROM && before.is_power_of_two()
    }

    /// Both routes were tried and the next step takes the route they settled on (not a retry of the other).
    fn settled(&self) -> bool {
        let total = self.steps();
        self.split_tried()
            && self.trusted.1 >= ROUTE_TRIALS
            && !(total >= ROUTE_RETRY_FROM && total.is_power_of_two())
            && !self.retry_second_step()
    }

    /// Whether the next step should take the fully-trusted route.
    fn prefers_trusted(&self) -> bool {
        if !self.split_tried() {
            return false;
        }
        if self.trusted.1 < ROUTE_TRIALS {
            return true;
        }
        let trusted_cheaper = self.trusted.0 < (1.0 + ROUTE_SPLIT_MARGIN) * self.split_cost();
        let total = self.steps();
        if total >= ROUTE_RETRY_FROM && total.is_power_of_two() {
            // Try the other route again (its first step pays for its buffers, so it gets a second).
            return !trusted_cheaper;
        }
        if self.retry_second_step() {
            return self.last == Some(true);
        }
        trusted_cheaper
    }

    /// The next step, if it takes the trusted route, is the last of a trial of it (the first trials, or the
    /// second step of a retry): the route may then turn out to be the split.
    fn last_trusted_trial(&self) -> bool {
        let trusted = self.trusted.1;
        (self.split_tried() && trusted == ROUTE_TRIALS - 1)
            || (trusted >= ROUTE_TRIALS && self.retry_second_step() && self.last == Some(true))
    }
}

/// Per-run counters: what crossed the boundary, and how long the trusted runtime waited for replies.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SplitStats {
    /// Tensor payload bytes sent to the accelerator.
    pub bytes_to_untrusted: u64,
    /// Tensor payload bytes received from it.
    pub bytes_from_untrusted: u64,
    /// Seconds spent blocked waiting for replies (the trusted runtime's own time is the rest).
    pub wait_s: f64,
    /// Seconds spent encoding and sending requests and decoding replies (part of the trusted runtime's time).
    pub transfer_s: f64,
    /// Per conv layer (by conv id).
    pub layers: Vec<LayerStats>,
    /// The integrity checks made (counts, failures, seconds; zero when they are off).
    pub integrity: IntegrityStats,
    /// Inference forwards run as parts streamed through the network (`Net::forward`, `micro_batches`).
    pub streamed_forwards: u64,
    /// Conv forwards whose X_U was made a slab at a time straight into its frame (never whole here).
    pub in_frame_forwards: u64,
    /// Training conv forwards that never held the batch's V at once ([`SplitExec::set_lean_v_bytes`]).
    pub lean_forwards: u64,
    /// Inference conv forwards whose BatchNorm was applied in the pass that checks and merges Y_U
    /// ([`ConvExec::conv_forward_mapped`]).
    pub mapped_forwards: u64,
    /// `auto_route`'s check of the whole step: the settled routes against every conv trusted.
    pub route_check: RouteCheck,
}

/// Per-conv counters of the split runtime.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LayerStats {
    pub name: String,
    /// The rank of the last forward (all input channels on the fully-trusted route).
    pub rank: usize,
    /// The last forward ran the whole conv in the trusted runtime (its rank would keep every channel, or the
    /// rank table says so): nothing of its input left.
    pub trusted_route: bool,
    /// The last split forward took one basis for the batch ([`Basis`]).
    pub shared_basis: bool,
    /// Trusted compute: decomposition, noise, Conv_T, ∇W_T, adding Y_T + Y_U (seconds).
    pub trusted_s: f64,
    /// Of `trusted_s`: the decomposition (lightweight SVD, X_U, noise) and adding Y_T + Y_U.
    pub decompose_s: f64,
    pub merge_s: f64,
    /// Of `trusted_s`: the integrity checks of this layer's results.
    pub integrity_s: f64,
    /// Floating-point operations of the lightweight SVD and Conv_T (forward and ∇W_T).
    pub trusted_flops: f64,
    /// Floating-point operations the accelerator does for this layer: conv(X_U, W); ∇W_U and ∇X.
    pub untrusted_flops: f64,
    /// Encoding, sending and decoding (seconds).
    pub transfer_s: f64,
    /// Blocked waiting for replies (seconds).
    pub wait_s: f64,
    pub bytes_to: u64,
    pub bytes_from: u64,
}

/// The split executor of convolutions, talking to an accelerator over `T`.
pub struct SplitExec<T: Transport> {
    client: Client<T>,
    cfg: SplitConfig,
    rng: Rng,
    layers: Vec<LayerState>,
    tconv: TrustedConv,
    /// Scratch shared by every conv (each is used only within one call): X_U until it is encoded. (Y_T is
    /// computed into the conv's output, and the received Y_U added to it: Y = Y_T + Y_U; ∇W_T is added straight
    /// into the conv's ∇W.)
    residual: Tensor,
    /// ∇Y of one part, for ∇W_T of a conv whose forward ran in parts.
    dy_part: Tensor,
    /// ∇W_U as received (a conv's weight size), kept between convs.
    dw_u: Tensor,
    /// The pipelined backward's ∇W_U still due from the accelerator: its conv, and that conv's ∇W (∇W_T in
    /// already), taken out of the conv until ∇W_U is checked and added.
    deferred: Option<(usize, Tensor)>,
    /// The ∇W of convs completed after their backward returned, given back to them at the backward's end.
    completed: Vec<(usize, Tensor)>,
    /// The buffers of a micro-batched forward's parts (shared by every conv).
    part_bufs: Vec<pipeline::PartBufs>,
    /// Per part of a streamed forward: the conv whose reply for that part is still due.
    in_flight: Vec<Option<usize>>,
    /// The conv whose input was decomposed last (a shortcut conv may reuse its decomposition).
    last_decomposed: Option<usize>,
    /// A training forward ran Conv_T: its scratch goes when the backward begins ([`TrustedConv::release_forward_scratch`]).
    tconv_scratch_due: bool,
    /// Some conv ran split since the first conv's last forward (else the split's scratch is let go there).
    split_in_step: bool,
    /// The larger side of the network's input, as the first conv (id 0) last saw it (for `guard`).
    input_side: usize,
    /// Seconds blocked on replies so far (to take them out of a conv's measured cost).
    waited_s: f64,
    /// `auto_route`'s check of the whole step, and when the step being run began (and the waits by then).
    check: StepCheck,
    step_began: Option<(Instant, f64)>,
    /// The integrity checker (`None`: checks off).
    checker: Option<Checker>,
    stats: Arc<Mutex<SplitStats>>,
    /// A training forward whose batch's V would exceed this many bytes lets each sample's V go as it is made
    /// ([`SplitExec::set_lean_v_bytes`]).
    lean_v_bytes: usize,
}

/// The default of [`SplitExec::set_lean_v_bytes`] (4 MiB).
pub const LEAN_V_BYTES: usize = 1 << 22;

/// Values of X_U per slab made in the trusted runtime on its way into its frame (1 MB: it stays in the
/// second-level cache between being made, checked and written, and adds little to the trusted runtime's peak
/// memory, with the check's per-pixel sums of its pixels).
const SLAB_VALUES: usize = 1 << 18;

/// Pixels per slab at most: the check's pass keeps f64 sums per pixel (for every sample, offset and
/// repetition), which a few-channel input's slab of [`SLAB_VALUES`] would make large.
const SLAB_PIXELS: usize = 4096;

/// A reply to `what` that failed validation (errors of the client's own calls name their request already).
fn bad_reply(what: &str, e: ProtocolError) -> CoreError {
    CoreError::accelerator(e.context(what))
}

/// Each conv's name, schedule step (VGG counts convs, ResNet counts residual blocks, stem 0), whether a
/// shortcut conv reads its input too (a ResNet block's first conv, where the block downsamples) and the stride
/// of that shortcut where it is 1 × 1 without padding and strided ([`LayerState::shortcut_reads`]), by conv id.
fn structure(net: &mut Net) -> Vec<(String, usize, bool, Option<usize>)> {
    let mut out: Vec<(usize, String, usize, bool, Option<usize>)> = Vec::new();
    let mut block = 0;
    for node in &mut net.nodes {
        match &mut node.layer {
            Layer::Conv(c) => {
                let step = if block == 0 { c.id } else { block };
                out.push((c.id, node.name.clone(), step, false, None));
            }
            Layer::Block(b) => {
                block += 1;
                let first = out.len();
                let mut shortcut = None;
                b.visit_convs(&node.name, &mut |name, c| {
                    if name.ends_with(".downsample.0") {
                        let reads = c.k == 1 && c.pad == 0 && c.stride > 1;
                        shortcut = Some(reads.then_some(c.stride));
                    }
                    out.push((c.id, name.to_string(), block, false, None))
                });
                if let (Some(e), Some(reads)) = (out.get_mut(first), shortcut) {
                    (e.3, e.4) = (true, reads);
                }
            }
            _ => {}
        }
    }
    // The stem of a ResNet is step 0; VGG convs are numbered in order.
    out.sort_by_key(|e| e.0);
    out.into_iter()
        .map(|(_, n, s, sh, reads)| (n, s, sh, reads))
        .collect()
}

impl<T: Transport> SplitExec<T> {
    /// Connects (handshake), registers the network's conv layers with their current weights, and returns
    /// the executor.
    pub fn connect(transport: T, net: &mut Net, cfg: SplitConfig) -> Result<Self, CoreError> {
        let checker = if cfg.integrity {
            Some(Checker::new(DEFAULT_REPS)?)
        } else {
            None
        };
        let mut client = Client::connect(transport).map_err(CoreError::accelerator)?;
        let mut specs = Vec::new();
        net.visit_convs(&mut |_, c| {
            specs.push(ConvLayerSpec {
                id: c.id as u32,
                in_ch: c.in_ch as u32,
                out_ch: c.out_ch as u32,
                k: c.k as u32,
                stride: c.stride as u32,
                pad: c.pad as u32,
                bias: c.bias.is_some(),
            });
        });
        specs.sort_by_key(|s| s.id);
        client
            .call(&Request::Register {
                layers: specs,
                weights: Vec::new(),
            })
            .map_err(CoreError::accelerator)?
            .into_ok()
            .map_err(|e| bad_reply("Register", e))?;
        // The weights follow one layer per message, so no copy or frame ever holds more than one layer's
        // (all of VGG16's at once would be 59 MB, twice: the request and its frame).
        let mut sent = Ok(());
        net.visit_convs(&mut |_, c| {
            if sent.is_err() {
                return;
            }
            let req = Request::SetWeights {
                layer: c.id as u32,
                w: public_weights(&c.weight.value),
                b: c.bias.as_ref().map(|b| public_weights(&b.value)),
            };
            sent = client
                .call(&req)
                .map_err(CoreError::accelerator)
                .and_then(|r| r.into_ok().map_err(|e| bad_reply("SetWeights", e)));
        });
        sent?;
        client.release_buffers();
        let layers = structure(net)
            .into_iter()
            .map(|(name, step, input_shared, shortcut_reads)| LayerState {
                name,
                step,
                input_shared,
                shortcut_reads,
                ..Default::default()
            })
            .collect();
        let rng = Rng::new(cfg.seed ^ 0x5EED_0FA5);
        Ok(SplitExec {
            client,
            cfg,
            rng,
            layers,
            tconv: TrustedConv::new(),
            residual: Tensor::default(),
            dy_part: Tensor::default(),
            dw_u: Tensor::default(),
            deferred: None,
            completed: Vec::new(),
            part_bufs: Vec::new(),
            in_flight: Vec::new(),
            last_decomposed: None,
            tconv_scratch_due: false,
            split_in_step: false,
            input_side: 0,
            waited_s: 0.0,
            check: StepCheck::default(),
            step_began: None,
            checker,
            stats: Arc::default(),
            lean_v_bytes: LEAN_V_BYTES,
        })
    }

    /// In a training forward whose X_U goes slab by slab into its frame (the block SVD), a conv whose batch's
    /// V (r × H·W per sample, 4 bytes a value) would exceed `bytes` lets each sample's V go as soon as its
    /// factors are made: the slabs of X_U and Conv_T make the V they need from the input as they go (one
    /// r × N × pixels product each, per slab and per sample), as the backward does, so the batch's V is never
    /// held at once — it is the split's largest buffer at an image-like conv of a high rank (VGG16 at 224 px,
    /// asym1, the second conv: 18 MB), held on top of the training forward's activations. Default
    /// [`LEAN_V_BYTES`]; below it V is no larger than a slab and kept for speed. 0: always.
    pub fn set_lean_v_bytes(&mut self, bytes: usize) {
        self.lean_v_bytes = bytes;
    }

    /// The rank each conv used in its last forward, by conv id.
    pub fn ranks(&self) -> Vec<(String, usize)> {
        self.layers
            .iter()
            .map(|l| (l.name.clone(), l.rank))
            .collect()
    }

    /// A shared handle on the counters (readable while the executor is inside a session).
    pub fn stats(&self) -> Arc<Mutex<SplitStats>> {
        self.stats.clone()
    }

    fn count(&self, f: impl FnOnce(&mut SplitStats)) {
        if let Ok(mut s) = self.stats.lock() {
            f(&mut s);
        }
    }

    /// Adds to the counters of conv `layer` (if any).
    fn count_layer(&self, layer: Option<usize>, f: impl Fn(&mut LayerStats)) {
        let n = self.layers.len();
        self.count(|s| {
            if s.layers.len() < n {
                s.layers.resize_with(n, LayerStats::default);
            }
            if let Some(l) = layer.and_then(|l| s.layers.get_mut(l)) {
                f(l);
            }
        });
    }

    /// Sends `req`; with `reply_payload`, its reply may carry at most that many bytes of tensor data (a larger
    /// reply is refused as it arrives).
    fn send(&mut self, req: &Request, reply_payload: Option<u64>) -> Result<(), CoreError> {
        let n = req
            .tensors()
            .iter()
            .map(|(_, t)| t.payload_bytes() as u64)
            .sum::<u64>();
        let t0 = Instant::now();
        let res = match reply_payload {
            Some(bytes) => self.client.send_request_expecting(req, bytes),
            None => self.client.send_request(req),
        }
        .map_err(CoreError::accelerator);
        self.count_sent(
            req.layer().map(|l| l as usize),
            n,
            t0.elapsed().as_secs_f64(),
        );
        res
    }

    /// Counts `n` bytes of tensor data sent for conv `layer` in `dt` seconds (encoding and sending).
    fn count_sent(&self, layer: Option<usize>, n: u64, dt: f64) {
        self.count(|s| {
            s.bytes_to_untrusted += n;
            s.transfer_s += dt;
        });
        self.count_layer(layer, |l| {
            l.bytes_to += n;
            l.transfer_s += dt;
        });
    }

    /// Sends a frame whose tensor was written in place in `spent` seconds (the writing counts as the transfer's,
    /// as encoding a request does); its reply may carry at most `reply_payload` bytes of tensor data.
    fn send_frame(
        &mut self,
        frame: TensorFrame,
        spent: f64,
        reply_payload: u64,
    ) -> Result<(), CoreError> {
        let n = 4 * frame.len() as u64;
        let layer = Some(frame.layer() as usize);
        let t0 = Instant::now();
        let res = self
            .client
            .send_frame_expecting(frame, reply_payload)
            .map_err(CoreError::accelerator);
        self.count_sent(layer, n, spent + t0.elapsed().as_secs_f64());
        res
    }

    fn recv(&mut self, layer: Option<usize>) -> Result<asymml_protocol::Reply, CoreError> {
        let t0 = Instant::now();
        let r = self.client.recv_reply().map_err(CoreError::accelerator)?;
        let total = t0.elapsed().as_secs_f64();
        let decode = self.client.last_decode_s().min(total);
        self.waited_s += total - decode;
        let n = r
            .tensors()
            .iter()
            .map(|(_, t)| t.payload_bytes() as u64)
            .sum::<u64>();
        self.count(|s| {
            s.wait_s += total - decode;
            s.transfer_s += decode;
            s.bytes_from_untrusted += n;
        });
        self.count_layer(layer, |l| {
            l.wait_s += total - decode;
            l.transfer_s += decode;
            l.bytes_from += n;
        });
        Ok(r)
    }

    /// Drops the buffers the split route keeps between convs and steps (and the frame buffers).
    fn release_scratch(&mut self) {
        self.residual = Tensor::default();
        self.dy_part = Tensor::default();
        self.dw_u = Tensor::default();
        self.part_bufs = Vec::new();
        self.tconv = TrustedConv::new();
        // The last step's factorisations and projections (a step's own are made in it, before their use).
        for l in &mut self.layers {
            l.lr = BatchLowRank::default();
            l.parts = Vec::new();
            l.proj = Projection::default();
        }
        self.last_decomposed = None;
        if let Some(ch) = self.checker.as_mut() {
            ch.release_buffers();
        }
        self.client.release_buffers();
    }

    /// The accelerator's answer to the `SetWeights` of conv `id`.
    fn weights_set(&mut self, id: Option<usize>) -> Result<(), CoreError> {
        let Some(id) = id else { return Ok(()) };
        let what = format!("SetWeights(layer {id})");
        self.recv(Some(id))?
            .into_ok()
            .map_err(|e| bad_reply(&what, e).at_conv(&self.layers[id].name))
    }

    /// Counts a split forward of `conv` on an input of `x_shape` (the accelerator's FLOPs, the rank, the
    /// route).
    fn count_split_forward(&mut self, conv: &Conv2d, x_shape: &[usize]) {
        self.split_in_step = true;
        self.layers[conv.id].trusted_route = false;
        let full = 2.0 * conv.macs(x_shape) as f64;
        let st = &self.layers[conv.id];
        let (rank, name) = (st.rank, st.name.clone());
        self.count_layer(Some(conv.id), |l| {
            l.untrusted_flops += full;
            l.rank = rank;
            l.trusted_route = false;
            l.name.clone_from(&name);
        });
    }

    /// Adds trusted compute time since `since` (and FLOPs) to conv `id`.
    fn trusted(&self, id: usize, since: Instant, flops: f64) {
        let dt = since.elapsed().as_secs_f64();
        self.count_layer(Some(id), |l| {
            l.trusted_s += dt;
            l.trusted_flops += flops;
        });
    }

    /// Counts the time since `t0` as conv `id`'s merge of Y_T and Y_U (trusted work).
    fn count_merge(&self, id: usize, t0: Instant) {
        let dt = t0.elapsed().as_secs_f64();
        self.count_layer(Some(id), |l| {
            l.merge_s += dt;
            l.trusted_s += dt;
        });
    }

    /// Runs an integrity check (when on), timing it as trusted work of conv `id`; a failed check is an
    /// integrity error naming the conv.
    fn checked(
        &mut self,
        id: usize,
        f: impl FnOnce(&mut Checker) -> Result<Result<(), crate::integrity::Failure>, CoreError>,
    ) -> Result<(), CoreError> {
        let Some(ch) = self.checker.as_mut() else {
            return Ok(());
        };
        let t0 = Instant::now();
        let res = f(ch);
        let snapshot = ch.stats().clone();
        let dt = t0.elapsed().as_secs_f64();
        self.count(|s| s.integrity = snapshot);
        self.count_layer(Some(id), |l| {
            l.integrity_s += dt;
            l.trusted_s += dt;
        });
        res?.map_err(|f| f.into_error(&self.layers[id].name))
    }

    /// Tells the accelerator to stop.
    pub fn shutdown(self) -> Result<(), CoreError> {
        self.client
            .shutdown()
            .map(|_| ())
            .map_err(CoreError::accelerator)
    }
}

impl<T: Transport> SplitExec<T> {
    /// The rank policy of conv `id` (with `n` input channels and an input map of larger side `side`), or
    /// `None` for the fully-trusted route: the guard's trusted route for an image-like map, else a rank
    /// table's entry when there is a table (`"trusted"`, or a rank keeping every channel), else the policy —
    /// whose fixed or scheduled rank may keep every channel too.
    fn layer_policy(&self, id: usize, n: usize, side: usize) -> Option<RankPolicy> {
        if let Some(f) = self.cfg.guard {
            if side as f64 >= f as f64 * self.input_side as f64 {
                return None;
            }
        }
        let policy = match self
            .cfg
            .table
            .as_ref()
            .and_then(|t| t.get(&self.layers[id].name))
        {
            Some(TableRank::Route(_)) => return None,
            Some(TableRank::Rank(r)) => RankPolicy::Fixed(r),
            None => self.cfg.policy,
        };
        let fixed = match policy {
            RankPolicy::Fixed(r) => Some(r),
            RankPolicy::Schedule => Some(asymml_core::decomp::schedule_rank(self.layers[id].step)),
            _ => None,
        };
        match fixed {
            Some(r) if r >= n => None,
            _ => Some(policy),
        }
    }

    /// In the last step in which `auto_route` tries the trusted route (the split was tried first, or is the route
    /// taken), a conv lets go of its own buffers after their last use in the step: the route may turn out to be
    /// the split, and then the trusted runtime would hold both routes' buffers at once. (The earlier trial steps
    /// keep them, so that the next is measured without their allocation; once settled on the trusted route they
    /// are kept.)
    fn release_if_trying(&self, conv: &mut Conv2d) {
        let trying = self.cfg.auto_route
            && (self.check.releases(conv.id)
                || self
                    .layers
                    .get(conv.id)
                    .is_some_and(|l| l.costs.last_trusted_trial()));
        if trying {
            conv.release_buffers();
        }
    }

    /// The whole conv in the trusted runtime (nothing leaves); its backward runs here too.
    fn forward_trusted(
        &mut self,
        conv: &mut Conv2d,
        x: &Tensor,
        y: &mut Tensor,
        train: bool,
        t0: Instant,
    ) -> Result<(), CoreError> {
        self.forward_trusted_as(conv, x, y, t0, !train)
    }

    /// [`Self::forward_trusted`]; `may_release`: the conv lets go of its buffers if this is the last step of a
    /// trial of the trusted route (an inference forward; see `release_if_trying`).
    fn forward_trusted_as(
        &mut self,
        conv: &mut Conv2d,
        x: &Tensor,
        y: &mut Tensor,
        t0: Instant,
        may_release: bool,
    ) -> Result<(), CoreError> {
        let id = conv.id;
        conv.forward(x, y)?;
        if may_release {
            self.release_if_trying(conv);
        }
        let st = &mut self.layers[id];
        st.rank = conv.in_ch;
        st.trusted_route = true;
        st.shared_from = None;
        // The split route's state of this conv is not needed on this route (its backward runs here too).
        st.lr = BatchLowRank::default();
        st.parts = Vec::new();
        st.proj = Projection::default();
        self.last_decomposed = None;
        let (rank, name) = (st.rank, st.name.clone());
        self.trusted(id, t0, 2.0 * conv.macs(&x.shape) as f64);
        self.count_layer(Some(id), |l| {
            l.rank = rank;
            l.trusted_route = true;
            l.shared_basis = false;
            l.name.clone_from(&name);
        });
        Ok(())
    }
}

impl<T: Transport> SplitExec<T> {
    /// The split forward of conv `conv.id`; with `shared: Some(from)`, conv `from`'s decomposition of the same
    /// input (and its X_U, cached on the accelerator) is reused instead of decomposing again.
    fn forward_split(
        &mut self,
        conv: &mut Conv2d,
        x: &Tensor,
        y: &mut Tensor,
        train: bool,
        shared: Option<usize>,
    ) -> Result<(), CoreError> {
        self.forward_split_mapped(conv, x, y, train, shared, None)
            .map(drop)
    }

    /// [`Self::forward_split`], with BatchNorm's inference map `map` applied in the merge's pass where the conv
    /// splits (see [`ConvExec::conv_forward_mapped`]). Returns whether it was applied (then `y` holds map(Y)).
    fn forward_split_mapped(
        &mut self,
        conv: &mut Conv2d,
        x: &Tensor,
        y: &mut Tensor,
        train: bool,
        shared: Option<usize>,
        map: Option<ChannelMap<'_>>,
    ) -> Result<bool, CoreError> {
        let id = conv.id;
        let out_shape = conv.out_shape(&x.shape)?;
        self.none_in_flight()?;
        self.backward_ended()?;
        if id >= self.layers.len() {
            return Err(CoreError::accelerator(format!(
                "conv {id} was not registered"
            )));
        }
        let layer = id as u32;
        // The reply is Y_U of exactly this shape.
        let y_u_bytes = 4 * out_shape.iter().product::<usize>() as u64;
        let res = (|| {
            match shared {
                Some(from) if !self.layers[from].parts.is_empty() => {
                    self.leave_trusted_route(conv)?;
                    return self
                        .forward_shared_parts(conv, x, y, train, from)
                        .map(|()| false);
                }
                Some(from) => {
                    self.leave_trusted_route(conv)?;
                    if self.checker.is_some()
                        && conv.k == 1
                        && conv.pad == 0
                        && conv.stride > 1
                        && self.residual.shape == x.shape
                    {
                        // Its check reads only the pixels the conv reads: the block input's X_U, kept for it,
                        // shrinks to them (a quarter at stride 2) before the shortcut's Y_T and Y_U come.
                        keep_read_pixels(&mut self.residual, conv.stride);
                    }
                    // A shortcut conv: the block input was decomposed and sent for its first conv already.
                    let req = Request::ConvForwardShared {
                        layer,
                        from_layer: from as u32,
                        train,
                    };
                    self.send(&req, Some(y_u_bytes))?;
                    let t0 = Instant::now();
                    let lr = &mut self.layers[from].lr;
                    let f = TrustedConv::forward_flops(conv, lr)?;
                    // (V made again from x where the first conv's decomposition let it go.)
                    self.tconv.forward_from(conv, lr, x, y)?;
                    self.release_if_shared_trial(from);
                    self.layers[id].rank = self.layers[from].rank;
                    self.trusted(id, t0, f);
                }
                None => {
                    if !self.split_send(conv, x, y, train, false)? {
                        return Ok(false);
                    }
                }
            }
            self.receive_split(conv, x, y, train, shared, map)
        })();
        res.map_err(|e: CoreError| e.at_conv(&self.layers[id].name))
    }

    /// Stops the whole step's clock (started at a step's first conv, with `auto_route`) at `now`: the step's
    /// trusted cost goes to the check of the whole step.
    fn close_step_clock(&mut self, now: Instant) {
        if let Some((t0, w0)) = self.step_began.take() {
            self.check.close(step_cost(
                now.duration_since(t0).as_secs_f64(),
                self.waited_s - w0,
                self.cfg.route_counts_wait,
            ));
        }
    }

    /// A new step starts at the first conv (input x; a training step when `train`): notes the input's size
    /// (for `guard`), closes the last step's measurement and plans this one for `auto_route`'s check of the
    /// whole step, and lets the split's buffers go where no conv ran split in the last step, or none will in
    /// this one.
    fn step_start(&mut self, x: &Tensor, train: bool) {
        self.input_side = x.shape.iter().skip(2).copied().max().unwrap_or(0);
        // A ∇W_U check begun in a backward that failed before it was made.
        if let Some(ch) = self.checker.as_mut() {
            ch.drop_weight_check();
        }
        let now = Instant::now();
        // The last step's clock, where its end was not told (`ConvExec::step_end`).
        self.close_step_clock(now);
        // Per conv, by its own choice: whether it takes the trusted route in this step (kept there by the rank
        // policy, measured cheaper there, trying it, or following its block's first conv), and its settled
        // route where it has settled (a shortcut conv follows its block's first conv: settled with it).
        let auto = self.cfg.auto_route;
        let own: Vec<(bool, Option<bool>)> = self
            .layers
            .iter()
            .map(|l| {
                let mut c = l.costs.clone();
                c.close_step();
                let prefers = auto && c.prefers_trusted();
                if l.policy_trusted {
                    (true, Some(true))
                } else if l.shortcut {
                    (l.follows_first || prefers, Some(true))
                } else {
                    (prefers, (auto && c.settled()).then_some(prefers))
                }
            })
            .collect();
        let mut all_trusted_next = own.iter().all(|o| o.0);
        if auto {
            let routes: Option<Vec<bool>> = own.iter().map(|o| o.1).collect();
            let measured = self.check.measures(&x.shape, train);
            all_trusted_next |= self
                .check
                .plan(routes.as_deref(), all_trusted_next, measured);
            self.step_began = Some((now, self.waited_s));
            let report = self.check.report();
            self.count(|s| s.route_check = report);
        }
        if !std::mem::take(&mut self.split_in_step) || all_trusted_next {
            // No conv ran split in the last step (every one took the trusted route), or none will in this one:
            // the split's buffers are let go, so that they cost no memory while the convs' own buffers grow
            // (they grow again if a conv splits).
            self.release_scratch();
        }
    }

    /// The first half of conv `conv.id`'s split forward of its own input: the route, then the decomposition,
    /// X_U sent (from `self.residual`, which keeps it for the check) and Y_T computed into `y` — or the whole
    /// conv here. Returns whether X_U was sent (a reply is then due, for [`Self::receive_split`]). `part` (a
    /// part of a streamed forward): the step starts at its first part only, and the part is not cut further.
    fn split_send(
        &mut self,
        conv: &mut Conv2d,
        x: &Tensor,
        y: &mut Tensor,
        train: bool,
        part: bool,
    ) -> Result<bool, CoreError> {
        let id = conv.id;
        let layer = id as u32;
        let y_u_bytes = 4 * conv.out_shape(&x.shape)?.iter().product::<usize>() as u64;
        let t0 = Instant::now();
        if id == 0 && !part {
            self.step_start(x, train);
        }
        // The conv decomposed last has had its forward (and a shortcut conv reading the same input, right
        // after it): its V goes until its backward makes it again from its input.
        if let Some(l) = self.last_decomposed.and_then(|p| self.layers.get_mut(p)) {
            l.lr.drop_v();
        }
        let side = x.shape.iter().skip(2).copied().max().unwrap_or(0);
        let policy = self.layer_policy(id, conv.in_ch, side);
        self.layers[id].policy_trusted = policy.is_none();
        let Some(policy) = policy else {
            return self.forward_trusted(conv, x, y, train, t0).map(|()| false);
        };
        if self.cfg.auto_route && (self.check.forced() || self.layers[id].costs.prefers_trusted()) {
            // Measured cheaper here than the split (and nothing leaves), for this conv or for the whole step.
            return self.forward_trusted(conv, x, y, train, t0).map(|()| false);
        }
        let method = self.cfg.svd.unwrap_or(SvdMethod::light(self.cfg.iters));
        if !part && self.parts_for(x.shape[0]) > 1 {
            self.leave_trusted_route(conv)?;
            return self
                .forward_parts(conv, x, y, train, policy, method)
                .map(|()| false);
        }
        // X_U made a slab of pixels at a time straight into its frame (and checked as it is made), never whole
        // here: with the block method, for a whole batch without noise, unless a shortcut conv will read it
        // other than at the pixels of a strided 1 × 1 conv (which are then kept for its check).
        // The basis: shared where forced, or where `Basis::Auto` finds it cheaper at the same energy kept.
        let either = self.cfg.basis == Basis::Auto
            && matches!(method, SvdMethod::Block(_))
            && matches!(policy, RankPolicy::Energy(_))
            && !part;
        self.layers[id].costs.try_shared = either;
        let use_shared = match self.cfg.basis {
            Basis::Shared => true,
            Basis::PerSample => false,
            Basis::Auto => either && self.layers[id].costs.prefers_shared(),
        };
        let st = &self.layers[id];
        let in_frame = matches!(method, SvdMethod::Block(_))
            && !part
            && self.cfg.clip.is_none()
            && self.cfg.nsr == 0.0
            && (!st.input_shared || st.shortcut_reads.is_some())
            && !x.data.is_empty();
        let st = &mut self.layers[id];
        st.parts.clear();
        st.split_shared = use_shared;
        let r = if in_frame && use_shared {
            decompose_shared_factors_with(x, policy, st.step, method, &mut st.lr)?
        } else if in_frame {
            // (Only a training forward lets V go: inference holds it for Conv_T only.)
            let max_v = if train { self.lean_v_bytes } else { usize::MAX };
            decompose_factors_lean_with(x, policy, st.step, method, &mut st.lr, max_v)?
        } else if use_shared {
            decompose_batch_shared_with(x, policy, st.step, method, &mut st.lr, &mut self.residual)?
        } else {
            // (A training forward holds no more of the energy policy's scratch than a lean one's V.)
            let max = if train { self.lean_v_bytes } else { usize::MAX };
            decompose_batch_within(
                x,
                policy,
                st.step,
                method,
                &mut st.lr,
                &mut self.residual,
                max,
            )?
        };
        st.rank = r;
        let (b, n, h, w) = x.nchw("split")?;
        // With V let go, X_U's slabs and Conv_T each make it again from X: one r × N × H·W product a sample.
        let lean = !self.layers[id].lr.has_v();
        let v_flops = if lean {
            2.0 * (b * n * h * w * r) as f64
        } else {
            0.0
        };
        let svd_flops = v_flops
            + match method {
                SvdMethod::Light { iters } => light_svd_flops(b, n, h * w, r, iters),
                SvdMethod::Block(m) => block_svd_flops(b, n, h * w, r, &m),
            };
        // Every channel kept: X_U would be zero. Or, choosing the route, a rank at which Conv_T
        // would convolve all of X_T's channels: the split's trusted side would cost more than the
        // whole conv. Either way the conv runs here and nothing is sent (the step counts as a split
        // step for the route's measurement, so the next tries the trusted route undecomposed).
        if r >= n
            || (self.cfg.auto_route
                && TrustedConv::convolves_every_channel(conv, &self.layers[id].lr)?)
        {
            self.trusted(id, t0, svd_flops);
            self.layers[id].kept_all = true;
            return self
                .forward_trusted(conv, x, y, train, Instant::now())
                .map(|()| false);
        }
        self.leave_trusted_route(conv)?;
        match self.cfg.clip {
            Some(c) => {
                asymml_core::dp::clip_and_noise_batch(
                    &mut self.residual,
                    c,
                    self.cfg.nsr,
                    &mut self.rng,
                )?;
            }
            None if self.cfg.nsr > 0.0 => {
                add_noise_batch(x, &mut self.residual, self.cfg.nsr, &mut self.rng)?
            }
            None => {}
        }
        let dt = t0.elapsed().as_secs_f64();
        let shared = self.layers[id].split_shared;
        self.count_layer(Some(id), |l| {
            l.decompose_s += dt;
            l.trusted_route = false;
            l.shared_basis = shared;
        });
        self.layers[id].trusted_route = false;
        self.trusted(id, t0, svd_flops);
        if in_frame {
            self.send_residual_in_frame(conv, x, train, y_u_bytes)?;
        } else {
            self.send_residual(layer, train, y_u_bytes)?;
        }
        // The trusted convolution runs while the accelerator computes its part.
        let t0 = Instant::now();
        let lr = &mut self.layers[id].lr;
        let f = TrustedConv::forward_flops(conv, lr)? + v_flops;
        self.tconv.forward_from(conv, lr, x, y)?;
        self.release_if_shared_trial(id);
        if lean {
            self.count(|s| s.lean_forwards += 1);
        }
        self.trusted(id, t0, f);
        self.last_decomposed = Some(id);
        if train && !self.layers[id].input_shared {
            // V (r/N of X's size) is not needed again until this conv's backward makes it again from X: it
            // goes now, not at the next conv, so that it is not held through the reply and its merge. Conv_T's
            // scratch (kept for the next split conv's forward) goes when the backward begins.
            self.layers[id].lr.drop_v();
            self.tconv_scratch_due = true;
        }
        Ok(true)
    }

    /// Sends `self.residual` as the X_U of conv `layer`'s `ConvForward` (and takes its buffer back: the check
    /// reads it when Y_U comes).
    fn send_residual(&mut self, layer: u32, train: bool, y_u_bytes: u64) -> Result<(), CoreError> {
        let residual = std::mem::take(&mut self.residual);
        let req = Request::ConvForward {
            layer,
            x_u: declassify_residual_owned(residual),
            train,
        };
        let sent = self.send(&req, Some(y_u_bytes));
        if let Request::ConvForward { x_u, .. } = req {
            self.residual = x_u.reclaim_sent();
        }
        sent
    }

    /// Sends the X_U of `conv`'s input x (decomposed into `lr`) in a `ConvForward`, made a slab of pixels at a
    /// time ([`SLAB_VALUES`] values: every sample and channel, a run of pixels) and written straight into the
    /// frame; with checks on, each slab also goes through the check's pass over X_U while it is in cache, so
    /// the Y_U that comes back is checked without X_U ever being held whole here.
    fn send_residual_in_frame(
        &mut self,
        conv: &Conv2d,
        x: &Tensor,
        train: bool,
        y_u_bytes: u64,
    ) -> Result<(), CoreError> {
        let id = conv.id;
        let (b, n, h, w) = x.nchw("split")?;
        let hw = h * w;
        // Nothing of the scratch path is needed: a residual kept from an earlier conv goes.
        self.residual = Tensor::default();
        let t0 = Instant::now();
        let mut frame = self
            .client
            .start_conv_forward(id as u32, &x.shape, train)
            .map_err(CoreError::accelerator)?;
        // Seconds making X_U and checking it.
        let (mut made, mut checked) = (0.0, 0.0);
        if let Some(ch) = self.checker.as_mut() {
            let t = Instant::now();
            ch.begin_forward_stream(conv, &x.shape, train)?;
            checked += t.elapsed().as_secs_f64();
        }
        let sp = (SLAB_VALUES / (b * n).max(1)).clamp(1, SLAB_PIXELS.min(hw.max(1)));
        // A shortcut conv (1 × 1, stride s) reads this input too: the pixels it reads are kept for its check,
        // [B, N, ⌈H/s⌉, ⌈W/s⌉] (its Y_U is compared with conv(those pixels) by `check_forward_read_into`).
        let reads = self.layers[id]
            .shortcut_reads
            .filter(|_| self.layers[id].input_shared && self.checker.is_some());
        if let Some(s) = reads {
            let (oh, ow) = (h.div_ceil(s), w.div_ceil(s));
            self.residual = Tensor::zeros(&[b, n, oh, ow]);
        }
        // (A slab's buffer lives for this conv only: held between convs it would add to their peak memory.)
        let mut slab = Vec::new();
        let res = (|| {
            for p0 in (0..hw).step_by(sp) {
                let p = sp.min(hw - p0);
                let t = Instant::now();
                self.layers[id].lr.residual_slab(x, p0, p, &mut slab)?;
                made += t.elapsed().as_secs_f64();
                if let Some(ch) = self.checker.as_mut() {
                    let t = Instant::now();
                    ch.add_forward_slab(&slab, p0)?;
                    checked += t.elapsed().as_secs_f64();
                }
                for (row, vals) in slab.chunks_exact(p).enumerate() {
                    declassify_residual_into(&mut frame, row * hw + p0, vals)
                        .map_err(CoreError::accelerator)?;
                }
                if let Some(s) = reads {
                    keep_read_slab(&slab, (p0, p), (h, w), s, &mut self.residual.data);
                }
            }
            Ok::<(), CoreError>(())
        })();
        drop(slab);
        res?;
        // Making X_U is the decomposition's (trusted work), its pass of the check the check's (trusted work, as
        // the rest of the check when Y_U comes); writing it, the transfer's (as encoding is).
        self.count_layer(Some(id), |l| {
            l.decompose_s += made;
            l.integrity_s += checked;
            l.trusted_s += made + checked;
        });
        // The rest (writing X_U into the frame, and sending it) is the transfer's.
        let rest = t0.elapsed().as_secs_f64() - made - checked;
        self.send_frame(frame, rest.max(0.0), y_u_bytes)?;
        self.count(|s| s.in_frame_forwards += 1);
        Ok(())
    }

    /// The second half of a split forward: the accelerator's Y_U received, checked and added to Y_T in `y`
    /// (X_U as sent in `self.residual`, or for a shortcut conv the block input's); with `map`, y then goes
    /// through it where the check's pass merges (returns whether it did).
    fn receive_split(
        &mut self,
        conv: &Conv2d,
        x: &Tensor,
        y: &mut Tensor,
        train: bool,
        shared: Option<usize>,
        map: Option<ChannelMap<'_>>,
    ) -> Result<bool, CoreError> {
        let id = conv.id;
        self.layers[id].shared_from = shared;
        if let Some(from) = shared {
            self.layers[id].split_shared = self.layers[from].split_shared;
        }
        let what = format!("ConvForward(layer {id})");
        let frame = self.recv_conv_output(id)?;
        let merged = self.merge_received(conv, &frame, x, y, train, &what, map);
        self.client.reuse_frame(frame);
        let mapped = merged?;
        self.count_split_forward(conv, &x.shape);
        Ok(mapped)
    }
}

impl<T: Transport> SplitExec<T> {
    /// The accelerator's `ConvOutput` for conv `id`, kept in its frame (Y_U is read there, not copied out).
    fn recv_conv_output(&mut self, id: usize) -> Result<ConvOutputFrame, CoreError> {
        let t0 = Instant::now();
        let frame = self
            .client
            .recv_conv_output(id as u32)
            .map_err(CoreError::accelerator)?;
        let n = 4 * frame.y_u().shape().iter().product::<usize>() as u64;
        self.count_received(id, t0.elapsed().as_secs_f64(), n);
        Ok(frame)
    }

    /// The accelerator's `kind` reply (`ConvGrads`, `InputGrad` or `WeightGrad`) for conv `id`, kept in its
    /// frame.
    fn recv_grads(&mut self, kind: MessageKind, id: usize) -> Result<ConvGradsFrame, CoreError> {
        let t0 = Instant::now();
        let frame = self
            .client
            .recv_grads(kind, id as u32)
            .map_err(CoreError::accelerator)?;
        self.count_received(id, t0.elapsed().as_secs_f64(), frame.payload_bytes());
        Ok(frame)
    }

    /// Counts a reply of `bytes` bytes of tensor data for conv `id`, waited for `waited` seconds.
    fn count_received(&mut self, id: usize, waited: f64, bytes: u64) {
        self.waited_s += waited;
        self.count(|s| {
            s.wait_s += waited;
            s.bytes_from_untrusted += bytes;
        });
        self.count_layer(Some(id), |l| {
            l.wait_s += waited;
            l.bytes_from += bytes;
        });
    }

    /// Y = Y_T + Y_U into `y` (which holds Y_T), Y_U read from its frame in the pass that checks it against the
    /// trusted weights on the residual exactly as it was sent (for a shortcut conv, its block input's, still in
    /// the scratch) — with checks on; else in a pass that refuses non-finite values. With checks on and `map`,
    /// that pass writes map(Y) instead (returns true). `y` is not to be used when this fails.
    #[allow(clippy::too_many_arguments)]
    fn merge_received(
        &mut self,
        conv: &Conv2d,
        frame: &ConvOutputFrame,
        x: &Tensor,
        y: &mut Tensor,
        train: bool,
        what: &str,
        map: Option<ChannelMap<'_>>,
    ) -> Result<bool, CoreError> {
        let id = conv.id;
        let y_u = frame.y_u();
        let out_shape = y.shape.clone();
        if self.checker.is_none() {
            let t0 = Instant::now();
            let r = y_u
                .add_into_checked(&out_shape, y)
                .map_err(|e| bad_reply(what, e));
            self.count_merge(id, t0);
            return r.map(|()| false);
        }
        // The map goes into the check's pass only where the output is the whole conv's, in inference.
        let map = map.filter(|m| !train && m.channels() == conv.out_ch);
        let words = y_u
            .words_unscanned(&out_shape)
            .map_err(|e| bad_reply(what, e))?;
        let name_found = |e| {
            let found = y_u.first_non_finite().map(|(_, v)| v);
            pipeline::name_found(what, found, &out_shape, "Y_U", e)
        };
        if self.checker.as_ref().is_some_and(|ch| ch.streaming(id)) {
            // The check's pass over X_U was made as X_U went into its frame.
            let mut proj = std::mem::take(&mut self.layers[id].proj);
            let checked = self
                .checked(id, |ch| {
                    let proj = train.then_some(&mut proj);
                    ch.finish_forward_stream_into(conv, &x.shape, words, proj, &mut y.data, map)
                })
                .map_err(name_found);
            self.layers[id].proj = proj;
            return checked.map(|()| map.is_some());
        }
        let residual = std::mem::take(&mut self.residual);
        let mut proj = std::mem::take(&mut self.layers[id].proj);
        // (A shortcut's block input X_U may be kept at the pixels the conv reads only: `keep_read_pixels`.)
        let read_only = self.layers[id].shared_from.is_some()
            && residual.shape != x.shape
            && !residual.data.is_empty();
        // The check's pass over Y_U also catches a NaN or infinity (its sums turn non-finite and it fails), so
        // the values are not scanned first; a failed check names such a value instead. (A training forward
        // also keeps, from the same pass over X_U, the ∇W_U check's projection.)
        let checked = self
            .checked(id, |ch| {
                let proj = train.then_some(&mut proj);
                let (x_u, y) = (&residual.data, &mut y.data);
                if read_only {
                    ch.check_forward_read_into(conv, x_u, &x.shape, words, proj, y)
                } else {
                    ch.check_forward_into(conv, x_u, &x.shape, words, proj, y, map)
                }
            })
            .map_err(name_found);
        self.layers[id].proj = proj;
        // A shortcut conv is the last to read its block input's X_U: it goes (the largest input of a ResNet
        // stage, held through the rest of the forward otherwise). Else it stays, as scratch for the next.
        if self.layers[id].shared_from.is_none() {
            self.residual = residual;
        }
        checked.map(|()| map.is_some() && !read_only)
    }
}

impl<T: Transport> ConvExec for SplitExec<T> {
    fn conv_forward(
        &mut self,
        conv: &mut Conv2d,
        x: &Tensor,
        y: &mut Tensor,
        train: bool,
    ) -> Result<(), CoreError> {
        self.measured(conv.id, true, |s| s.forward_split(conv, x, y, train, None))
    }

    fn conv_forward_mapped(
        &mut self,
        conv: &mut Conv2d,
        x: &Tensor,
        y: &mut Tensor,
        map: ChannelMap<'_>,
    ) -> Result<bool, CoreError> {
        let mut mapped = false;
        self.measured(conv.id, true, |s| {
            mapped = s.forward_split_mapped(conv, x, y, false, None, Some(map))?;
            Ok(())
        })?;
        if mapped {
            self.count(|s| s.mapped_forwards += 1);
        }
        Ok(mapped)
    }

    fn conv_forward_same_input(
        &mut self,
        conv: &mut Conv2d,
        x: &Tensor,
        y: &mut Tensor,
        train: bool,
        same_input_as: usize,
    ) -> Result<(), CoreError> {
        // Reuse only the decomposition made just before, of this very input.
        let shared = (self.last_decomposed == Some(same_input_as)).then_some(same_input_as);
        let follows = shared.is_none() && self.cfg.auto_route;
        if let Some(l) = self.layers.get_mut(conv.id) {
            l.follows_first = follows;
            l.shortcut = true;
        }
        if follows && conv.id < self.layers.len() {
            // The block's first conv took the trusted route: its split, which would have saved k² times this
            // conv's work (a 1 × 1 shortcut beside a k × k conv) for the same decomposition of the same input,
            // cost more than the conv. So would this conv's, and alone it would pay that decomposition by
            // itself (ResNet34 at 32 px: 25 ms against 2.3 ms here). Its own route costs are not measured in
            // such a step: those of its split route were measured with the decomposition shared.
            let t0 = Instant::now();
            return self.measured_as(conv.id, true, false, |s| {
                s.forward_trusted_as(conv, x, y, t0, false)
            });
        }
        self.measured(conv.id, true, |s| {
            s.forward_split(conv, x, y, train, shared)
        })
    }

    fn conv_backward(
        &mut self,
        conv: &mut Conv2d,
        x: &Tensor,
        dy: &Tensor,
        dx: Option<&mut Tensor>,
    ) -> Result<(), CoreError> {
        if std::mem::take(&mut self.tconv_scratch_due) {
            // The training forward's Conv_T scratch: not needed again until the next step's forward, it would add
            // to the backward's peak memory.
            self.tconv.release_forward_scratch();
        }
        if !self.layers.get(conv.id).is_some_and(|l| l.trusted_route) {
            // The conv before's ∇W_U first: its reply comes before this conv's.
            self.settle_measured()?;
        }
        self.measured(conv.id, false, |s| s.backward_conv(conv, x, dy, dx))
    }

    fn backward_end(&mut self, net: &mut Net) -> Result<(), CoreError> {
        let settled = self.settle_measured();
        if !self.completed.is_empty() {
            let mut done = std::mem::take(&mut self.completed);
            for conv in net.convs_mut() {
                if let Some(i) = done.iter().position(|(id, _)| *id == conv.id) {
                    conv.weight.grad = done.swap_remove(i).1;
                }
            }
        }
        settled
    }

    fn stream_parts(&self, b: usize) -> Vec<std::ops::Range<usize>> {
        self.stream_ranges(b)
    }

    fn conv_forward_begin(
        &mut self,
        conv: &mut Conv2d,
        x: &Tensor,
        y: &mut Tensor,
        part: &StreamPart,
    ) -> Result<(), CoreError> {
        self.measured_as(conv.id, part.index == 0, true, |s| {
            s.begin_part(conv, x, y, part)
        })
    }

    fn conv_forward_finish(
        &mut self,
        conv: &mut Conv2d,
        x: &Tensor,
        y: &mut Tensor,
        part: &StreamPart,
    ) -> Result<(), CoreError> {
        self.measured_as(conv.id, false, false, |s| s.finish_part(conv, x, y, part))
    }

    fn after_update(&mut self, net: &mut Net) -> Result<(), CoreError> {
        // The trusted runtime's new weights go to the accelerator only for the convs that ran split in this
        // step (they will most likely split in the next one); a conv on the fully-trusted route keeps its update
        // here — the accelerator does not need it, and it carries ∇W — until it next splits
        // (`leave_trusted_route`). At most two layers' requests are outstanding: the next is on its way while
        // one is applied, and the frames in flight never hold every layer's weights at once.
        let mut pending = std::collections::VecDeque::new();
        for c in net.convs_mut() {
            if self.layers.get(c.id).is_some_and(|l| l.trusted_route) {
                self.layers[c.id].stale_weights = true;
                continue;
            }
            if pending.len() >= 2 {
                self.weights_set(pending.pop_front())?;
            }
            self.send_weights(c)?;
            pending.push_back(c.id);
        }
        while let Some(id) = pending.pop_front() {
            self.weights_set(Some(id))?;
        }
        Ok(())
    }

    fn step_end(&mut self) {
        self.close_step_clock(Instant::now());
    }
}

impl<T: Transport> SplitExec<T> {
    /// Sends conv `c`'s trusted weights (`SetWeights`); the weights' own buffer is lent to the request and taken
    /// back once encoded (no copy). The accelerator's answer is for [`Self::weights_set`].
    fn send_weights(&mut self, c: &mut Conv2d) -> Result<(), CoreError> {
        let req = Request::SetWeights {
            layer: c.id as u32,
            w: declassify_updated_weights_owned(std::mem::take(&mut c.weight.value)),
            b: c.bias
                .as_ref()
                .map(|b| declassify_updated_weights(&b.value)),
        };
        let sent = self.send(&req, None);
        if let Request::SetWeights { w, .. } = req {
            c.weight.value = w.reclaim_sent();
        }
        if sent.is_ok() {
            if let Some(l) = self.layers.get_mut(c.id) {
                l.stale_weights = false;
            }
        }
        sent
    }

    /// After Conv_T of a conv whose decomposition is conv `owner`'s: in a trial of the shared basis
    /// ([`Basis::Auto`]), its Conv_T scratch (W' of the batch and its transform, which the per-sample route does
    /// not grow) goes now, so that the trial does not hold it beside the buffers of the routes tried before
    /// (ResNet18 at 32 px, asym1: +40 MB over trusted-only's peak otherwise).
    fn release_if_shared_trial(&mut self, owner: usize) {
        let l = &self.layers[owner];
        if l.split_shared && l.costs.try_shared && l.costs.shared.1 < ROUTE_TRIALS {
            self.tconv.release_forward_scratch();
        }
    }

    /// Before conv `c` splits: its own buffers (from steps on the trusted route) are let go, so that the trusted
    /// runtime does not hold both routes' memory, and the weights kept back while it took the trusted route are
    /// sent now.
    fn leave_trusted_route(&mut self, c: &mut Conv2d) -> Result<(), CoreError> {
        c.release_buffers();
        if self.layers.get(c.id).is_some_and(|l| l.stale_weights) {
            self.send_weights(c)?;
            self.weights_set(Some(c.id))?;
        }
        Ok(())
    }
}

/// A conv's cost on its route in one call: the `elapsed` seconds, less the `blocked` ones spent waiting for
/// the accelerator unless `counts_wait`.
fn step_cost(elapsed: f64, blocked: f64, counts_wait: bool) -> f64 {
    if counts_wait {
        elapsed
    } else {
        elapsed - blocked
    }
}

impl<T: Transport> SplitExec<T> {
    /// Runs `f` (a forward when `forward`, else a backward of conv `id`), adding the trusted runtime's time
    /// in it — less the time blocked on the accelerator, unless `route_counts_wait` — to the conv's cost on
    /// the route it takes; a forward first closes the previous step's measurement.
    fn measured(
        &mut self,
        id: usize,
        forward: bool,
        f: impl FnOnce(&mut Self) -> Result<(), CoreError>,
    ) -> Result<(), CoreError> {
        self.measured_as(id, forward, forward, f)
    }

    /// [`Self::measured`], closing the previous step's measurement only when `opens_step` and noting the route
    /// taken only when `takes_route` (a streamed forward's conv is called once per part, and to finish each).
    fn measured_as(
        &mut self,
        id: usize,
        opens_step: bool,
        takes_route: bool,
        f: impl FnOnce(&mut Self) -> Result<(), CoreError>,
    ) -> Result<(), CoreError> {
        if opens_step {
            if let Some(l) = self.layers.get_mut(id) {
                l.costs.close_step();
            }
        }
        let (t0, w0) = (Instant::now(), self.waited_s);
        let res = f(self);
        let cost = step_cost(
            t0.elapsed().as_secs_f64(),
            self.waited_s - w0,
            self.cfg.route_counts_wait,
        );
        // A step in which the check of the whole step puts every conv on the trusted route is not one of the
        // conv's own routes: it is not counted, so that the convs' settled routes stay those the check weighed
        // (counted, its trusted steps would lower the trusted cost of the convs that split, turn some of them,
        // and make the check measure new routes again, their first steps paying for the buffers).
        let forced = self.check.forced();
        if let Some(l) = self.layers.get_mut(id) {
            if takes_route {
                let trusted = l.trusted_route && !std::mem::take(&mut l.kept_all);
                if forced {
                    l.costs.current = None;
                } else {
                    l.costs.take_route(trusted, l.split_shared);
                }
            }
            l.costs.spent += cost.max(0.0);
        }
        res
    }

    /// The backward of conv `conv.id` on the route its forward took.
    fn backward_conv(
        &mut self,
        conv: &mut Conv2d,
        x: &Tensor,
        dy: &Tensor,
        dx: Option<&mut Tensor>,
    ) -> Result<(), CoreError> {
        let id = conv.id;
        if id >= self.layers.len() {
            return Err(CoreError::accelerator(format!(
                "conv {id} was not registered"
            )));
        }
        // The residuals kept for the forward's checks are not needed in the backward: their memory (the size
        // of the largest split conv's input) is free while the backward's buffers grow.
        if !self.residual.data.is_empty() || !self.part_bufs.is_empty() {
            self.residual = Tensor::default();
            self.part_bufs = Vec::new();
        }
        if self.layers[id].trusted_route {
            let t0 = Instant::now();
            let passes = if dx.is_some() { 2.0 } else { 1.0 };
            conv.backward(x, dy, dx)?;
            self.release_if_trying(conv);
            self.trusted(id, t0, passes * 2.0 * conv.macs(&x.shape) as f64);
            return Ok(());
        }
        let layer = id as u32;
        // ∇X first and ∇W_U later (the pipelined backward), where there is a ∇X to go on with.
        let pipelined = self.cfg.pipelined_backward && dx.is_some();
        let res = (|| {
            // The reply is ∇W_U, and ∇X of the input's shape when asked for.
            let dw_bytes = 4 * conv.weight.value.len() as u64;
            let dx_bytes = if dx.is_some() { 4 * x.len() as u64 } else { 0 };
            // ∇Y straight from the network's buffer into the frame (no copy of its own first).
            let t0 = Instant::now();
            let frame = if pipelined {
                self.client.start_input_grad(layer, &dy.shape)
            } else {
                self.client
                    .start_conv_backward(layer, &dy.shape, dx.is_some())
            }
            .and_then(|mut f| declassify_output_grad_into(&mut f, dy).map(|()| f))
            .map_err(CoreError::accelerator)?;
            if pipelined {
                self.send_frame(frame, t0.elapsed().as_secs_f64(), dx_bytes)?;
                self.send(&Request::ConvWeightGrad { layer }, Some(dw_bytes))?;
            } else {
                self.send_frame(frame, t0.elapsed().as_secs_f64(), dx_bytes + dw_bytes)?;
            }
            let t0 = Instant::now();
            let owner = self.layers[id].shared_from.unwrap_or(id);
            // ∇W_T straight into the trusted parameter's gradient (∇W = ∇W_T + ∇W_U; ∇W_U is added once
            // checked). On an error the step fails and its gradient is not used.
            let w_shape = conv.weight.value.shape.clone();
            let mut grad = std::mem::take(&mut conv.weight.grad);
            if grad.shape != w_shape || grad.len() != conv.weight.value.len() {
                grad = Tensor::zeros(&w_shape);
            }
            let f = if !self.layers[owner].parts.is_empty() {
                self.add_weight_grad_parts(conv, owner, dy, &mut grad)
            } else {
                // V was let go after the forward: made again from the input, a sample at a time.
                let lr = &mut self.layers[owner].lr;
                self.tconv
                    .add_weight_grad_from(conv, lr, x, dy, &mut grad)
                    .and_then(|()| TrustedConv::flops(conv, lr))
            };
            if pipelined {
                // ∇W stays out of the conv until ∇W_U is added (`settle_weight_grad`).
                self.deferred = Some((id, grad));
            } else {
                conv.weight.grad = grad;
            }
            self.trusted(id, t0, f?);
            let passes = if dx.is_some() { 2.0 } else { 1.0 };
            let full = passes * 2.0 * conv.macs(&x.shape) as f64;
            self.count_layer(Some(id), |l| l.untrusted_flops += full);
            if pipelined {
                return self.receive_input_grad(conv, x, dy, dx);
            }
            let what = format!("ConvBackward(layer {id})");
            let frame = self.recv_grads(MessageKind::ConvGrads, id)?;
            // ∇X straight into the caller's buffer and ∇W_U into a kept one, each value read once from the frame.
            // With checks on, ∇X's values are not scanned first: the check's pass over them fails on a NaN or
            // infinity, and then names it. (`dx` is not to be used when this fails.)
            let scanned = self.checker.is_none();
            let mut dx = dx;
            let mut dw_u = std::mem::take(&mut self.dw_u);
            let copied = frame.grads().and_then(|(got_dx, got_dw)| {
                got_dw
                    .ok_or_else(|| ProtocolError::Misuse("∇W_U was not sent".into()))?
                    .copy_into(&w_shape, &mut dw_u, true)?;
                match (dx.as_deref_mut(), got_dx) {
                    (Some(d), Some(g)) => g.copy_into(&x.shape, d, scanned),
                    (None, None) => Ok(()),
                    (Some(_), None) => Err(ProtocolError::Misuse(
                        "∇X was asked for but not sent".into(),
                    )),
                    (None, Some(_)) => Err(ProtocolError::Misuse("∇X was sent unasked".into())),
                }
            });
            self.client.reuse_grads_frame(frame);
            if let Err(e) = copied {
                self.dw_u = dw_u;
                return Err(bad_reply(&what, e));
            }
            // ∇X and ∇W_U against the trusted weights and the residual's projection kept by the forward.
            let proj = std::mem::take(&mut self.layers[id].proj);
            let checked = self.checked(id, |ch| {
                ch.check_backward(
                    conv,
                    &proj,
                    &dy.data,
                    dx.as_deref().map(|t| t.data.as_slice()),
                    &dw_u.data,
                )
            });
            // (The projection's last check: it goes, as after a pipelined backward's ∇W_U check.)
            drop(proj);
            if let Err(e) = checked {
                self.dw_u = dw_u;
                return Err(dx
                    .as_deref()
                    .and_then(|d| non_finite(&what, d))
                    .unwrap_or(e));
            }
            let t0 = Instant::now();
            // ∇W += ∇W_U (∇W_T is in already) and ∇b += Σ ∇Y, into the trusted parameters.
            add_into(&mut conv.weight.grad, &dw_u);
            self.dw_u = dw_u;
            if let Some(bias) = conv.bias.as_mut() {
                asymml_core::layers::conv::add_bias_grad(dy, &mut bias.grad)?;
            }
            self.trusted(id, t0, 0.0);
            Ok(())
        })();
        res.map_err(|e: CoreError| e.at_conv(&self.layers[id].name))
    }

    /// The pipelined backward's ∇X of conv `conv.id` received into `dx` and checked (the same pass over ∇Y
    /// makes the ∇Y side of its ∇W_U check, for [`Self::settle_weight_grad`]); then ∇b += Σ ∇Y. `dx` is not to
    /// be used when this fails.
    fn receive_input_grad(
        &mut self,
        conv: &mut Conv2d,
        x: &Tensor,
        dy: &Tensor,
        dx: Option<&mut Tensor>,
    ) -> Result<(), CoreError> {
        let id = conv.id;
        let what = format!("ConvInputGrad(layer {id})");
        let Some(dx) = dx else {
            return Err(CoreError::Invalid(format!(
                "{what}: a pipelined backward without ∇X"
            )));
        };
        let frame = self.recv_grads(MessageKind::InputGrad, id)?;
        // As in the whole backward: with checks on, the check's pass finds a non-finite value.
        let scanned = self.checker.is_none();
        let copied = frame.grads().and_then(|(got_dx, _)| {
            got_dx
                .ok_or_else(|| ProtocolError::Misuse("∇X was not sent".into()))?
                .copy_into(&x.shape, dx, scanned)
        });
        self.client.reuse_grads_frame(frame);
        copied.map_err(|e| bad_reply(&what, e))?;
        let proj = std::mem::take(&mut self.layers[id].proj);
        let checked = self.checked(id, |ch| {
            ch.check_input_grad(conv, &proj, &dy.data, Some(&dx.data))
        });
        // The forward's projection has served its last check (the ∇W_U check's right side is made): it goes
        // (r·B·H·W values in f32, 3 MB at VGG16-224's second conv), not held while ∇W_U is computed.
        drop(proj);
        if let Err(e) = checked {
            return Err(non_finite(&what, dx).unwrap_or(e));
        }
        let t0 = Instant::now();
        if let Some(bias) = conv.bias.as_mut() {
            asymml_core::layers::conv::add_bias_grad(dy, &mut bias.grad)?;
        }
        self.trusted(id, t0, 0.0);
        Ok(())
    }

    /// An error when the last backward was not ended ([`ConvExec::backward_end`] not called, e.g. by an executor
    /// wrapping this one): a ∇W_U would still be due, and a conv's ∇W still held here.
    fn backward_ended(&self) -> Result<(), CoreError> {
        let held = self.deferred.iter().map(|d| d.0);
        match held.chain(self.completed.iter().map(|d| d.0)).next() {
            None => Ok(()),
            Some(id) => Err(CoreError::Invalid(format!(
                "the last backward was not ended (ConvExec::backward_end was not called): conv {id}'s ∇W is \
                 still held by the split runtime"
            ))),
        }
    }

    /// [`Self::settle_weight_grad`], its time counted to its conv's cost on the split route (`auto_route`).
    fn settle_measured(&mut self) -> Result<(), CoreError> {
        match self.deferred.as_ref().map(|d| d.0) {
            Some(id) => self.measured(id, false, |s| s.settle_weight_grad()),
            None => Ok(()),
        }
    }

    /// The pipelined backward's ∇W_U still due (of the split conv whose backward ran last), if any: received,
    /// checked against the ∇Y side its ∇X check made and the projection its forward kept, and added to that
    /// conv's ∇W, which goes back to the conv at the backward's end (also when this fails: the step fails
    /// then, and its gradient is not used).
    fn settle_weight_grad(&mut self) -> Result<(), CoreError> {
        let Some((id, mut grad)) = self.deferred.take() else {
            return Ok(());
        };
        let res = (|| {
            let what = format!("ConvWeightGrad(layer {id})");
            let frame = self.recv_grads(MessageKind::WeightGrad, id)?;
            let mut dw_u = std::mem::take(&mut self.dw_u);
            let copied = frame.grads().and_then(|(_, got_dw)| {
                got_dw
                    .ok_or_else(|| ProtocolError::Misuse("∇W_U was not sent".into()))?
                    .copy_into(&grad.shape, &mut dw_u, true)
            });
            self.client.reuse_grads_frame(frame);
            if let Err(e) = copied {
                self.dw_u = dw_u;
                return Err(bad_reply(&what, e));
            }
            let checked = self.checked(id, |ch| ch.check_weight_grad(id, &dw_u.data));
            if let Err(e) = checked {
                self.dw_u = dw_u;
                return Err(e);
            }
            let t0 = Instant::now();
            add_into(&mut grad, &dw_u);
            self.dw_u = dw_u;
            self.trusted(id, t0, 0.0);
            Ok(())
        })();
        self.completed.push((id, grad));
        res.map_err(|e: CoreError| e.at_conv(&self.layers[id].name))
    }
}

/// When a check of ∇X (`dx`, received for `what`) failed: an error naming its first non-finite value, if it has
/// one (the check's pass fails on such a value; the reply is then refused for it).
/// The pixels a 1 × 1 conv of stride s without padding reads, from a slab of X_U ([B·N rows of `p` pixels,
/// from pixel `p0` of an H × W map]), into `out` ([B, N, ⌈H/s⌉, ⌈W/s⌉]).
fn keep_read_slab(
    slab: &[f32],
    (p0, p): (usize, usize),
    (h, w): (usize, usize),
    s: usize,
    out: &mut [f32],
) {
    let (oh, ow) = (h.div_ceil(s), w.div_ceil(s));
    for (row, vals) in slab.chunks_exact(p).enumerate() {
        let plane = &mut out[row * oh * ow..(row + 1) * oh * ow];
        // The slab's pixels by runs within one image row.
        let mut i = 0;
        while i < p {
            let (y, x0) = ((p0 + i) / w, (p0 + i) % w);
            let len = (w - x0).min(p - i);
            if y % s == 0 {
                let dst = &mut plane[(y / s) * ow..][..ow];
                for x in (x0.next_multiple_of(s)..x0 + len).step_by(s) {
                    dst[x / s] = vals[i + x - x0];
                }
            }
            i += len;
        }
    }
}

/// t [B, N, H, W] ← its pixels that a 1 × 1 conv of stride s without padding reads, [B, N, OH, OW] with
/// OH = ⌈H/s⌉, OW = ⌈W/s⌉, in place (each value moves to an index no larger than its own), the buffer shrunk
/// to them.
fn keep_read_pixels(t: &mut Tensor, s: usize) {
    let &[b, n, h, w] = t.shape.as_slice() else {
        return;
    };
    if s < 2 || t.data.len() != b * n * h * w {
        return;
    }
    let (oh, ow) = (h.div_ceil(s), w.div_ceil(s));
    let mut at = 0;
    for plane in 0..b * n {
        for oy in 0..oh {
            let row = (plane * h + oy * s) * w;
            for ox in 0..ow {
                t.data[at] = t.data[row + ox * s];
                at += 1;
            }
        }
    }
    t.data.truncate(at);
    t.data.shrink_to_fit();
    t.shape = vec![b, n, oh, ow];
}

fn non_finite(what: &str, dx: &Tensor) -> Option<CoreError> {
    let v = dx.data.iter().find(|v| !v.is_finite())?;
    Some(bad_reply(
        what,
        ProtocolError::Tensor(format!(
            "non-finite value {v} in ∇X of shape {:?}",
            dx.shape
        )),
    ))
}

/// `grad` += `part` (∇W_U into a ∇W holding ∇W_T).
fn add_into(grad: &mut Tensor, part: &Tensor) {
    grad.data
        .iter_mut()
        .zip(&part.data)
        .for_each(|(g, b)| *g += b);
}

#[cfg(test)]
mod tests {
    use super::{
        keep_read_pixels, keep_read_slab, step_cost, Basis, RouteCosts, SplitConfig, SvdMethod,
        ROUTE_PROBE_STEPS,
    };
    use asymml_core::Tensor;

    #[test]
    fn the_pixels_a_strided_shortcut_reads_are_kept_slab_by_slab_as_from_the_whole() {
        for &(b, n, h, w, s, sp) in &[
            (2usize, 3usize, 7usize, 5usize, 2usize, 4usize),
            (1, 2, 8, 8, 2, 64),
            (3, 1, 10, 9, 3, 7),
            (2, 2, 6, 6, 2, 1),
        ] {
            let hw = h * w;
            let x: Vec<f32> = (0..b * n * hw).map(|i| i as f32 + 0.5).collect();
            let mut whole = Tensor::from_vec(&[b, n, h, w], x.clone()).unwrap();
            keep_read_pixels(&mut whole, s);
            assert_eq!(whole.shape, vec![b, n, h.div_ceil(s), w.div_ceil(s)]);
            // Pixel (s·oy, s·ox) of plane q.
            for (q, plane) in whole
                .data
                .chunks_exact(h.div_ceil(s) * w.div_ceil(s))
                .enumerate()
            {
                for (i, &v) in plane.iter().enumerate() {
                    let (oy, ox) = (i / w.div_ceil(s), i % w.div_ceil(s));
                    assert_eq!(v, x[q * hw + oy * s * w + ox * s]);
                }
            }
            let mut kept = vec![f32::NAN; whole.len()];
            for p0 in (0..hw).step_by(sp) {
                let p = sp.min(hw - p0);
                let slab: Vec<f32> = x
                    .chunks_exact(hw)
                    .flat_map(|r| r[p0..p0 + p].to_vec())
                    .collect();
                keep_read_slab(&slab, (p0, p), (h, w), s, &mut kept);
            }
            assert_eq!(kept, whole.data, "{b} {n} {h} {w} s {s} slabs of {sp}");
        }
    }

    #[test]
    fn a_convs_cost_counts_its_waits_only_when_asked() {
        assert_eq!(step_cost(0.5, 0.2, false), 0.3);
        assert_eq!(step_cost(0.5, 0.2, true), 0.5);
        // A conv that mostly waits: cheap in trusted work, dear in wall time.
        assert!(step_cost(1.0, 0.9, false) < step_cost(0.4, 0.0, false));
        assert!(step_cost(1.0, 0.9, true) > step_cost(0.4, 0.0, true));
    }

    /// Drives `c` through steps of the given route and cost.
    fn step(c: &mut RouteCosts, trusted: bool, cost: f64) {
        c.close_step();
        c.current = Some(trusted);
        c.spent = cost;
    }

    #[test]
    fn routes_are_tried_three_times_each_then_the_cheaper_is_taken() {
        let mut c = RouteCosts::default();
        // Three split steps (the first one pays for its buffers), then three trusted ones.
        for (i, cost) in [5.0, 2.0, 2.2].into_iter().enumerate() {
            c.close_step();
            assert!(!c.prefers_trusted(), "split step {i}");
            step(&mut c, false, cost);
        }
        for (i, cost) in [3.0, 2.5, 2.6].into_iter().enumerate() {
            c.close_step();
            assert!(c.prefers_trusted());
            // Only the last trusted trial lets go of the conv's buffers.
            assert_eq!(c.last_trusted_trial(), i == 2, "trusted trial {i}");
            step(&mut c, true, cost);
        }
        c.close_step();
        // Least costs: split 2.0, trusted 2.5: the split stays (cheaper by more than the margin).
        assert_eq!((c.split, c.trusted), ((2.0, 3), (2.5, 3)));
        assert_eq!(ROUTE_PROBE_STEPS, 6);
        assert!(!c.prefers_trusted());
        // A cheaper trusted step seen later (e.g. after the split's rank grew) is not forgotten.
        step(&mut c, true, 1.0);
        c.close_step();
        assert!(c.prefers_trusted());
        assert!(!c.last_trusted_trial(), "the route taken keeps its buffers");
        // Closing twice counts a step once.
        c.close_step();
        assert_eq!(c.trusted.1, 4);
    }

    /// With the shared basis forced (`--basis shared`, not on trial beside the per-sample one), its steps are
    /// the split's: after three of them and three trusted ones the routes settle, on the cheaper. (Counted
    /// apart as the shared basis's, the split's trials never ended, and no conv ever took the trusted route.)
    #[test]
    fn a_forced_shared_basis_counts_as_the_split_and_the_routes_settle() {
        let mut c = RouteCosts::default();
        for (i, cost) in [5.0, 4.0, 4.2].into_iter().enumerate() {
            c.close_step();
            assert!(!c.prefers_trusted(), "split step {i}");
            c.take_route(false, true);
            c.spent = cost;
        }
        for (i, cost) in [3.0, 2.5, 2.6].into_iter().enumerate() {
            c.close_step();
            assert!(c.prefers_trusted(), "trusted step {i}");
            assert_eq!(c.last_trusted_trial(), i == 2, "trusted trial {i}");
            c.take_route(true, false);
            c.spent = cost;
        }
        c.close_step();
        assert_eq!(
            (c.split, c.shared, c.trusted),
            ((4.0, 3), (0.0, 0), (2.5, 3))
        );
        assert!(c.settled());
        assert!(c.prefers_trusted(), "the trusted route is cheaper");
        // On trial beside the per-sample basis, the shared basis's steps are counted apart.
        let mut c = RouteCosts {
            try_shared: true,
            ..RouteCosts::default()
        };
        c.take_route(false, true);
        c.spent = 1.0;
        c.close_step();
        assert_eq!((c.split.1, c.shared), (0, (1.0, 1)));
    }

    #[test]
    fn a_split_within_the_margin_of_the_trusted_route_is_not_taken() {
        let trials = |split: f64, trusted: f64| {
            let mut c = RouteCosts::default();
            run(&mut c, 0..3, split, 0.0);
            run(&mut c, 3..6, 0.0, trusted);
            c.close_step();
            c.prefers_trusted()
        };
        // 5 % cheaper split: a near tie, and nothing leaves on the trusted route.
        assert!(trials(1.0, 1.05));
        assert!(trials(1.0, 1.0999));
        // More than a tenth cheaper: the split.
        assert!(!trials(1.0, 1.11));
        assert!(!trials(1.0, 3.0));
    }

    /// With both bases on trial: the per-sample basis three steps, the shared one three, the trusted route
    /// three; then the split takes the cheaper basis, and the route compares the trusted cost with that one.
    #[test]
    fn the_shared_basis_is_tried_after_the_per_sample_one_and_the_cheaper_kept() {
        let probe = |sample: f64, shared: f64, trusted: f64| {
            let mut c = RouteCosts {
                try_shared: true,
                ..RouteCosts::default()
            };
            let mut order = Vec::new();
            for _ in 0..9 {
                c.close_step();
                let (t, sh) = (c.prefers_trusted(), c.prefers_shared());
                order.push(if t {
                    'T'
                } else if sh {
                    'H'
                } else {
                    'S'
                });
                assert_eq!(c.last_trusted_trial(), order.len() == 9 && t);
                step(
                    &mut c,
                    t,
                    if t {
                        trusted
                    } else if sh {
                        shared
                    } else {
                        sample
                    },
                );
                c.current_shared = !t && sh;
            }
            c.close_step();
            let order: String = order.into_iter().collect();
            (order, c.prefers_trusted(), c.prefers_shared())
        };
        let config = |basis, auto_route| SplitConfig {
            basis,
            auto_route,
            svd: Some(SvdMethod::block()),
            ..SplitConfig::default()
        };
        // With `auto_route`, the check of the whole step's steps too (with both bases on trial, those with every
        // conv trusted as well: the convs' trials may not have tried the trusted route all in the same steps).
        assert_eq!(config(Basis::Auto, true).probe_steps(), 9 + 6);
        assert_eq!(config(Basis::Auto, false).probe_steps(), 6);
        assert_eq!(
            config(Basis::Shared, true).probe_steps(),
            ROUTE_PROBE_STEPS + 3
        );
        assert_eq!(config(Basis::PerSample, false).probe_steps(), 0);
        // Shared cheaper, trusted dearer than it: split with the shared basis.
        assert_eq!(probe(3.0, 2.0, 2.5), ("SSSHHHTTT".into(), false, true));
        // Per-sample cheaper: split per sample.
        assert_eq!(probe(2.0, 3.0, 2.5), ("SSSHHHTTT".into(), false, false));
        // The trusted route against the cheaper basis: within the margin of it, trusted.
        assert!(probe(3.0, 2.0, 2.1).1);
        assert!(!probe(3.0, 2.0, 2.3).1);
    }

    /// Runs steps `steps` (by index) at the given cost per route; the steps (index, trusted) it took.
    fn run(
        c: &mut RouteCosts,
        steps: std::ops::Range<u32>,
        split: f64,
        trusted: f64,
    ) -> Vec<(u32, bool)> {
        let mut taken = Vec::new();
        for i in steps {
            c.close_step();
            assert_eq!(c.steps(), i);
            let t = c.prefers_trusted();
            taken.push((i, t));
            step(c, t, if t { trusted } else { split });
        }
        taken
    }

    #[test]
    fn the_route_not_taken_is_tried_again_at_powers_of_two() {
        let mut c = RouteCosts::default();
        // Trials: a slow spell of the machine makes the split look dearer than it is (3.1, against 2.0).
        run(&mut c, 0..3, 3.1, 0.0);
        run(&mut c, 3..6, 0.0, 3.0);
        // Settled on the trusted route until step 64; then the split is tried on two steps, its true cost
        // (2.0) is seen, and it is taken from then on.
        let taken = run(&mut c, 6..100, 2.0, 3.0);
        let split_steps: Vec<u32> = taken.iter().filter(|s| !s.1).map(|s| s.0).collect();
        assert_eq!(split_steps, (64..100).collect::<Vec<_>>());
        // Now the trusted route is tried at 128 and 129, and at 256 and 257, and the second step of each try
        // lets go of the conv's buffers (the route may be the split again).
        let mut tried = Vec::new();
        for i in 100..300 {
            c.close_step();
            let t = c.prefers_trusted();
            if t {
                tried.push((i, c.last_trusted_trial()));
            }
            step(&mut c, t, if t { 3.0 } else { 2.0 });
        }
        assert_eq!(
            tried,
            [(128, false), (129, true), (256, false), (257, true)]
        );
        // Where the retried route is cheaper after all, it is kept.
        let mut c = RouteCosts::default();
        run(&mut c, 0..3, 2.0, 0.0);
        run(&mut c, 3..6, 0.0, 3.0);
        let taken = run(&mut c, 6..80, 2.0, 1.0);
        assert!(taken.iter().all(|s| !s.1 || s.0 >= 64), "{taken:?}");
        assert!(taken.iter().filter(|s| s.0 >= 64).all(|s| s.1), "{taken:?}");
    }
}
