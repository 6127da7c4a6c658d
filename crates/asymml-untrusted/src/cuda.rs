//! The CUDA backend (feature `cuda`): the conv layers' weights and cached residuals live on one GPU between
//! requests; cuDNN computes the convolutions (forward, backward-data, backward-filter; NCHW float32), and one
//! small kernel compiled once with NVRTC adds the bias. The weights are the trusted runtime's: it sends them at
//! registration and after each of its optimizer steps (`set_weights`), and gets ∇W_U = corr(X_U, ∇Y) back from
//! each backward; no gradient or optimizer state stays on the device.
//!
//! The CUDA libraries are opened at run time (cudarc's `dynamic-loading`): the driver (`libcuda.so.1`),
//! cuDNN 9 (`libcudnn.so.9`) and NVRTC (`libnvrtc.so.13`). Each is looked for before anything is created, so a
//! machine without them gets an error that names the missing library, not a panic.
//!
//! Everything runs on one CUDA stream. Host data goes up and comes down through pinned (page-locked) staging
//! buffers, and each operation is timed in two parts — copies and kernels — kept in [`DeviceStats`].
//!
//! Precision: cuDNN may use TF32 tensor cores for float32 convolutions on Ampere and later GPUs, which is 1e-3
//! accurate, not 1e-6. The convolutions are set to `CUDNN_FMA_MATH` (plain float32), and where cuDNN's
//! heuristics pick an FFT algorithm (less accurate than the others) the GEMM one is used instead, unless the
//! environment variable `ASYMML_CUDA_TF32=1` allows TF32 and any algorithm. The NVRTC kernel (one float add per
//! value) is compiled with `--fmad=false`, so it rounds exactly like the CPU code.

use crate::backend::{par_copy, BackendError, ConvBackend, ConvLayer, DeviceStats};
use asymml_core::layers::out_size;
use asymml_core::Tensor;
use cudarc::cudnn::{
    sys::{
        cudnnConvolutionBwdDataAlgo_t as BwdDataAlgo,
        cudnnConvolutionBwdFilterAlgo_t as BwdFilterAlgo, cudnnConvolutionFwdAlgo_t as FwdAlgo,
        cudnnConvolutionMode_t, cudnnMathType_t, cudnnTensorFormat_t,
    },
    ConvBackwardData, ConvBackwardFilter, ConvDescriptor, ConvForward, Cudnn, CudnnError,
    FilterDescriptor, TensorDescriptor,
};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DeviceRepr, DriverError, LaunchConfig,
    PinnedHostSlice, PushKernelArg,
};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use std::sync::Arc;
use std::time::Instant;

/// The element-wise kernel, compiled once per backend by NVRTC. Indices are 64-bit and the loop is
/// grid-strided, so any tensor size works with any grid.
const KERNELS: &str = r#"
extern "C" __global__ void add_bias(float* y, const float* b, unsigned long long n, unsigned int m,
                                    unsigned long long hw) {
    unsigned long long stride = (unsigned long long)blockDim.x * gridDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        y[i] = y[i] + b[(i / hw) % m];
    }
}
"#;

/// Threads per block of a kernel launch.
const BLOCK: u32 = 256;
/// Most blocks of a grid-strided launch.
const MAX_BLOCKS: usize = 1 << 16;
/// Most cuDNN shape plans kept per layer (one per batch size and input size seen).
const MAX_PLANS: usize = 8;

fn drv(what: &'static str) -> impl Fn(DriverError) -> BackendError {
    move |e| BackendError::Device(format!("CUDA {what}: {e}"))
}

fn dnn(what: &'static str) -> impl Fn(CudnnError) -> BackendError {
    move |e| BackendError::Device(format!("cuDNN {what}: {e}"))
}

/// A grid-strided launch over `n` elements.
fn grid(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(BLOCK as usize).clamp(1, MAX_BLOCKS);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A tensor dimension as cuDNN's `int`.
fn dim(n: usize) -> Result<i32, BackendError> {
    i32::try_from(n)
        .map_err(|_| BackendError::Invalid(format!("dimension {n} is too large for cuDNN")))
}

/// The number of values of a tensor of `shape`, or an error where it overflows. The buffer sizes that cuDNN
/// and the kernels rely on are computed with this, so that a wrapped product cannot undersize a buffer.
fn count(shape: &[usize]) -> Result<usize, BackendError> {
    shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| BackendError::Invalid(format!("a tensor of shape {shape:?} is too large")))
}

/// Makes `buf` hold at least `n` elements and returns it (contents undefined after growing).
fn grow<'a, T: DeviceRepr>(
    stream: &Arc<CudaStream>,
    buf: &'a mut Option<CudaSlice<T>>,
    n: usize,
) -> Result<&'a mut CudaSlice<T>, BackendError> {
    let fit = match buf.take() {
        Some(b) if b.len() >= n => b,
        old => {
            // Free the old buffer first (a stream-ordered free, after every earlier use).
            drop(old);
            // SAFETY: `alloc` is unsafe only because it leaves the memory uninitialised. No caller reads an
            // element it has not written first (by an upload, a device copy, or a cuDNN/kernel output with
            // beta = 0), and device memory only reaches Rust values as f32 (any bit pattern is valid).
            unsafe { stream.alloc::<T>(n.max(1)) }.map_err(drv("allocating device memory"))?
        }
    };
    Ok(buf.insert(fit))
}

/// Makes the pinned host buffer hold at least `n` floats and returns it. `write_combined`: for uploads only
/// (the host writes it once, sequentially; reading it on the host would be very slow).
fn grow_pinned<'a>(
    ctx: &Arc<CudaContext>,
    buf: &'a mut Option<PinnedHostSlice<f32>>,
    n: usize,
    write_combined: bool,
) -> Result<&'a mut PinnedHostSlice<f32>, BackendError> {
    let fit = match buf.take() {
        Some(b) if b.len() >= n => b,
        old => {
            drop(old);
            let flags = if write_combined {
                cudarc::driver::sys::CU_MEMHOSTALLOC_WRITECOMBINED
            } else {
                0
            };
            // Some headroom, so that a slightly larger batch does not reallocate.
            let len = n.max(1).saturating_add(n / 8);
            // SAFETY: `alloc_pinned_with_flags` is unsafe only because it leaves the memory uninitialised; it
            // holds f32 (any bit pattern is valid), `upload` writes the values before copying them up and
            // `download` reads only the values the device copy has written.
            unsafe { ctx.alloc_pinned_with_flags::<f32>(len, flags) }
                .map_err(drv("allocating pinned host memory"))?
        }
    };
    Ok(buf.insert(fit))
}

/// Errors unless device buffer `buf` holds at least `n` values: checked before cuDNN or a kernel is given
/// the buffer as `n` values (they see a raw pointer and check no length).
fn holds<T>(buf: &CudaSlice<T>, n: usize, what: &str) -> Result<(), BackendError> {
    if buf.len() < n {
        return Err(BackendError::Invalid(format!(
            "the {what} buffer holds {} values, the operation needs {n}",
            buf.len()
        )));
    }
    Ok(())
}

/// Waits for everything queued on `stream`.
fn sync(stream: &CudaStream) -> Result<(), BackendError> {
    stream
        .synchronize()
        .map_err(drv("running the stream (an earlier kernel failed)"))
}

/// In float32 mode, the algorithm to run instead of cuDNN's choice: a GEMM algorithm in place of an FFT or a
/// Winograd one. Both transform the data, so their rounding errors are larger than a plain sum's. (VGG16's
/// first bias gradient, which `verify` once failed on an H200 at 3e-4, was not this: it stayed at 3e-4 with
/// GEMM algorithms, and float32 itself leaves that much doubt there.)
fn precise_fwd(a: FwdAlgo) -> FwdAlgo {
    match a {
        FwdAlgo::CUDNN_CONVOLUTION_FWD_ALGO_FFT
        | FwdAlgo::CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING
        | FwdAlgo::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD
        | FwdAlgo::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED => {
            FwdAlgo::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM
        }
        a => a,
    }
}

fn precise_bwd_data(a: BwdDataAlgo) -> BwdDataAlgo {
    match a {
        BwdDataAlgo::CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT
        | BwdDataAlgo::CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT_TILING
        | BwdDataAlgo::CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD
        | BwdDataAlgo::CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD_NONFUSED => {
            BwdDataAlgo::CUDNN_CONVOLUTION_BWD_DATA_ALGO_1
        }
        a => a,
    }
}

fn precise_bwd_filter(a: BwdFilterAlgo) -> BwdFilterAlgo {
    match a {
        BwdFilterAlgo::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT
        | BwdFilterAlgo::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT_TILING
        | BwdFilterAlgo::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD
        | BwdFilterAlgo::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD_NONFUSED => {
            BwdFilterAlgo::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1
        }
        a => a,
    }
}

/// One algorithm choice of a plan (forward, backward-data or backward-filter, named `what` in errors): cuDNN's
/// heuristic pick, replaced by `precise(pick)` unless TF32 is allowed, and its workspace size in bytes.
fn choose_algorithm<A: Copy>(
    what: &str,
    tf32: bool,
    pick: impl FnOnce() -> Result<A, CudnnError>,
    precise: fn(A) -> A,
    workspace_size: impl FnOnce(A) -> Result<usize, CudnnError>,
) -> Result<(A, usize), BackendError> {
    let a = pick()
        .map_err(|e| BackendError::Device(format!("cuDNN choosing the {what} algorithm: {e}")))?;
    let a = if tf32 { a } else { precise(a) };
    let bytes = workspace_size(a)
        .map_err(|e| BackendError::Device(format!("cuDNN {what} workspace size: {e}")))?;
    Ok((a, bytes))
}

/// One input shape of one layer: the cuDNN descriptors and the algorithms chosen for it (once, by cuDNN's
/// heuristics) with their workspace sizes.
struct Plan {
    b: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    /// Values of the input (b × in_ch × h × w) and of the output (b × out_ch × oh × ow), as in `x` and `y`.
    nx: usize,
    ny: usize,
    x: TensorDescriptor<f32>,
    y: TensorDescriptor<f32>,
    fwd: (FwdAlgo, usize),
    bwd_data: (BwdDataAlgo, usize),
    bwd_filter: (BwdFilterAlgo, usize),
}

/// One conv layer on the device.
struct Layer {
    spec: ConvLayer,
    w: CudaSlice<f32>,
    b: Option<CudaSlice<f32>>,
    filter: FilterDescriptor<f32>,
    conv: ConvDescriptor<f32>,
    plans: Vec<Plan>,
    /// The cached residual X_U (the buffer may be longer than the tensor) and its shape.
    x: Option<CudaSlice<f32>>,
    x_shape: Option<[usize; 4]>,
}

impl Layer {
    fn weight_shape(&self) -> [usize; 4] {
        let s = self.spec;
        [s.out_ch, s.in_ch, s.k, s.k]
    }
}

/// Buffers shared by the layers (each operation uses them only while it runs).
#[derive(Default)]
struct Scratch {
    y: Option<CudaSlice<f32>>,
    dy: Option<CudaSlice<f32>>,
    dx: Option<CudaSlice<f32>>,
    /// ∇W_U of the last backward, downloaded at once (so no layer keeps a gradient on the device).
    dw: Option<CudaSlice<f32>>,
    workspace: Option<CudaSlice<u8>>,
    up: Option<PinnedHostSlice<f32>>,
    down: Option<PinnedHostSlice<f32>>,
}

struct Kernels {
    add_bias: CudaFunction,
}

/// The conv layers on one CUDA GPU. Not `Send`: create it on the thread that uses it.
pub struct CudaBackend {
    ordinal: usize,
    /// Threads of each staging copy between the host's tensors and the pinned buffers.
    copy_threads: usize,
    description: String,
    tf32: bool,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    cudnn: Arc<Cudnn>,
    kernels: Kernels,
    layers: Vec<Layer>,
    registered: bool,
    scratch: Scratch,
    stats: DeviceStats,
}

/// Checks that the CUDA driver, cuDNN and NVRTC libraries can be opened, and that device `ordinal` exists —
/// before anything that would panic without them.
fn check_available(ordinal: usize) -> Result<(), BackendError> {
    let hint = "on a machine with PyTorch's pip CUDA 13 packages, add their library folders to LD_LIBRARY_PATH \
                (site-packages/nvidia/*/lib)";
    // SAFETY: opening a shared library runs its initialisers, which is what the unsafe `is_culib_present` asks
    // the caller to vouch for. These are the NVIDIA libraries cudarc opens anyway to use CUDA at all; each of
    // the three probes only opens and closes one, on this thread, before any CUDA state exists.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(BackendError::Device(format!(
            "accelerator device cuda:{ordinal}: the CUDA driver library (libcuda.so) was not found — this machine \
             has no NVIDIA driver, or it is not on the library path"
        )));
    }
    // SAFETY: as for the driver library above.
    if !unsafe { cudarc::cudnn::sys::is_culib_present() } {
        return Err(BackendError::Device(format!(
            "accelerator device cuda:{ordinal}: cuDNN (libcudnn.so.9) was not found; {hint}"
        )));
    }
    // SAFETY: as for the driver library above.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(BackendError::Device(format!(
            "accelerator device cuda:{ordinal}: the CUDA runtime compiler NVRTC (libnvrtc.so) was not found; {hint}"
        )));
    }
    let count = CudaContext::device_count().map_err(|e| {
        BackendError::Device(format!(
            "accelerator device cuda:{ordinal}: the CUDA driver found no usable GPU ({e})"
        ))
    })?;
    if ordinal >= count.max(0) as usize {
        return Err(BackendError::Device(format!(
            "accelerator device cuda:{ordinal}: this machine has {count} CUDA device(s)"
        )));
    }
    let v = cudarc::cudnn::result::get_version();
    if v < 90000 {
        return Err(BackendError::Device(format!(
            "accelerator device cuda:{ordinal}: cuDNN {v} was found; the CUDA backend needs cuDNN 9"
        )));
    }
    Ok(())
}

impl CudaBackend {
    /// Opens CUDA device `ordinal`: checks the libraries and the device, creates a context, a stream and a
    /// cuDNN handle, and compiles the kernels. Any failure (a panic inside the CUDA bindings included) is an
    /// error naming CUDA. `threads` (0: all cores; at most 8 are used) stage the host copies.
    pub fn new(ordinal: usize, threads: usize) -> Result<Self, BackendError> {
        check_available(ordinal)?;
        let copy_threads = crate::pool_threads(threads).min(asymml_core::chunks::MAX_COPY_THREADS);
        match std::panic::catch_unwind(|| Self::open(ordinal, copy_threads)) {
            Ok(r) => r,
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown error".into());
                Err(BackendError::Device(format!(
                    "accelerator device cuda:{ordinal}: the CUDA libraries failed: {msg}"
                )))
            }
        }
    }

    fn open(ordinal: usize, copy_threads: usize) -> Result<Self, BackendError> {
        let ctx = CudaContext::new(ordinal).map_err(drv("creating a context"))?;
        // One stream, so cudarc's per-buffer event tracking (for several streams) is not needed: slices
        // created from here on carry no events.
        // SAFETY: without events, keeping each buffer's uses ordered across streams is up to us. There is one
        // stream: every copy, kernel and (through the handle made on it) cuDNN call of this backend, and every
        // stream-ordered free, is queued on `stream`, so each use, write and free follows the ones before it.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(drv("creating a stream"))?;
        let cudnn = Cudnn::new(stream.clone()).map_err(dnn("creating a handle"))?;
        let opts = CompileOptions {
            fmad: Some(false),
            prec_div: Some(true),
            prec_sqrt: Some(true),
            ftz: Some(false),
            name: Some("asymml_kernels.cu".into()),
            ..Default::default()
        };
        let ptx = compile_ptx_with_opts(KERNELS, opts).map_err(|e| {
            BackendError::Device(format!("NVRTC could not compile the kernels: {e}"))
        })?;
        let module = ctx.load_module(ptx).map_err(|e| {
            BackendError::Device(format!(
                "CUDA could not load the NVRTC kernels ({e}); is the NVIDIA driver older than the NVRTC library?"
            ))
        })?;
        let load = |name: &'static str| {
            module
                .load_function(name)
                .map_err(|e| BackendError::Device(format!("CUDA kernel {name}: {e}")))
        };
        let kernels = Kernels {
            add_bias: load("add_bias")?,
        };
        let tf32 = std::env::var("ASYMML_CUDA_TF32").is_ok_and(|v| v == "1");
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let cc = ctx
            .compute_capability()
            .map(|(a, b)| format!(", compute capability {a}.{b}"))
            .unwrap_or_default();
        let description = format!(
            "cuda:{ordinal} ({name}{cc}, cuDNN {}, {} convolutions)",
            cudarc::cudnn::result::get_version(),
            if tf32 { "TF32" } else { "float32" }
        );
        Ok(CudaBackend {
            ordinal,
            copy_threads,
            description,
            tf32,
            ctx,
            stream,
            cudnn,
            kernels,
            layers: Vec::new(),
            registered: false,
            scratch: Scratch::default(),
            stats: DeviceStats::default(),
        })
    }

    /// The device number.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// Copy and kernel time and bytes moved since the backend was created.
    pub fn stats(&self) -> DeviceStats {
        self.stats
    }

    /// Makes this backend's context current on the calling thread.
    fn bind(&self) -> Result<(), BackendError> {
        self.ctx
            .bind_to_thread()
            .map_err(drv("binding the context"))
    }

    fn sync(&self) -> Result<(), BackendError> {
        sync(&self.stream)
    }

    fn index(&self, layer: u32) -> Result<usize, BackendError> {
        if !self.registered {
            return Err(BackendError::NotRegistered);
        }
        let i = layer as usize;
        if i < self.layers.len() {
            Ok(i)
        } else {
            Err(BackendError::UnknownLayer(layer))
        }
    }

    /// Copies `src` to the start of `dst` through the pinned upload buffer. The copy is asynchronous: the
    /// caller synchronizes the stream before the next upload rewrites the pinned buffer.
    #[allow(clippy::too_many_arguments)]
    fn upload(
        ctx: &Arc<CudaContext>,
        stream: &Arc<CudaStream>,
        up: &mut Option<PinnedHostSlice<f32>>,
        stats: &mut DeviceStats,
        threads: usize,
        src: &[f32],
        dst: &mut CudaSlice<f32>,
    ) -> Result<(), BackendError> {
        let n = src.len();
        if dst.len() < n {
            return Err(BackendError::Invalid(format!(
                "upload of {n} values into a buffer of {}",
                dst.len()
            )));
        }
        let host = grow_pinned(ctx, up, n, true)?
            .as_mut_slice()
            .map_err(drv("pinned upload buffer"))?;
        par_copy(&mut host[..n], src, threads)?;
        stream
            .memcpy_htod(&host[..n], dst)
            .map_err(drv("copying to the device"))?;
        stats.bytes_up += (n * 4) as u64;
        Ok(())
    }

    /// Copies the first `n` values of `src` to a new host vector through the pinned download buffer.
    fn download(&mut self, src: Which, layer: usize, n: usize) -> Result<Vec<f32>, BackendError> {
        let t = Instant::now();
        let host = grow_pinned(&self.ctx, &mut self.scratch.down, n, false)?
            .as_mut_slice()
            .map_err(drv("pinned download buffer"))?;
        let buf: &CudaSlice<f32> = match src {
            Which::Y => self.scratch.y.as_ref(),
            Which::Dx => self.scratch.dx.as_ref(),
            Which::W => Some(&self.layers[layer].w),
            Which::B => self.layers[layer].b.as_ref(),
            Which::Dw => self.scratch.dw.as_ref(),
        }
        .ok_or_else(|| BackendError::Invalid("download of a missing buffer".into()))?;
        let src_n = buf.try_slice(..n).ok_or_else(|| {
            BackendError::Invalid(format!(
                "download of {n} values from a buffer of {}",
                buf.len()
            ))
        })?;
        self.stream
            .memcpy_dtoh(&src_n, &mut host[..n])
            .map_err(drv("copying from the device"))?;
        self.stream
            .synchronize()
            .map_err(drv("copying from the device"))?;
        let mut out = vec![0.0f32; n];
        par_copy(&mut out, &host[..n], self.copy_threads)?;
        self.stats.bytes_down += (n * 4) as u64;
        self.stats.copy_s += t.elapsed().as_secs_f64();
        Ok(out)
    }

    /// The plan of layer `li` for inputs of `b × C × h × w`, made (and its algorithms chosen) on first use.
    fn plan(&mut self, li: usize, b: usize, h: usize, w: usize) -> Result<usize, BackendError> {
        let cudnn = self.cudnn.clone();
        let tf32 = self.tf32;
        let l = &mut self.layers[li];
        if let Some(i) = l.plans.iter().position(|p| (p.b, p.h, p.w) == (b, h, w)) {
            return Ok(i);
        }
        let s = l.spec;
        let (Some(oh), Some(ow)) = (
            out_size(h, s.k, s.stride, s.pad),
            out_size(w, s.k, s.stride, s.pad),
        ) else {
            return Err(BackendError::Invalid(format!(
                "conv: input {h}×{w} is smaller than the {k}×{k} kernel (padding {p})",
                k = s.k,
                p = s.pad
            )));
        };
        let nchw = cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
        let nx = count(&[b, s.in_ch, h, w])?;
        let ny = count(&[b, s.out_ch, oh, ow])?;
        let x = cudnn
            .create_4d_tensor::<f32>(nchw, [dim(b)?, dim(s.in_ch)?, dim(h)?, dim(w)?])
            .map_err(dnn("input descriptor"))?;
        let y = cudnn
            .create_4d_tensor::<f32>(nchw, [dim(b)?, dim(s.out_ch)?, dim(oh)?, dim(ow)?])
            .map_err(dnn("output descriptor"))?;
        let (conv, filter) = (&l.conv, &l.filter);
        let op = ConvForward {
            conv,
            x: &x,
            w: filter,
            y: &y,
        };
        let fwd = choose_algorithm(
            "forward",
            tf32,
            || op.pick_algorithm(),
            precise_fwd,
            |a| op.get_workspace_size(a),
        )?;
        let op = ConvBackwardData {
            conv,
            dx: &x,
            w: filter,
            dy: &y,
        };
        let bwd_data = choose_algorithm(
            "backward-data",
            tf32,
            || op.pick_algorithm(),
            precise_bwd_data,
            |a| op.get_workspace_size(a),
        )?;
        let op = ConvBackwardFilter {
            conv,
            x: &x,
            dw: filter,
            dy: &y,
        };
        let bwd_filter = choose_algorithm(
            "backward-filter",
            tf32,
            || op.pick_algorithm(),
            precise_bwd_filter,
            |a| op.get_workspace_size(a),
        )?;
        if std::env::var_os("ASYMML_CUDA_LOG").is_some() {
            eprintln!(
                "cuda: layer {li} input {b}×{}×{h}×{w}: forward {:?} ({} B), backward-data {:?} ({} B), \
                 backward-filter {:?} ({} B)",
                s.in_ch, fwd.0, fwd.1, bwd_data.0, bwd_data.1, bwd_filter.0, bwd_filter.1
            );
        }
        if l.plans.len() >= MAX_PLANS {
            l.plans.remove(0);
        }
        l.plans.push(Plan {
            b,
            h,
            w,
            oh,
            ow,
            nx,
            ny,
            x,
            y,
            fwd,
            bwd_data,
            bwd_filter,
        });
        Ok(l.plans.len() - 1)
    }

    /// Y = conv(cached X_U of layer `li`, W) + b, downloaded.
    fn conv_forward(&mut self, li: usize) -> Result<Tensor, BackendError> {
        let [b, _, h, w] = self.layers[li]
            .x_shape
            .ok_or(BackendError::NoCachedInput(li as u32))?;
        let pi = self.plan(li, b, h, w)?;
        let m = self.layers[li].spec.out_ch;
        let (oh, ow, ny, ws) = {
            let p = &self.layers[li].plans[pi];
            (p.oh, p.ow, p.ny, p.fwd.1)
        };
        let t = {
            let Self {
                layers,
                scratch,
                kernels,
                stream,
                ..
            } = self;
            let y = grow(stream, &mut scratch.y, ny)?;
            let workspace = match ws {
                0 => None,
                _ => Some(grow(stream, &mut scratch.workspace, ws)?),
            };
            let l = &layers[li];
            let p = &l.plans[pi];
            let x = l.x.as_ref().ok_or(BackendError::NoCachedInput(li as u32))?;
            holds(x, p.nx, "cached input")?;
            let op = ConvForward {
                conv: &l.conv,
                x: &p.x,
                w: &l.filter,
                y: &p.y,
            };
            let t = Instant::now();
            // SAFETY: cuDNN accesses the buffers through raw pointers as the f32 tensors its descriptors
            // describe, and each is at least that large: `x` ≥ p.nx values (checked above), the size of `p.x`;
            // `l.w` is the weight, exactly the size of `l.filter` (both made from one checked weight in
            // `register`; `set_weights` only rewrites its values); `y` ≥ p.ny values (grown above), the size of `p.y`; the workspace, passed when the
            // algorithm needs one, ≥ the `ws` bytes cuDNN asked for it (cudarc passes its real size). The
            // handle runs on `stream`, after the copies that filled `x`, before the download of `y`.
            unsafe { op.launch(p.fwd.0, workspace, (1.0f32, 0.0f32), x, &l.w, y) }
                .map_err(dnn("convolution forward"))?;
            if let Some(bias) = &l.b {
                let (n, mm, hw) = (ny as u64, m as u32, (oh * ow) as u64);
                let mut lb = stream.launch_builder(&kernels.add_bias);
                lb.arg(y).arg(bias).arg(&n).arg(&mm).arg(&hw);
                // SAFETY: the arguments match `add_bias(float* y, const float* b, u64 n, u32 m, u64 hw)` in
                // order and type, and only `y`, passed mutably, is written. It touches y[i] for i < n = p.ny ≤
                // y.len() and b[(i / hw) % m] with m = out_ch = the bias length (allocated so in `register`,
                // which `set_weights` only rewrites); out_ch < 2³¹
                // (`dim`), so the u32 is exact, and hw = oh·ow ≥ 1. Queued on `stream` after the convolution.
                unsafe { lb.launch(grid(ny)) }.map_err(drv("bias kernel"))?;
            }
            t
        };
        self.sync()?;
        self.stats.kernel_s += t.elapsed().as_secs_f64();
        let data = self.download(Which::Y, li, ny)?;
        Ok(Tensor {
            shape: vec![b, m, oh, ow],
            data,
        })
    }

    /// Two distinct layers, the first shared and the second mutable.
    fn two(layers: &mut [Layer], from: usize, to: usize) -> (&Layer, &mut Layer) {
        if from < to {
            let (a, b) = layers.split_at_mut(to);
            (&a[from], &mut b[0])
        } else {
            let (a, b) = layers.split_at_mut(from);
            (&b[0], &mut a[to])
        }
    }
}

/// A device buffer to download.
#[derive(Clone, Copy)]
enum Which {
    Y,
    Dx,
    W,
    B,
    Dw,
}

impl ConvBackend for CudaBackend {
    fn describe(&self) -> String {
        self.description.clone()
    }

    fn register(
        &mut self,
        layers: &[ConvLayer],
        weights: Vec<(Tensor, Option<Tensor>)>,
    ) -> Result<(), BackendError> {
        self.bind()?;
        // Check everything before touching the device.
        crate::backend::check_registration(layers, &weights)?;
        // cuDNN and the kernels take the weight as out_ch × in_ch × k × k values: make sure that product does
        // not wrap to the length of a smaller weight.
        for (i, (l, (w, _))) in layers.iter().zip(&weights).enumerate() {
            if count(&[l.out_ch, l.in_ch, l.k, l.k]).ok() != Some(w.data.len()) {
                return Err(BackendError::Invalid(format!(
                    "layer {i}: a weight of {} values for a {:?} kernel",
                    w.data.len(),
                    [l.out_ch, l.in_ch, l.k, l.k]
                )));
            }
        }
        self.registered = false;
        self.layers.clear();
        let t = Instant::now();
        let nchw = cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
        let math = if self.tf32 {
            cudnnMathType_t::CUDNN_DEFAULT_MATH
        } else {
            cudnnMathType_t::CUDNN_FMA_MATH
        };
        let stream = self.stream.clone();
        let mut new_layers = Vec::with_capacity(layers.len());
        for (l, (w, b)) in layers.iter().zip(weights) {
            let wd = stream
                .clone_htod(&w.data)
                .map_err(drv("copying weights to the device"))?;
            self.stats.bytes_up += (w.data.len() * 4) as u64;
            let bd = match &b {
                Some(b) => {
                    self.stats.bytes_up += (b.data.len() * 4) as u64;
                    Some(
                        stream
                            .clone_htod(&b.data)
                            .map_err(drv("copying biases to the device"))?,
                    )
                }
                None => None,
            };
            let filter = self
                .cudnn
                .create_4d_filter::<f32>(
                    nchw,
                    [dim(l.out_ch)?, dim(l.in_ch)?, dim(l.k)?, dim(l.k)?],
                )
                .map_err(dnn("filter descriptor"))?;
            let mut conv = self
                .cudnn
                .create_conv2d::<f32>(
                    [dim(l.pad)?, dim(l.pad)?],
                    [dim(l.stride)?, dim(l.stride)?],
                    [1, 1],
                    cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                )
                .map_err(dnn("convolution descriptor"))?;
            conv.set_math_type(math).map_err(dnn("math type"))?;
            new_layers.push(Layer {
                spec: *l,
                w: wd,
                b: bd,
                filter,
                conv,
                plans: Vec::new(),
                x: None,
                x_shape: None,
            });
        }
        self.sync()?;
        self.stats.copy_s += t.elapsed().as_secs_f64();
        self.layers = new_layers;
        self.registered = true;
        Ok(())
    }

    fn layer(&self, layer: u32) -> Option<ConvLayer> {
        self.layers.get(layer as usize).map(|l| l.spec)
    }

    fn num_layers(&self) -> usize {
        self.layers.len()
    }

    fn forward(&mut self, layer: u32, x_u: Tensor, _train: bool) -> Result<Tensor, BackendError> {
        // Checked, planned and uploaded as the layer's cached residual, then convolved from there.
        self.set_cached(layer, x_u)?;
        let li = self.index(layer)?;
        self.conv_forward(li)
    }

    fn set_cached(&mut self, layer: u32, x_u: Tensor) -> Result<(), BackendError> {
        self.bind()?;
        let li = self.index(layer)?;
        let s = self.layers[li].spec;
        let &[b, c, h, w] = x_u.shape.as_slice() else {
            return Err(BackendError::Invalid(format!(
                "conv: expected NCHW input, got {:?}",
                x_u.shape
            )));
        };
        if c != s.in_ch
            || b == 0
            || h == 0
            || w == 0
            || count(&x_u.shape).ok() != Some(x_u.data.len())
        {
            return Err(BackendError::Invalid(format!(
                "X_U shape {:?} ({} values) does not fit a conv with {} input channels",
                x_u.shape,
                x_u.data.len(),
                s.in_ch
            )));
        }
        // Plan first: a shape the conv cannot take is refused before anything is copied.
        self.plan(li, b, h, w)?;
        let t = Instant::now();
        {
            let threads = self.copy_threads;
            let Self {
                layers,
                scratch,
                stream,
                ctx,
                stats,
                ..
            } = self;
            let l = &mut layers[li];
            l.x_shape = None;
            let x = grow(stream, &mut l.x, x_u.data.len())?;
            Self::upload(ctx, stream, &mut scratch.up, stats, threads, &x_u.data, x)?;
        }
        self.sync()?;
        self.stats.copy_s += t.elapsed().as_secs_f64();
        self.layers[li].x_shape = Some([b, c, h, w]);
        Ok(())
    }

    fn forward_shared(
        &mut self,
        layer: u32,
        from: u32,
        _train: bool,
    ) -> Result<Tensor, BackendError> {
        self.bind()?;
        let li = self.index(layer)?;
        let fi = self.index(from)?;
        let shape = self.layers[fi]
            .x_shape
            .ok_or(BackendError::NoCachedInput(from))?;
        let s = self.layers[li].spec;
        if shape[1] != s.in_ch {
            return Err(BackendError::Invalid(format!(
                "layer {layer} takes {} channels but the residual cached for layer {from} has {}",
                s.in_ch, shape[1]
            )));
        }
        if li != fi {
            let [b, _, h, w] = shape;
            self.plan(li, b, h, w)?;
            let n = count(&shape)?;
            let t = Instant::now();
            let Self { layers, stream, .. } = self;
            let (src, dst) = Self::two(layers, fi, li);
            dst.x_shape = None;
            let dst_buf = grow(stream, &mut dst.x, n)?;
            let src_buf = src
                .x
                .as_ref()
                .and_then(|x| x.try_slice(..n))
                .ok_or(BackendError::NoCachedInput(from))?;
            stream
                .memcpy_dtod(&src_buf, dst_buf)
                .map_err(drv("copying the shared residual"))?;
            dst.x_shape = Some(shape);
            self.sync()?;
            self.stats.kernel_s += t.elapsed().as_secs_f64();
        }
        self.conv_forward(li)
    }

    fn backward(
        &mut self,
        layer: u32,
        dy: &Tensor,
        need_dx: bool,
    ) -> Result<(Option<Tensor>, Tensor), BackendError> {
        self.bind()?;
        let li = self.index(layer)?;
        let [b, _, h, w] = self.layers[li]
            .x_shape
            .ok_or(BackendError::NoCachedInput(layer))?;
        let pi = self.plan(li, b, h, w)?;
        let s = self.layers[li].spec;
        let w_shape = self.layers[li].weight_shape();
        let nw = count(&w_shape)?;
        let (oh, ow, nx, ny, (_, ws_data), (_, ws_filter)) = {
            let p = &self.layers[li].plans[pi];
            (p.oh, p.ow, p.nx, p.ny, p.bwd_data, p.bwd_filter)
        };
        let expected = [b, s.out_ch, oh, ow];
        if dy.shape != expected || dy.data.len() != ny {
            return Err(BackendError::Invalid(format!(
                "layer {layer}: ∇Y shape {:?}, expected {expected:?}",
                dy.shape
            )));
        }
        let ws = if need_dx {
            ws_data.max(ws_filter)
        } else {
            ws_filter
        };
        let threads = self.copy_threads;
        let Self {
            layers,
            scratch,
            stream,
            ctx,
            stats,
            ..
        } = self;
        let dy_buf = grow(stream, &mut scratch.dy, ny)?;
        let dx_buf = match need_dx {
            true => Some(grow(stream, &mut scratch.dx, nx)?),
            false => None,
        };
        let dw = grow(stream, &mut scratch.dw, nw)?;
        let mut workspace = match ws {
            0 => None,
            _ => Some(grow(stream, &mut scratch.workspace, ws)?),
        };
        let t = Instant::now();
        Self::upload(
            ctx,
            stream,
            &mut scratch.up,
            stats,
            threads,
            &dy.data,
            dy_buf,
        )?;
        sync(stream)?;
        let t1 = Instant::now();
        stats.copy_s += (t1 - t).as_secs_f64();
        let Layer {
            w: weight,
            filter,
            conv,
            plans,
            x,
            ..
        } = &mut layers[li];
        let p = &plans[pi];
        let x = x.as_ref().ok_or(BackendError::NoCachedInput(layer))?;
        holds(x, nx, "cached input")?;
        let dy_buf = &*dy_buf;
        if let Some(dx) = dx_buf {
            let op = ConvBackwardData {
                conv: &*conv,
                dx: &p.x,
                w: &*filter,
                dy: &p.y,
            };
            let workspace = match ws_data {
                0 => None,
                _ => workspace.as_deref_mut(),
            };
            // SAFETY: cuDNN accesses the buffers through raw pointers as the f32 tensors its descriptors
            // describe, and each is at least that large: `dx` ≥ nx values (grown above), the size of `p.x`;
            // `weight` is exactly the size of `filter` (allocated so in `register`, which `set_weights` only
            // rewrites); `dy_buf` ≥ ny values (grown above, ny uploaded), the size of `p.y`; the workspace ≥
            // ws ≥ ws_data bytes, what cuDNN asked for this algorithm. The handle runs on `stream`, after the
            // upload, before the download of `dx`.
            unsafe {
                op.launch(
                    p.bwd_data.0,
                    workspace,
                    (1.0f32, 0.0f32),
                    dx,
                    &*weight,
                    dy_buf,
                )
            }
            .map_err(dnn("convolution backward data"))?;
        }
        let op = ConvBackwardFilter {
            conv: &*conv,
            x: &p.x,
            dw: &*filter,
            dy: &p.y,
        };
        let workspace = match ws_filter {
            0 => None,
            _ => workspace,
        };
        // SAFETY: as for backward data: `x` ≥ nx values (checked above), the size of `p.x`; `dw` ≥ nw values
        // (grown above), nw being the weight's count, the size of `filter`; `dy_buf` ≥ ny values, the size of
        // `p.y`; the workspace ≥ ws ≥ ws_filter bytes. Queued on `stream` after the upload (and the
        // backward-data call sharing the workspace), so the two never run at once, and before the download of
        // `dw`.
        unsafe { op.launch(p.bwd_filter.0, workspace, (1.0f32, 0.0f32), x, dw, dy_buf) }
            .map_err(dnn("convolution backward filter"))?;
        sync(stream)?;
        stats.kernel_s += t1.elapsed().as_secs_f64();
        let dx = match need_dx {
            true => Some(Tensor {
                shape: vec![b, s.in_ch, h, w],
                data: self.download(Which::Dx, li, nx)?,
            }),
            false => None,
        };
        let dw = Tensor {
            shape: w_shape.to_vec(),
            data: self.download(Which::Dw, li, nw)?,
        };
        Ok((dx, dw))
    }

    fn set_weights(
        &mut self,
        layer: u32,
        w: Tensor,
        b: Option<Tensor>,
    ) -> Result<(), BackendError> {
        self.bind()?;
        let li = self.index(layer)?;
        let s = self.layers[li].spec;
        let ws = self.layers[li].weight_shape();
        // Checked again here (the caller checks the shapes): the device buffers are overwritten in place, so
        // a tensor whose values do not fill its shape is refused too — and nothing is copied unless both fit.
        if w.shape != ws || count(&ws).ok() != Some(w.data.len()) {
            return Err(BackendError::Invalid(format!(
                "layer {layer}: weight shape {:?} ({} values), expected {ws:?}",
                w.shape,
                w.data.len()
            )));
        }
        match (s.bias, &b) {
            (true, Some(b)) if b.shape == [s.out_ch] && b.data.len() == s.out_ch => {}
            (false, None) => {}
            _ => {
                return Err(BackendError::Invalid(format!(
                    "layer {layer}: the bias does not match the layer"
                )))
            }
        }
        let t = Instant::now();
        let threads = self.copy_threads;
        let Self {
            layers,
            scratch,
            stream,
            ctx,
            stats,
            ..
        } = self;
        let l = &mut layers[li];
        // Into the buffers made by `register` (their sizes are the layer's, which cuDNN and the bias kernel
        // rely on); `upload` refuses a source longer than its destination.
        Self::upload(
            ctx,
            stream,
            &mut scratch.up,
            stats,
            threads,
            &w.data,
            &mut l.w,
        )?;
        if let (Some(dst), Some(b)) = (l.b.as_mut(), &b) {
            // The next upload rewrites the pinned staging buffer: wait for the weight's copy first.
            sync(stream)?;
            Self::upload(ctx, stream, &mut scratch.up, stats, threads, &b.data, dst)?;
        }
        sync(stream)?;
        stats.copy_s += t.elapsed().as_secs_f64();
        Ok(())
    }

    fn weights(&mut self, layer: u32) -> Result<(Tensor, Option<Tensor>), BackendError> {
        self.bind()?;
        let li = self.index(layer)?;
        let ws = self.layers[li].weight_shape();
        let m = self.layers[li].spec.out_ch;
        let w = self.download(Which::W, li, ws.iter().product())?;
        let b = match self.layers[li].b.is_some() {
            true => Some(Tensor {
                shape: vec![m],
                data: self.download(Which::B, li, m)?,
            }),
            false => None,
        };
        Ok((
            Tensor {
                shape: ws.to_vec(),
                data: w,
            },
            b,
        ))
    }

    fn stats(&self) -> Option<DeviceStats> {
        Some(self.stats)
    }
}

/// These run on a machine with a GPU and the CUDA libraries; elsewhere they print why they are skipped (or fail,
/// with `ASYMML_REQUIRE_GPU=1`, so that a GPU run cannot pass without testing anything).
#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::CpuBackend;
    use crate::conformance::{check_against, check_refusals};

    fn open() -> Option<CudaBackend> {
        match CudaBackend::new(0, 0) {
            Ok(b) => {
                eprintln!("testing {}", b.describe());
                Some(b)
            }
            Err(e) => {
                assert!(
                    std::env::var_os("ASYMML_REQUIRE_GPU").is_none(),
                    "ASYMML_REQUIRE_GPU is set but: {e}"
                );
                eprintln!("skipped (no usable GPU): {e}");
                None
            }
        }
    }

    #[test]
    fn matches_the_cpu_backend() {
        let Some(mut gpu) = open() else { return };
        let mut cpu = CpuBackend::new(0).unwrap();
        let worst = check_against(&mut cpu, &mut gpu, 1e-4).unwrap();
        eprintln!("largest relative difference from the CPU backend {worst:.3e}");
        let s = gpu.stats();
        assert!(
            s.bytes_up > 0 && s.bytes_down > 0 && s.kernel_s > 0.0,
            "{s:?}"
        );
        eprintln!("{s:?}");
    }

    #[test]
    fn refuses_bad_requests() {
        let Some(mut gpu) = open() else { return };
        check_refusals(&mut gpu).unwrap();
    }

    #[test]
    fn device_numbers_beyond_the_machine_are_errors() {
        let Err(e) = CudaBackend::new(4096, 1) else {
            panic!("cuda:4096 opened")
        };
        assert!(e.to_string().contains("cuda:4096"), "{e}");
    }
}
