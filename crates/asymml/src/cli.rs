//! Command-line definitions (clap).

use crate::data::DatasetKind;
pub use crate::privacy::args::PrivacyArgs;
use crate::values::parse_size;
use crate::values::{
    parse_basis, parse_batch_size, parse_channels, parse_classes, parse_epochs, parse_image_count,
    parse_input_size, parse_listen, parse_lr, parse_momentum, parse_noise, parse_repeat,
    parse_steps, parse_svd_iters, parse_svd_method, parse_threads, parse_timeout, parse_warmup,
    parse_weight_decay, AcceleratorSpec, AugmentChoice, ModelName, OnOff, OptimizerChoice, Phase,
    RankArg, RouteChoice, Schedule, DEFAULT_RANK,
};
use asymml_protocol::Address;

use asymml_trusted::split::Basis;
use asymml_trusted::Mode;
use asymml_untrusted::Device;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "asymml",
    version,
    about = "Train and run convolutional networks on private data: a trusted runtime that alone sees the data, \
             and an untrusted accelerator (AsymML).",
    long_about = None,
    after_help = "Start with `asymml train`: it trains vgg-small on the embedded Fashion-MNIST sample and prints \
                  its test accuracy."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Train a model; writes metrics.jsonl, checkpoint.safetensors, model.safetensors and curves.png to --out.
    Train(TrainArgs),
    /// Evaluate weights on the test split of a dataset.
    Eval(EvalArgs),
    /// Classify images (a file or a folder) with trained weights.
    Infer(InferArgs),
    /// Time forward passes and training steps of VGG/ResNet models (and compare with PyTorch's numbers).
    Bench(BenchArgs),
    /// Serve the untrusted accelerator (conv layers on residuals) for a trusted runtime elsewhere.
    Accelerator(AcceleratorArgs),
    /// Make the key pairs and certificates of the mutual TLS between the trusted runtime and a remote
    /// accelerator (`--keys DIR` on both sides).
    Keygen(KeygenArgs),
    /// One training step in split mode and in trusted-only mode from the same weights and data, then an
    /// inference forward of both; prints the largest relative difference (logits, loss, every gradient, every
    /// updated weight, the inference logits); exit 1 above 1e-4.
    Verify(VerifyArgs),
    /// Measure what the untrusted side learns: low-rank structure, mutual information of every stream it
    /// sees, reconstruction attacks, and the privacy–accuracy trade-off (see `asymml privacy --help`).
    Privacy(PrivacyArgs),
}

/// How the split runtime decomposes and where its accelerator is.
#[derive(Args, Debug, Clone)]
pub(crate) struct SplitArgs {
    /// Rank policy per conv: guard (the default), guard:F, fixed:R, schedule, energy:E, asym1, asym2, entropy or
    /// table:FILE.
    ///
    /// guard (the default: every conv whose input map is at least 1/8 of the image's
    /// side runs wholly in the trusted runtime — the image-like maps, which every other policy leaks on real
    /// photos — and the deeper ones use asym1; guard:F sets the fraction), fixed:R, schedule (1 at the first conv, doubled per conv/residual block, at most
    /// 32), energy:E (smallest r keeping ≥ E of ‖X‖²), asym1 (= energy:0.97), asym2 (= energy:0.80),
    /// entropy (r = ⌈2^μ⌉ of the SVD-channel entropy), table:FILE (a rank table JSON listing every conv's
    /// rank or "trusted", e.g. from `asymml privacy --calibrate`). `bench` takes several (comma-separated),
    /// each timed.
    #[arg(long, default_value = DEFAULT_RANK, value_delimiter = ',')]
    pub(crate) rank: Vec<RankArg>,
    /// Rounds per component of the paper's lightweight SVD (1 or 2); implies --svd light.
    #[arg(long, value_parser = parse_svd_iters)]
    pub(crate) svd_iters: Option<usize>,
    /// The decomposition: block (the default; block:Q[:P[:auto|gram|direct]]) or light (the paper's; light:I).
    ///
    /// `block` (the default: a blocked subspace iteration built from matrix products,
    /// which reads X a fixed number of times for all components — `block:Q` power steps, `block:Q:P` with P
    /// extra columns, `block:Q:P:auto|gram|direct`) or `light` (the paper's lightweight SVD, Algorithm 1;
    /// `light:I` or --svd-iters for I rounds per component). Both are exact splits; the block SVD keeps at
    /// least the light one's energy at the same rank on real photos and is about twice as fast.
    #[arg(long, value_parser = parse_svd_method)]
    pub(crate) svd: Option<asymml_core::decomp::SvdMethod>,
    /// The basis of each split conv's decomposition: sample (the default), shared or auto; shared and auto
    /// trade privacy for speed.
    ///
    /// `sample` (one U_b per sample, the paper's), `shared`
    /// (one U for the whole batch at every conv: W' = Uᵀ·W is built once per batch; at a fixed rank it keeps
    /// less of each sample's energy), or `auto` (per conv, the cheaper of the two where they keep the same
    /// energy — under an energy policy (`energy:E`, `asym1`, `asym2`, the guard's deeper convs) with
    /// `--svd block`, whose shared rank keeps at least E of every sample's own energy, each conv tries both
    /// bases on its first steps and keeps the one that cost the trusted runtime less; per sample elsewhere;
    /// faster at 32 px under asym2, but its trials can raise the trusted runtime's peak memory). At the same
    /// energy per sample the shared basis leaves more of each image's edges in X_U (docs/performance.md, Stop 39):
    /// `shared` and `auto` trade privacy for speed. Default: sample.
    #[arg(long, value_parser = parse_basis, conflicts_with = "shared_basis")]
    pub(crate) basis: Option<Basis>,
    /// Same as --basis shared.
    #[arg(long)]
    pub(crate) shared_basis: bool,
    /// Micro-batch pipelining (1 to 1024): each split conv's forward in this many parts, so that the two sides
    /// overlap; the results are the same.
    ///
    /// Each split conv's forward cuts the batch into this many parts of
    /// consecutive samples (at most one per sample; the first and last about half the size of the others),
    /// so that the accelerator convolves one part while the trusted runtime decomposes the next and computes
    /// its own part — the two sides overlap in time. The results are the same as with the whole batch (each
    /// part is checked on its own). With an in-process accelerator every part is sent as soon as it is ready,
    /// and an inference forward (VGG) streams the parts through the whole network: each part's next conv
    /// begins while the accelerator still works on the others. The same over a socket (`process`, `unix:`,
    /// `tcp://`). Ignored with --basis shared. 1: the whole batch at once.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub(crate) micro_batches: u16,
    /// Answer each split conv's ∇X and ∇W_U together instead of pipelining them (to measure the overlap).
    ///
    /// Run each split conv's backward as one exchange (∇X and ∇W_U answered together) instead of the
    /// pipelined default, where ∇X is asked for first and the trusted runtime goes on with it — through the
    /// layers below, to the next conv — while the accelerator computes ∇W_U, which is then taken, checked and
    /// added at the next split conv. The gradients are the same either way; this is for measuring the overlap.
    #[arg(long)]
    pub(crate) no_pipelined_backward: bool,
    /// Noise-to-signal ratio: X_U + N(0, (NSR·rms(X))²) before it leaves the trusted runtime.
    #[arg(long, default_value_t = 0.0, value_parser = parse_noise)]
    pub(crate) noise: f32,
    /// Clip each sample's X_U to this ℓ₂ norm before the noise, so that `train` reports a formal (ε, δ).
    ///
    /// Clip each sample's X_U (per conv, all N·H·W values) to this ℓ₂ norm C before the noise, and scale the
    /// noise to the clip instead of rms(X): σ = NSR·C/√(N·H·W) per value. This bounds what one example can
    /// change, so `train` reports a formal (ε, δ) (local DP of each example's residuals; see --delta).
    /// Finite, above 0.
    #[arg(long, value_parser = crate::privacy::accounting::parse_clip)]
    pub(crate) clip: Option<f32>,
    /// The accelerator: inproc (a thread of this process), process (a child process over a Unix socket),
    /// tcp://HOST:PORT or unix:PATH (served by `asymml accelerator --listen`).
    #[arg(long, default_value = "inproc")]
    pub(crate) accelerator: AcceleratorSpec,
    /// Threads of a locally started accelerator (1 to 1024). [default: --threads]
    #[arg(long, value_parser = parse_threads)]
    pub(crate) accelerator_threads: Option<usize>,
    /// Device of a locally started accelerator's convolutions (inproc, process): cpu, cuda (= cuda:0) or
    /// cuda:N — a GPU through cuDNN, in a binary built with `--features cuda`. A remote accelerator picks its
    /// own with `asymml accelerator --accelerator-device`. [default: cpu]
    #[arg(long)]
    pub(crate) accelerator_device: Option<Device>,
    /// Longest wait in seconds for any reply of the accelerator (and for it to take a request); past it the
    /// command stops with an error ("timed out"), a training run keeping its last checkpoint. Above 0, at
    /// most 1000000.
    #[arg(long, default_value = "600", value_parser = parse_timeout)]
    pub(crate) accelerator_timeout: Duration,
    /// Key folder for a tcp:// accelerator (from `asymml keygen`): this side's trusted.key and trusted.crt,
    /// and the accelerator's accelerator.crt, the only certificate accepted (mutual TLS 1.3).
    #[arg(long, value_name = "DIR")]
    pub(crate) keys: Option<PathBuf>,
    /// Talk to a tcp:// accelerator WITHOUT encryption or authentication: anyone on the path can read the
    /// data it is sent and alter its results. Loopback experiments only; prints a warning.
    #[arg(long, conflicts_with = "keys")]
    pub(crate) insecure_plaintext_tcp: bool,
    /// Check every result of the accelerator before it is used (a wrong one stops with exit code 3); `off` only
    /// to measure what the checks cost.
    ///
    /// Check every result of the accelerator (Y_U, ∇X, ∇W_U) against the trusted copy of the weights with
    /// secret random projections (Freivalds) before using it; a wrong result stops the command with an
    /// integrity error (exit code 3). `off` only to measure what the checks cost.
    #[arg(long, default_value = "on")]
    pub(crate) integrity: OnOff,
    /// Where a conv that the rank policy splits runs: auto (the default: split only where that costs the
    /// trusted runtime less, checked on the whole step), auto-wall (the shorter step) or split (always).
    ///
    /// `auto` measures the trusted runtime's time per step for
    /// each conv on both routes — split, and wholly in the trusted runtime — over its first steps (three
    /// each) and then takes the cheaper one, so no conv costs more than it would trusted-only (and the
    /// trusted route leaks nothing); the other route is tried again on two steps at steps 64, 128, 256, …, so
    /// one slow trial does not decide for good. Then it checks the whole step: once every conv has settled,
    /// steps with the settled routes are timed against steps with every conv trusted, and unless the split's
    /// are at least 2 % cheaper, every conv runs trusted (what a conv's own time leaves out: the accelerator
    /// slowing the layers beside it on shared cores, the weights sent after each update). `auto-wall` does
    /// the same with each conv's time including the
    /// time the trusted runtime waits for the accelerator: the route of the shorter step, where `auto` takes
    /// the route of less trusted work (the TEE's time, the paper's measure). `split` always splits as the
    /// policy says (to measure or study the split itself).
    #[arg(long, value_enum, default_value_t = RouteChoice::Auto)]
    pub(crate) route: RouteChoice,
}

#[derive(Args, Debug)]
pub struct AcceleratorArgs {
    /// Address to listen on: HOST:PORT, tcp://HOST:PORT or unix:PATH.
    #[arg(long, value_parser = parse_listen)]
    pub(crate) listen: Address,
    /// Worker threads. [default: all cores]
    #[arg(long, default_value_t = 0)]
    pub(crate) accelerator_threads: usize,
    /// Serve one connection, then exit (a connection refused in the TLS handshake does not count).
    #[arg(long)]
    pub(crate) once: bool,
    /// Device of the convolutions: cpu, cuda (= cuda:0) or cuda:N — a GPU through cuDNN, in a binary built
    /// with `--features cuda`.
    #[arg(long, default_value = "cpu")]
    pub(crate) accelerator_device: Device,
    /// Memory budget of each connection (weights, optimizer state, cached inputs, work space and replies):
    /// bytes, or with a K, M or G suffix (powers of 1024). Work that would exceed it is refused with an error
    /// reply naming the budget; the session goes on.
    #[arg(long, default_value = "8G", value_parser = parse_size)]
    pub(crate) max_session_bytes: u64,
    /// Connections served at once; one more is closed as soon as it is accepted.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub(crate) max_connections: u32,
    /// Seconds a new connection has to complete its handshake (its whole Hello).
    #[arg(long, default_value = "10", value_parser = parse_timeout)]
    pub(crate) handshake_timeout: Duration,
    /// Seconds each request may take to arrive whole, counted from the previous reply (or the handshake); a
    /// client silent (or slow) past it is disconnected.
    #[arg(long, default_value = "600", value_parser = parse_timeout)]
    pub(crate) idle_timeout: Duration,
    /// Key folder for tcp:// (from `asymml keygen`): this side's accelerator.key and accelerator.crt, and the
    /// trusted runtime's trusted.crt, the only client certificate accepted (mutual TLS 1.3).
    #[arg(long, value_name = "DIR")]
    pub(crate) keys: Option<PathBuf>,
    /// Serve tcp:// WITHOUT encryption or authentication: anyone who can reach the port can use the
    /// accelerator, and anyone on the path can read and alter the traffic. Loopback experiments only; prints
    /// a warning.
    #[arg(long, conflicts_with = "keys")]
    pub(crate) insecure_plaintext_tcp: bool,
}

#[derive(Args, Debug)]
pub struct KeygenArgs {
    /// Folder to write trusted.key, trusted.crt, accelerator.key and accelerator.crt into (created if
    /// missing). Copy trusted.key, trusted.crt and accelerator.crt to the trusted machine, and
    /// accelerator.key, accelerator.crt and trusted.crt to the accelerator's.
    #[arg(long, value_name = "DIR")]
    pub(crate) out: PathBuf,
    /// Replace existing key files (both sides then need the new ones).
    #[arg(long)]
    pub(crate) force: bool,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Model (see `train --help`).
    #[arg(long, default_value = "vgg16")]
    pub(crate) model: ModelName,
    /// Input size (1 to 4096; each model has its minimum).
    #[arg(long, default_value_t = 32, value_parser = parse_input_size)]
    pub(crate) input_size: usize,
    /// Batch size (2 to 65536).
    #[arg(long, default_value_t = 4, value_parser = parse_batch_size)]
    pub(crate) batch: usize,
    /// Input channels (1 to 64).
    #[arg(long, default_value_t = 3, value_parser = parse_channels)]
    pub(crate) channels: usize,
    /// Classes (2 to 100000).
    #[arg(long, default_value_t = 10, value_parser = parse_classes)]
    pub(crate) classes: usize,
    /// Seed of the weights and data.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Worker threads (1 to 1024). [default: all cores]
    #[arg(long, value_parser = parse_threads)]
    pub(crate) threads: Option<usize>,
    #[command(flatten)]
    pub(crate) split: SplitArgs,
    /// One JSON object: {"model","rank","max_rel_err","worst"}.
    #[arg(long)]
    pub(crate) json: bool,
}

/// Flags of every command that runs a model: the model, its input size, where its layers run, threads and
/// output (train, eval, infer).
#[derive(Args, Debug, Clone)]
pub(crate) struct RunArgs {
    /// Model: vgg-small, vgg11, vgg13, vgg16, vgg19, resnet18, resnet34; a -cifar or -imagenet suffix picks
    /// the style (default: CIFAR style up to 64 px, ImageNet style above). [default: the model recorded in
    /// --weights, else vgg-small for train]
    #[arg(long)]
    pub(crate) model: Option<ModelName>,
    /// Input size in pixels (images are resized to it). [default: the size recorded in --weights, else (train,
    /// eval) the data's own size; 224 for folders] (1 to 4096; each model has its minimum)
    #[arg(long, value_parser = parse_input_size)]
    pub(crate) input_size: Option<usize>,
    /// Worker threads for the CPU kernels (1 to 1024). [default: all cores]
    #[arg(long, value_parser = parse_threads)]
    pub(crate) threads: Option<usize>,
    /// Where layers run: split (AsymML: low-rank part trusted, residual on the accelerator), trusted-only
    /// (every layer in the trusted runtime) or untrusted-only (every layer on the accelerator: no privacy).
    #[arg(long, default_value = "split")]
    pub(crate) mode: Mode,
    #[command(flatten)]
    pub(crate) split: SplitArgs,
    /// Machine-readable output: JSON on stdout, nothing else (infer: one object per image,
    /// {"file","class","label","probs"}).
    #[arg(long)]
    pub(crate) json: bool,
}

/// Flags shared by train and eval.
#[derive(Args, Debug, Clone)]
pub(crate) struct CommonArgs {
    /// Dataset format: mnist, fashion-mnist, cifar10, folder. Fashion-MNIST without --data-dir uses the
    /// embedded sample (8,000 training and 2,000 test images).
    #[arg(long, default_value = "fashion-mnist")]
    pub(crate) dataset: DatasetKind,
    /// Folder holding the dataset files (IDX files, CIFAR-10 binary batches, or class sub-folders).
    #[arg(long)]
    pub(crate) data_dir: Option<PathBuf>,
    /// Images per batch (1 to 65536).
    #[arg(long, default_value_t = 64, value_parser = parse_batch_size)]
    pub(crate) batch_size: usize,
    /// Seed for weight initialisation, shuffling and augmentation.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Weights (safetensors with torchvision names): initial weights for train, the model for eval.
    #[arg(long)]
    pub(crate) weights: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) run: RunArgs,
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    pub(crate) common: CommonArgs,
    /// Number of epochs (in all, when resuming; 1 to 100000).
    #[arg(long, default_value_t = 3, value_parser = parse_epochs)]
    pub(crate) epochs: usize,
    /// Base learning rate (finite, above 0). [default: 0.05 for sgd, 0.001 for adamw]
    #[arg(long, value_parser = parse_lr)]
    pub(crate) lr: Option<f32>,
    /// Optimizer: sgd (momentum 0.9) or adamw.
    #[arg(long, default_value = "sgd")]
    pub(crate) optimizer: OptimizerChoice,
    /// SGD momentum, in [0, 1).
    #[arg(long, default_value_t = 0.9, value_parser = parse_momentum)]
    pub(crate) momentum: f32,
    /// Use Nesterov momentum with SGD.
    #[arg(long)]
    pub(crate) nesterov: bool,
    /// Weight decay (finite, at least 0). [default: 5e-4 for sgd, 0.01 for adamw]
    #[arg(long, value_parser = parse_weight_decay)]
    pub(crate) weight_decay: Option<f32>,
    /// Learning-rate schedule: constant, cosine, or step:EPOCHS:GAMMA (multiply by GAMMA every EPOCHS).
    #[arg(long, default_value = "cosine")]
    pub(crate) schedule: Schedule,
    /// Training augmentation: none, or crop (random crop with 4 px padding), flip, crop+flip.
    /// [default: crop+flip for cifar10 and folders, none for MNIST-style data]
    #[arg(long)]
    pub(crate) augment: Option<AugmentChoice>,
    /// Use only the first N training images (quick experiments).
    #[arg(long, value_parser = parse_image_count)]
    pub(crate) limit_train: Option<usize>,
    /// Output folder. [default: runs/<model>]
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
    /// Continue the training saved in this folder (its checkpoint.safetensors) up to --epochs.
    #[arg(long)]
    pub(crate) resume: Option<PathBuf>,
    /// δ of the (ε, δ) reported for split training with --clip and --noise, in (0, 1).
    #[arg(long, default_value_t = crate::privacy::accounting::DEFAULT_DELTA,
          value_parser = crate::privacy::accounting::parse_delta)]
    pub(crate) delta: f64,
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub(crate) common: CommonArgs,
}

#[derive(Args, Debug)]
pub struct InferArgs {
    /// Weights to classify with (model.safetensors from `asymml train`, or a torchvision state dict with
    /// --model, --classes and --channels).
    #[arg(long)]
    pub(crate) weights: PathBuf,
    /// An image file or a folder of images (PNG/JPEG, searched recursively).
    #[arg(long)]
    pub(crate) images: PathBuf,
    /// Number of classes, when the weights carry no metadata.
    #[arg(long, value_parser = parse_classes)]
    pub(crate) classes: Option<usize>,
    /// Input channels (1 grey, 3 RGB), when the weights carry no metadata.
    #[arg(long, value_parser = parse_channels)]
    pub(crate) channels: Option<usize>,
    /// Images per batch (1 to 65536).
    #[arg(long, default_value_t = 32, value_parser = parse_batch_size)]
    pub(crate) batch_size: usize,
    #[command(flatten)]
    pub(crate) run: RunArgs,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Models to time (comma-separated).
    #[arg(
        long,
        default_value = "vgg16-cifar,resnet18-cifar",
        value_delimiter = ','
    )]
    pub(crate) models: Vec<ModelName>,
    /// Where layers run: trusted-only, split, untrusted-only (comma-separated to time several). In split mode
    /// --rank may list several policies (e.g. schedule,asym1,asym2), each timed.
    #[arg(long, default_value = "trusted-only,split", value_delimiter = ',')]
    pub(crate) modes: Vec<Mode>,
    /// What to time: infer (a forward pass in evaluation mode), train (forward, loss, backward, optimizer
    /// step), or both.
    #[arg(long, default_value = "infer,train", value_delimiter = ',')]
    pub(crate) phase: Vec<Phase>,
    #[command(flatten)]
    pub(crate) split: SplitArgs,
    /// Batch size (2 to 65536).
    #[arg(long, default_value_t = 32, value_parser = parse_batch_size)]
    pub(crate) batch_size: usize,
    /// Input size (1 to 4096; each model has its minimum). [default: 32 for -cifar models, 224 for -imagenet]
    #[arg(long, value_parser = parse_input_size)]
    pub(crate) input_size: Option<usize>,
    /// Input channels (1 to 64).
    #[arg(long, default_value_t = 3, value_parser = parse_channels)]
    pub(crate) channels: usize,
    /// Classes (2 to 100000).
    #[arg(long, default_value_t = 10, value_parser = parse_classes)]
    pub(crate) classes: usize,
    /// Timed steps (after the warm-up; 1 to 1000000).
    #[arg(long, default_value_t = 5, value_parser = parse_steps)]
    pub(crate) steps: usize,
    /// Untimed warm-up steps (0 to 1000000).
    #[arg(long, default_value_t = 1, value_parser = parse_warmup)]
    pub(crate) warmup: usize,
    /// Rounds (1 to 1000): time the runs of each model and phase this many times in turn, so that a slow
    /// spell of the machine falls on every run alike.
    ///
    /// The runs of each model and phase are timed this many times in turn, each round
    /// starting one run later (A B C, B C A, C A B, …) with a fresh session and its own warm-up, and every row
    /// takes its medians over all rounds' timed steps. On a noisy machine a slow spell then falls on every run
    /// alike instead of on one, and no run always goes first, so the ratios between runs (split against
    /// trusted-only) are fairer: use a multiple of the number of runs
    #[arg(long, default_value_t = 1, value_parser = parse_repeat)]
    pub(crate) repeat: usize,
    /// Threads of the trusted runtime (1 to 1024). [default: all cores]
    #[arg(long, visible_alias = "trusted-threads", value_parser = parse_threads)]
    pub(crate) threads: Option<usize>,
    /// Folder for bench.json and the per-layer stacked-bar PNGs (one per split run).
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
    /// PyTorch's numbers from `python3 tools/bench_torch.py --json`, to print speed ratios.
    #[arg(long)]
    pub(crate) torch: Option<PathBuf>,
    /// Time on real images (a PNG/JPEG file or a folder) instead of random noise: needed for the energy
    /// policies.
    ///
    /// Time on real images instead of random noise: a PNG/JPEG file or a folder of them (e.g.
    /// ../shared/data/images/cifar10), resized and centre-cropped to the input size, normalised with the
    /// ImageNet mean and deviation, repeated to fill the batch. The energy rank policies (asym1, asym2)
    /// pick their ranks from the data, and noise has no low-rank structure.
    #[arg(long)]
    pub(crate) images: Option<PathBuf>,
    /// Split mode: the two sides never compute at once, as beside a GPU or another machine.
    ///
    /// Split mode: the accelerator computes only while the trusted runtime waits for it (each request is held
    /// until its reply is waited for), so the two sides never compute at once. Where they share a machine's
    /// cores, memory bus and cache (an in-process or local accelerator), each otherwise slows the other down;
    /// with a GPU or another machine they would not. This measures the trusted runtime's work as it would cost
    /// beside one; the wall time then has no overlap.
    #[arg(long)]
    pub(crate) lockstep: bool,
    /// Time the runs of each model and phase step by step in turn, all alive at once (peaks not measured).
    ///
    /// Time the runs of each model and phase step by step in turn: every run is started and runs its untimed
    /// steps first, then timed step k of every run comes before step k + 1 of any (each step from the next run
    /// on). A slow spell of the machine then falls on every run alike: on a shared machine, steps of a few
    /// hundred ms vary by 10–50 % from one second to the next, in spells of many steps. Every run's session is
    /// alive at once, so the memory used is their sum and the peaks are not measured (null)
    #[arg(long)]
    pub(crate) interleave: bool,
    /// One JSON object on stdout.
    #[arg(long)]
    pub(crate) json: bool,
}

impl SplitArgs {
    /// The basis asked for (`--basis`, `--shared-basis`; per sample when neither is given).
    pub(crate) fn basis(&self) -> Basis {
        if self.shared_basis {
            Basis::Shared
        } else {
            self.basis.unwrap_or(Basis::PerSample)
        }
    }
}
