//! The conv backends' common interface ([`ConvBackend`]) and the CPU backend: conv layers with their weights,
//! the residual inputs cached for backward, run on the service's own thread pool. The weights are the trusted
//! runtime's: it sends them at registration and after each of its optimizer steps (`set_weights`).

use asymml_core::layers::{Conv2d, Conv2dConfig};
use asymml_core::rng::Rng;
use asymml_core::{CoreError, Tensor};
use thiserror::Error;

/// Errors of the accelerator backend (they become error replies to the trusted side).
#[derive(Debug, Error)]
pub enum BackendError {
    #[error("no model registered")]
    NotRegistered,
    #[error("unknown conv layer {0}")]
    UnknownLayer(u32),
    #[error("layer {0}: backward before any forward (no cached residual)")]
    NoCachedInput(u32),
    #[error("layer {layer}")]
    Core {
        layer: u32,
        #[source]
        source: CoreError,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("thread pool: {0}")]
    Pool(String),
    /// Work that would take the session over its memory budget (`--max-session-bytes`); nothing was done.
    #[error(
        "{what} needs about {need} bytes with what the session holds, over its budget of {budget} bytes \
         (the accelerator's --max-session-bytes)"
    )]
    Budget {
        what: String,
        need: u64,
        budget: u64,
    },
    /// The accelerator device is missing, unusable, or failed (CUDA driver, cuDNN, NVRTC errors).
    #[error("{0}")]
    Device(String),
}

/// Time and bytes a device backend spent moving data and computing (the CPU backend keeps none).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DeviceStats {
    /// Seconds spent on host↔device copies (staging through pinned buffers included).
    pub copy_s: f64,
    /// Seconds spent in kernels (from the first launch of an operation to the stream's completion).
    pub kernel_s: f64,
    /// Bytes copied host → device.
    pub bytes_up: u64,
    /// Bytes copied device → host.
    pub bytes_down: u64,
}

/// The operations of the split mode's accelerator, whatever computes them. Layer numbers are the order of
/// [`ConvBackend::register`]; every shape is checked before anything is computed, and a bad request is an
/// error, never a panic.
pub trait ConvBackend {
    /// A short description of the device ("cpu", "cuda:0 (NVIDIA H100 …)").
    fn describe(&self) -> String;

    /// Registers the model's conv layers with their weights (and biases); replaces an earlier registration
    /// (weights and cached residuals).
    fn register(
        &mut self,
        layers: &[ConvLayer],
        weights: Vec<(Tensor, Option<Tensor>)>,
    ) -> Result<(), BackendError>;

    /// The layer's description.
    fn layer(&self, layer: u32) -> Option<ConvLayer>;

    /// Number of registered layers.
    fn num_layers(&self) -> usize;

    /// x_u: [B, C, H, W] → Y_U = conv(X_U, W) + b: [B, M, OH, OW]. The residual is kept for ∇W_U (and for a
    /// shortcut conv reading it through [`ConvBackend::forward_shared`]).
    fn forward(&mut self, layer: u32, x_u: Tensor, train: bool) -> Result<Tensor, BackendError>;

    /// Forward of `layer` on the residual cached for `from` (a ResNet shortcut conv reading its block's input).
    fn forward_shared(
        &mut self,
        layer: u32,
        from: u32,
        train: bool,
    ) -> Result<Tensor, BackendError>;

    /// Replaces the residual cached for `layer` with `x_u` ([B, C, H, W], C the layer's input channels): the
    /// whole batch's X_U assembled from the parts of a micro-batched forward, each of which [`forward`]
    /// (Self::forward) cached alone.
    fn set_cached(&mut self, layer: u32, x_u: Tensor) -> Result<(), BackendError>;

    /// Takes the residual cached for `layer` out of the backend, if it keeps it in host memory (its buffer is
    /// then reused to assemble the next batch's parts); the default keeps it and gives `None`.
    fn take_cached(&mut self, layer: u32) -> Option<Tensor> {
        let _ = layer;
        None
    }

    /// dy: [B, M, OH, OW] → (∇X = conv_transpose(∇Y, W) if `need_dx`, ∇W_U = corr(X_U, ∇Y)).
    fn backward(
        &mut self,
        layer: u32,
        dy: &Tensor,
        need_dx: bool,
    ) -> Result<(Option<Tensor>, Tensor), BackendError>;

    /// Whether [`ConvBackend::input_grad`] computes ∇X without ∇W_U (then ∇W_U is computed later, by
    /// [`ConvBackend::weight_grad`]); otherwise the service answers the two halves of a backward from one
    /// [`ConvBackend::backward`]. The default: no.
    fn splits_backward(&self) -> bool {
        false
    }

    /// dy: [B, M, OH, OW] → ∇X = conv_transpose(∇Y, W) alone. The default runs the whole backward.
    fn input_grad(&mut self, layer: u32, dy: &Tensor) -> Result<Tensor, BackendError> {
        let (dx, _) = self.backward(layer, dy, true)?;
        dx.ok_or_else(|| BackendError::Invalid(format!("layer {layer}: the backend gave no ∇X")))
    }

    /// dy: [B, M, OH, OW] → ∇W_U = corr(X_U, ∇Y) alone. The default runs the backward without ∇X.
    fn weight_grad(&mut self, layer: u32, dy: &Tensor) -> Result<Tensor, BackendError> {
        Ok(self.backward(layer, dy, false)?.1)
    }

    /// Replaces the layer's weight (and bias) with the trusted runtime's (shapes checked by the caller).
    fn set_weights(&mut self, layer: u32, w: Tensor, b: Option<Tensor>)
        -> Result<(), BackendError>;

    /// The layer's current weight and bias.
    fn weights(&mut self, layer: u32) -> Result<(Tensor, Option<Tensor>), BackendError>;

    /// Copy and kernel time and bytes moved so far (`None`: the backend keeps no such counters).
    fn stats(&self) -> Option<DeviceStats> {
        None
    }
}

/// The largest kernel size a registration may declare (ImageNet stems use 7 or 11).
pub const MAX_KERNEL: usize = 15;
/// The largest stride (strides above the kernel size skip input pixels, as 1×1 stride-2 shortcuts do).
pub const MAX_STRIDE: usize = 15;
/// The most input or output channels of one conv.
pub const MAX_CHANNELS: usize = 65536;
/// The most conv layers of one registration.
pub const MAX_LAYERS: usize = 4096;

/// The product of `factors`, `None` on overflow.
pub(crate) fn product(factors: &[u64]) -> Option<u64> {
    factors.iter().try_fold(1u64, |a, &f| a.checked_mul(f))
}

/// Shape description of one conv layer (public model structure).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvLayer {
    pub in_ch: usize,
    pub out_ch: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
    pub bias: bool,
}

impl ConvLayer {
    /// The weight's shape [M, C, k, k].
    pub fn weight_shape(&self) -> [usize; 4] {
        [self.out_ch, self.in_ch, self.k, self.k]
    }

    /// The bias's shape [M].
    pub fn bias_shape(&self) -> [usize; 1] {
        [self.out_ch]
    }

    /// Refuses geometry outside the limits ([`MAX_KERNEL`], [`MAX_STRIDE`], [`MAX_CHANNELS`]; padding below
    /// the kernel size): every size implied by an accepted layer is then small enough to compute with.
    pub fn check_geometry(&self) -> Result<(), String> {
        let l = self;
        if l.in_ch == 0 || l.out_ch == 0 || l.k == 0 || l.stride == 0 {
            return Err("channels, kernel size and stride must be positive".into());
        }
        if l.in_ch > MAX_CHANNELS || l.out_ch > MAX_CHANNELS {
            return Err(format!(
                "{} input and {} output channels: at most {MAX_CHANNELS} each",
                l.in_ch, l.out_ch
            ));
        }
        if l.k > MAX_KERNEL || l.stride > MAX_STRIDE {
            return Err(format!(
                "kernel size {} and stride {}: at most {MAX_KERNEL} and {MAX_STRIDE}",
                l.k, l.stride
            ));
        }
        if l.pad >= l.k {
            return Err(format!(
                "padding {} must be below the kernel size {}",
                l.pad, l.k
            ));
        }
        Ok(())
    }

    /// Number of parameters (weight and bias).
    pub fn params(&self) -> Option<u64> {
        let w = product(&[
            self.out_ch as u64,
            self.in_ch as u64,
            self.k as u64,
            self.k as u64,
        ])?;
        w.checked_add(if self.bias { self.out_ch as u64 } else { 0 })
    }

    /// The output map (OH, OW) over an `h`×`w` input, `None` when the kernel does not fit.
    pub fn output_hw(&self, h: usize, w: usize) -> Option<(usize, usize)> {
        let out = |n: usize| {
            let padded = n.checked_add(self.pad.checked_mul(2)?)?;
            (padded >= self.k && self.stride > 0).then(|| (padded - self.k) / self.stride + 1)
        };
        Some((out(h)?, out(w)?))
    }

    /// An upper estimate of the bytes of work space a forward or backward pass over `x` = [B, C, H, W]
    /// keeps with `threads` workers (im2col columns and their gradient, Winograd transforms, per-worker
    /// weight-gradient partials); the CPU backend keeps its scratch between calls.
    pub fn scratch_bytes(&self, x: [usize; 4], threads: usize) -> Option<u64> {
        let [b, c, h, w] = x.map(|d| d as u64);
        let (oh, ow) = self.output_hw(x[2], x[3])?;
        let (m, k) = (self.out_ch as u64, self.k as u64);
        let p = product(&[oh as u64, ow as u64])?.max(1);
        let chunks = (threads.max(1) as u64).min(b).max(1);
        let per = b.div_ceil(chunks);
        // Images per GEMM: enough for ~512 columns on small maps.
        let group = 512u64.div_ceil(p).min(per).max(1);
        let gp = product(&[group, p])?;
        let mut per_chunk = [
            product(&[2, c, k, k, gp])?, // im2col columns and their gradient
            product(&[m, gp])?,          // grouped ∇Y
            product(&[m, c, k, k])?,     // ∇W partial
        ]
        .iter()
        .try_fold(0u64, |a, &v| a.checked_add(v))?;
        let mut shared = 0;
        if (self.k, self.stride, self.pad) == (3, 1, 1) {
            // Winograd F(2×2, 3×3): V, M and ∇Y transforms over the group's 2×2 tiles, ∇U partials, padded
            // planes; the forward and flipped weight transforms.
            let tiles = product(&[group, (oh as u64).div_ceil(2), (ow as u64).div_ceil(2)])?;
            let planes = product(&[8, h.checked_add(2)?, w.checked_add(2)?])?;
            let wino = [
                product(&[16, c.checked_add(m.checked_mul(2)?)?, tiles])?,
                product(&[16, m, c])?,
                planes,
            ]
            .iter()
            .try_fold(0u64, |a, &v| a.checked_add(v))?;
            per_chunk = per_chunk.checked_add(wino)?;
            shared = product(&[32, m, c])?;
        }
        product(&[chunks, per_chunk])?
            .checked_add(shared)?
            .checked_mul(4)
    }
}

struct Slot {
    conv: Conv2d,
    /// The residual X_U of the last training forward (∇W_U needs it).
    cached: Option<Tensor>,
}

/// Conv layers and their cached residuals.
pub struct CpuBackend {
    /// The worker pool, made at the first registration.
    pool: Option<rayon::ThreadPool>,
    threads: usize,
    layers: Vec<Slot>,
    registered: bool,
}

impl CpuBackend {
    /// A backend with `threads` worker threads (0: all cores; see [`pool_threads`](crate::pool_threads)),
    /// started at the first registration.
    pub fn new(threads: usize) -> Result<Self, BackendError> {
        Ok(CpuBackend {
            pool: None,
            threads: crate::pool_threads(threads),
            layers: Vec::new(),
            registered: false,
        })
    }

    /// Registers the model's conv layers with their weights (and biases).
    pub fn register(
        &mut self,
        layers: &[ConvLayer],
        weights: Vec<(Tensor, Option<Tensor>)>,
    ) -> Result<(), BackendError> {
        check_registration(layers, &weights)?;
        if self.pool.is_none() {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(self.threads)
                .thread_name(|i| format!("accel-{i}"))
                .start_handler(|_| crate::thread_started())
                .build()
                .map_err(|e| BackendError::Pool(e.to_string()))?;
            self.pool = Some(pool);
        }
        let mut rng = Rng::new(0);
        let mut slots = Vec::with_capacity(layers.len());
        for (i, (l, (w, b))) in layers.iter().zip(weights).enumerate() {
            let mut conv = Conv2d::new(
                l.in_ch,
                l.out_ch,
                l.k,
                Conv2dConfig {
                    stride: l.stride,
                    padding: l.pad,
                    bias: l.bias,
                },
                &mut rng,
            );
            conv.id = i;
            conv.weight.value = w;
            if let (Some(p), Some(b)) = (conv.bias.as_mut(), b) {
                p.value = b;
            }
            slots.push(Slot { conv, cached: None });
        }
        self.layers = slots;
        self.registered = true;
        Ok(())
    }

    fn slot(&mut self, layer: u32) -> Result<&mut Slot, BackendError> {
        self.parts(layer).map(|(_, s)| s)
    }

    /// The thread pool and one layer's slot, borrowed together.
    fn parts(&mut self, layer: u32) -> Result<(&rayon::ThreadPool, &mut Slot), BackendError> {
        let pool = match (&self.pool, self.registered) {
            (Some(pool), true) => pool,
            _ => return Err(BackendError::NotRegistered),
        };
        let slot = self
            .layers
            .get_mut(layer as usize)
            .ok_or(BackendError::UnknownLayer(layer))?;
        Ok((pool, slot))
    }

    /// The layer's description.
    pub fn layer(&self, layer: u32) -> Option<ConvLayer> {
        self.layers.get(layer as usize).map(|s| ConvLayer {
            in_ch: s.conv.in_ch,
            out_ch: s.conv.out_ch,
            k: s.conv.k,
            stride: s.conv.stride,
            pad: s.conv.pad,
            bias: s.conv.bias.is_some(),
        })
    }

    /// Number of registered layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// x_u: [B, C, H, W] → Y_U = conv(X_U, W) + b: [B, M, OH, OW]. In training the residual is kept for ∇W_U.
    pub fn forward(
        &mut self,
        layer: u32,
        x_u: Tensor,
        train: bool,
    ) -> Result<Tensor, BackendError> {
        let (pool, slot) = self.parts(layer)?;
        // An empty tensor is refused here (the conv kernel's work split divides by the batch size).
        if x_u.shape.contains(&0) || x_u.data.is_empty() {
            return Err(BackendError::Invalid(format!(
                "layer {layer}: empty input {:?}",
                x_u.shape
            )));
        }
        let mut y = Tensor::default();
        pool.install(|| slot.conv.forward(&x_u, &mut y))
            .map_err(|source| BackendError::Core { layer, source })?;
        // Kept in inference too: a ResNet shortcut conv reads the residual of its block's first conv.
        let _ = train;
        slot.cached = Some(x_u);
        Ok(y)
    }

    /// Forward of `layer` on the residual cached for `from` (a ResNet shortcut conv reading its block's input).
    pub fn forward_shared(
        &mut self,
        layer: u32,
        from: u32,
        train: bool,
    ) -> Result<Tensor, BackendError> {
        let x_u = self
            .slot(from)?
            .cached
            .clone()
            .ok_or(BackendError::NoCachedInput(from))?;
        self.forward(layer, x_u, train)
    }

    /// Replaces the residual cached for `layer` (see [`ConvBackend::set_cached`]).
    pub fn set_cached(&mut self, layer: u32, x_u: Tensor) -> Result<(), BackendError> {
        let slot = self.slot(layer)?;
        if x_u.shape.len() != 4 || x_u.shape[1] != slot.conv.in_ch {
            return Err(BackendError::Invalid(format!(
                "layer {layer}: residual shape {:?} does not fit a conv with {} input channels",
                x_u.shape, slot.conv.in_ch
            )));
        }
        slot.cached = Some(x_u);
        Ok(())
    }

    /// dy: [B, M, OH, OW] → (∇X = conv_transpose(∇Y, W) if `need_dx`, ∇W_U = corr(X_U, ∇Y)).
    pub fn backward(
        &mut self,
        layer: u32,
        dy: &Tensor,
        need_dx: bool,
    ) -> Result<(Option<Tensor>, Tensor), BackendError> {
        let (pool, slot) = self.parts(layer)?;
        let x_u = slot
            .cached
            .as_ref()
            .ok_or(BackendError::NoCachedInput(layer))?;
        slot.conv.weight.zero_grad();
        if let Some(b) = slot.conv.bias.as_mut() {
            b.zero_grad();
        }
        let mut dx = need_dx.then(Tensor::default);
        pool.install(|| slot.conv.backward(x_u, dy, dx.as_mut()))
            .map_err(|source| BackendError::Core { layer, source })?;
        Ok((dx, slot.conv.weight.grad.clone()))
    }

    /// dy: [B, M, OH, OW] → ∇X = conv_transpose(∇Y, W) alone (X_U's values are not read).
    pub fn input_grad(&mut self, layer: u32, dy: &Tensor) -> Result<Tensor, BackendError> {
        let (pool, slot) = self.parts(layer)?;
        let x_u = slot
            .cached
            .as_ref()
            .ok_or(BackendError::NoCachedInput(layer))?;
        let mut dx = Tensor::default();
        pool.install(|| slot.conv.backward_parts(x_u, dy, Some(&mut dx), false))
            .map_err(|source| BackendError::Core { layer, source })?;
        Ok(dx)
    }

    /// Replaces the layer's weight (and bias) with the trusted runtime's.
    pub fn set_weights(
        &mut self,
        layer: u32,
        w: Tensor,
        b: Option<Tensor>,
    ) -> Result<(), BackendError> {
        let slot = self.slot(layer)?;
        if w.shape != slot.conv.weight.value.shape
            || b.as_ref().map(|b| &b.shape) != slot.conv.bias.as_ref().map(|p| &p.value.shape)
        {
            return Err(BackendError::Invalid(format!(
                "layer {layer}: the new weights do not match the layer"
            )));
        }
        slot.conv.weight.value = w;
        if let (Some(p), Some(b)) = (slot.conv.bias.as_mut(), b) {
            p.value = b;
        }
        Ok(())
    }

    /// The layer's current weight and bias.
    pub fn weights(&mut self, layer: u32) -> Result<(Tensor, Option<Tensor>), BackendError> {
        let slot = self.slot(layer)?;
        Ok((
            slot.conv.weight.value.clone(),
            slot.conv.bias.as_ref().map(|b| b.value.clone()),
        ))
    }
}

/// Checks a registration before any backend uses it: at most [`MAX_LAYERS`] layers, one weight set per
/// layer, geometry within the limits ([`ConvLayer::check_geometry`]), and weights (and biases, where the
/// layer has one) of the layer's shape.
pub(crate) fn check_registration(
    layers: &[ConvLayer],
    weights: &[(Tensor, Option<Tensor>)],
) -> Result<(), BackendError> {
    if layers.len() != weights.len() {
        return Err(BackendError::Invalid(format!(
            "{} layers but {} weight sets",
            layers.len(),
            weights.len()
        )));
    }
    check_layers(layers)?;
    for (i, (l, (w, b))) in layers.iter().zip(weights).enumerate() {
        let ws = l.weight_shape();
        let count = ws.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if w.shape != ws || count != Some(w.data.len()) {
            return Err(BackendError::Invalid(format!(
                "layer {i}: weight shape {:?}, expected {ws:?}",
                w.shape
            )));
        }
        match (l.bias, b) {
            (true, Some(b)) if b.shape == [l.out_ch] && b.data.len() == l.out_ch => {}
            (false, None) => {}
            _ => {
                return Err(BackendError::Invalid(format!(
                    "layer {i}: bias does not match the layer"
                )))
            }
        }
    }
    Ok(())
}

/// Checks the layers' count and geometry ([`MAX_LAYERS`], [`ConvLayer::check_geometry`]).
pub(crate) fn check_layers(layers: &[ConvLayer]) -> Result<(), BackendError> {
    if layers.len() > MAX_LAYERS {
        return Err(BackendError::Invalid(format!(
            "{} conv layers: at most {MAX_LAYERS}",
            layers.len()
        )));
    }
    for (i, l) in layers.iter().enumerate() {
        l.check_geometry()
            .map_err(|e| BackendError::Invalid(format!("layer {i}: {e}")))?;
    }
    Ok(())
}

impl ConvBackend for CpuBackend {
    fn describe(&self) -> String {
        format!("cpu ({} thread(s))", self.threads)
    }

    fn register(
        &mut self,
        layers: &[ConvLayer],
        weights: Vec<(Tensor, Option<Tensor>)>,
    ) -> Result<(), BackendError> {
        CpuBackend::register(self, layers, weights)
    }

    fn layer(&self, layer: u32) -> Option<ConvLayer> {
        CpuBackend::layer(self, layer)
    }

    fn num_layers(&self) -> usize {
        CpuBackend::num_layers(self)
    }

    fn forward(&mut self, layer: u32, x_u: Tensor, train: bool) -> Result<Tensor, BackendError> {
        CpuBackend::forward(self, layer, x_u, train)
    }

    fn forward_shared(
        &mut self,
        layer: u32,
        from: u32,
        train: bool,
    ) -> Result<Tensor, BackendError> {
        CpuBackend::forward_shared(self, layer, from, train)
    }

    fn set_cached(&mut self, layer: u32, x_u: Tensor) -> Result<(), BackendError> {
        CpuBackend::set_cached(self, layer, x_u)
    }

    fn take_cached(&mut self, layer: u32) -> Option<Tensor> {
        self.slot(layer).ok().and_then(|s| s.cached.take())
    }

    fn backward(
        &mut self,
        layer: u32,
        dy: &Tensor,
        need_dx: bool,
    ) -> Result<(Option<Tensor>, Tensor), BackendError> {
        CpuBackend::backward(self, layer, dy, need_dx)
    }

    fn splits_backward(&self) -> bool {
        true
    }

    fn input_grad(&mut self, layer: u32, dy: &Tensor) -> Result<Tensor, BackendError> {
        CpuBackend::input_grad(self, layer, dy)
    }

    fn set_weights(
        &mut self,
        layer: u32,
        w: Tensor,
        b: Option<Tensor>,
    ) -> Result<(), BackendError> {
        CpuBackend::set_weights(self, layer, w, b)
    }

    fn weights(&mut self, layer: u32) -> Result<(Tensor, Option<Tensor>), BackendError> {
        CpuBackend::weights(self, layer)
    }
}

#[cfg(any(feature = "cuda", test))]
/// Below this many values per thread a host copy runs on one thread (starting threads would cost more than it
/// saves).
const PAR_COPY_MIN: usize = 1 << 18;

/// Copies `src` into `dst` (the same length) on up to `threads` threads, in contiguous parts. The CUDA
/// backend stages every upload and download through pinned buffers with it: one thread copies a few GB/s,
/// well below what the bus moves, and a fresh output vector's pages are faulted in by all threads at once.
#[cfg(any(feature = "cuda", test))]
pub(crate) fn par_copy(dst: &mut [f32], src: &[f32], threads: usize) -> Result<(), BackendError> {
    if dst.len() != src.len() {
        return Err(BackendError::Invalid(format!(
            "a host copy of {} values into {}",
            src.len(),
            dst.len()
        )));
    }
    asymml_core::chunks::zip_parts(dst, src, threads, PAR_COPY_MIN, |d, s| d.copy_from_slice(s));
    Ok(())
}

#[cfg(test)]
mod par_copy_tests {
    use super::par_copy;

    #[test]
    fn parallel_host_copies_copy_every_value_once() {
        for (n, threads) in [
            (0, 4),
            (5, 4),
            (1 << 18, 3),
            ((1 << 20) + 7, 4),
            ((1 << 19) + 1, 16),
        ] {
            let src: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 3.0).collect();
            let mut dst = vec![f32::NAN; n];
            par_copy(&mut dst, &src, threads).unwrap();
            assert_eq!(dst, src, "n {n}, threads {threads}");
        }
        let mut short = vec![0.0; 3];
        let e = par_copy(&mut short, &[1.0; 4], 2).unwrap_err();
        assert!(e.to_string().contains("4 values into 3"), "{e}");
    }
}
