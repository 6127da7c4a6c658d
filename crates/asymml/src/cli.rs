//! Command-line definitions (clap).

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

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
    /// One training step in split mode and in trusted-only mode from the same weights and data; prints the
    /// largest relative difference (logits, loss, every gradient, every updated weight); exit 1 above 1e-4.
    Verify(VerifyArgs),
    /// Measure what the untrusted side learns: low-rank structure, mutual information of every stream it
    /// sees, reconstruction attacks, and the privacy–accuracy trade-off (see `asymml privacy --help`).
    Privacy(PrivacyArgs),
}

/// How the split runtime decomposes and where its accelerator is.
#[derive(Args, Debug, Clone)]
pub struct SplitArgs {
    /// Rank policy per conv: fixed:R, schedule (1 at the first conv, doubled per conv/residual block, at most
    /// 32), energy:E (smallest r keeping ≥ E of ‖X‖²), asym1 (= energy:0.97), asym2 (= energy:0.80),
    /// entropy (r = ⌈2^μ⌉ of the SVD-channel entropy).
    #[arg(long, default_value = "schedule")]
    pub rank: String,
    /// Lightweight-SVD iterations per component (1 or 2).
    #[arg(long, default_value_t = 1)]
    pub svd_iters: usize,
    /// One basis U for the whole batch instead of one per sample: W' = Uᵀ·W is built once per batch, at the
    /// price of less energy kept trusted at the same rank.
    #[arg(long)]
    pub shared_basis: bool,
    /// Noise-to-signal ratio: X_U + N(0, (NSR·rms(X))²) before it leaves the trusted runtime.
    #[arg(long, default_value_t = 0.0)]
    pub noise: f32,
    /// The accelerator: inproc (a thread of this process), process (a child process over a Unix socket),
    /// tcp://HOST:PORT or unix:PATH (served by `asymml accelerator --listen`).
    #[arg(long, default_value = "inproc")]
    pub accelerator: String,
    /// Threads of a locally started accelerator. [default: --threads]
    #[arg(long)]
    pub accelerator_threads: Option<usize>,
    /// Device of a locally started accelerator's convolutions (inproc, process): cpu, cuda (= cuda:0) or
    /// cuda:N — a GPU through cuDNN, in a binary built with `--features cuda`. A remote accelerator picks its
    /// own with `asymml accelerator --accelerator-device`. [default: cpu]
    #[arg(long)]
    pub accelerator_device: Option<String>,
}

#[derive(Args, Debug)]
pub struct AcceleratorArgs {
    /// Address to listen on: HOST:PORT, tcp://HOST:PORT or unix:PATH.
    #[arg(long)]
    pub listen: String,
    /// Worker threads. [default: all cores]
    #[arg(long, default_value_t = 0)]
    pub accelerator_threads: usize,
    /// Serve one connection, then exit.
    #[arg(long)]
    pub once: bool,
    /// Device of the convolutions: cpu, cuda (= cuda:0) or cuda:N — a GPU through cuDNN, in a binary built
    /// with `--features cuda`.
    #[arg(long, default_value = "cpu")]
    pub accelerator_device: String,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Model (see `train --help`).
    #[arg(long, default_value = "vgg16")]
    pub model: String,
    /// Input size.
    #[arg(long, default_value_t = 32)]
    pub input_size: usize,
    /// Batch size.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Input channels.
    #[arg(long, default_value_t = 3)]
    pub channels: usize,
    /// Classes.
    #[arg(long, default_value_t = 10)]
    pub classes: usize,
    /// Seed of the weights and data.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Worker threads. [default: all cores]
    #[arg(long)]
    pub threads: Option<usize>,
    #[command(flatten)]
    pub split: SplitArgs,
    /// One JSON object: {"model","rank","max_rel_err","worst"}.
    #[arg(long)]
    pub json: bool,
}

/// Flags shared by train and eval.
#[derive(Args, Debug, Clone)]
pub struct CommonArgs {
    /// Model: vgg-small, vgg11, vgg13, vgg16, vgg19, resnet18, resnet34; a -cifar or -imagenet suffix picks
    /// the style (default: CIFAR style up to 64 px, ImageNet style above). [default: vgg-small, or the
    /// model recorded in --weights]
    #[arg(long)]
    pub model: Option<String>,
    /// Dataset format: mnist, fashion-mnist, cifar10, folder. Fashion-MNIST without --data-dir uses the
    /// embedded sample (8,000 training and 2,000 test images).
    #[arg(long, default_value = "fashion-mnist")]
    pub dataset: String,
    /// Folder holding the dataset files (IDX files, CIFAR-10 binary batches, or class sub-folders).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Input size in pixels (images are resized to it). [default: the data's own size; 224 for folders]
    #[arg(long)]
    pub input_size: Option<usize>,
    /// Images per batch.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Worker threads for the CPU kernels. [default: all cores]
    #[arg(long)]
    pub threads: Option<usize>,
    /// Seed for weight initialisation, shuffling and augmentation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Weights (safetensors with torchvision names): initial weights for train, the model for eval.
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Where layers run: split (AsymML: low-rank part trusted, residual on the accelerator), trusted-only
    /// (every layer in the trusted runtime) or untrusted-only (every layer on the accelerator: no privacy).
    #[arg(long, default_value = "split")]
    pub mode: String,
    #[command(flatten)]
    pub split: SplitArgs,
    /// Machine-readable output: JSON on stdout, nothing else.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Number of epochs (in all, when resuming).
    #[arg(long, default_value_t = 3)]
    pub epochs: usize,
    /// Base learning rate. [default: 0.05 for sgd, 0.001 for adamw]
    #[arg(long)]
    pub lr: Option<f32>,
    /// Optimizer: sgd (momentum 0.9) or adamw.
    #[arg(long, default_value = "sgd")]
    pub optimizer: String,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.9)]
    pub momentum: f32,
    /// Use Nesterov momentum with SGD.
    #[arg(long)]
    pub nesterov: bool,
    /// Weight decay. [default: 5e-4 for sgd, 0.01 for adamw]
    #[arg(long)]
    pub weight_decay: Option<f32>,
    /// Learning-rate schedule: constant, cosine, or step:EPOCHS:GAMMA (multiply by GAMMA every EPOCHS).
    #[arg(long, default_value = "cosine")]
    pub schedule: String,
    /// Training augmentation: none, or crop (random crop with 4 px padding), flip, crop+flip.
    /// [default: crop+flip for cifar10 and folders, none for MNIST-style data]
    #[arg(long)]
    pub augment: Option<String>,
    /// Use only the first N training images (quick experiments).
    #[arg(long)]
    pub limit_train: Option<usize>,
    /// Output folder. [default: runs/<model>]
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue the training saved in this folder (its checkpoint.safetensors) up to --epochs.
    #[arg(long)]
    pub resume: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub common: CommonArgs,
}

#[derive(Args, Debug)]
pub struct InferArgs {
    /// Weights to classify with (model.safetensors from `asymml train`, or a torchvision state dict with
    /// --model, --classes and --channels).
    #[arg(long)]
    pub weights: PathBuf,
    /// An image file or a folder of images (PNG/JPEG, searched recursively).
    #[arg(long)]
    pub images: PathBuf,
    /// Model, when the weights carry no asymml metadata.
    #[arg(long)]
    pub model: Option<String>,
    /// Number of classes, when the weights carry no metadata.
    #[arg(long)]
    pub classes: Option<usize>,
    /// Input channels (1 grey, 3 RGB), when the weights carry no metadata.
    #[arg(long)]
    pub channels: Option<usize>,
    /// Input size, when the weights carry no metadata.
    #[arg(long)]
    pub input_size: Option<usize>,
    /// Images per batch.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Worker threads. [default: all cores]
    #[arg(long)]
    pub threads: Option<usize>,
    /// Where layers run: split, trusted-only or untrusted-only.
    #[arg(long, default_value = "split")]
    pub mode: String,
    #[command(flatten)]
    pub split: SplitArgs,
    /// One JSON object per image on stdout: {"file","class","label","probs"}.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Models to time (comma-separated).
    #[arg(
        long,
        default_value = "vgg16-cifar,resnet18-cifar",
        value_delimiter = ','
    )]
    pub models: Vec<String>,
    /// Where layers run: trusted-only, split, untrusted-only (comma-separated to time several). In split mode
    /// --rank may list several policies (e.g. schedule,asym1,asym2), each timed.
    #[arg(long, default_value = "trusted-only,split", value_delimiter = ',')]
    pub modes: Vec<String>,
    /// What to time: infer (a forward pass in evaluation mode), train (forward, loss, backward, optimizer
    /// step), or both.
    #[arg(long, default_value = "infer,train", value_delimiter = ',')]
    pub phase: Vec<String>,
    #[command(flatten)]
    pub split: SplitArgs,
    /// Batch size.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Input size. [default: 32 for -cifar models, 224 for -imagenet]
    #[arg(long)]
    pub input_size: Option<usize>,
    /// Input channels.
    #[arg(long, default_value_t = 3)]
    pub channels: usize,
    /// Classes.
    #[arg(long, default_value_t = 10)]
    pub classes: usize,
    /// Timed steps (after the warm-up).
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Threads of the trusted runtime. [default: all cores]
    #[arg(long, visible_alias = "trusted-threads")]
    pub threads: Option<usize>,
    /// Folder for bench.json and the per-layer stacked-bar PNGs (one per split run).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// PyTorch's numbers from `python3 tools/bench_torch.py --json`, to print speed ratios.
    #[arg(long)]
    pub torch: Option<PathBuf>,
    /// Time on real images instead of random noise: a PNG/JPEG file or a folder of them (e.g.
    /// ../shared/data/images/cifar10), resized and centre-cropped to the input size, normalised with the
    /// ImageNet mean and deviation, repeated to fill the batch. The energy rank policies (asym1, asym2)
    /// pick their ranks from the data, and noise has no low-rank structure.
    #[arg(long)]
    pub images: Option<PathBuf>,
    /// One JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

/// `asymml privacy`: what the untrusted accelerator can learn about the private images.
#[derive(Args, Debug, Clone)]
#[command(after_long_help = PRIVACY_HELP)]
pub struct PrivacyArgs {
    /// Model (see `train --help`). [default: the model recorded in --weights, else vgg-small]
    #[arg(long)]
    pub model: Option<String>,
    /// Weights of the model (model.safetensors from `asymml train`). [default: fresh weights from --seed]
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Dataset format of --data-dir: mnist, fashion-mnist, cifar10, folder. Fashion-MNIST without
    /// --data-dir uses the embedded sample. The private images are the first --samples of its test split;
    /// the attacker's public images are the first --public of its training split.
    #[arg(long, default_value = "fashion-mnist")]
    pub dataset: String,
    /// Folder holding the dataset files.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Analyse these images (a PNG/JPEG file or a folder) instead of the dataset's: then, unless --data-dir
    /// is given, the attacker's public images are every other one of them (held out from its evaluation).
    #[arg(long)]
    pub images: Option<PathBuf>,
    /// Input size (images are resized to it). [default: the images' own size]
    #[arg(long)]
    pub input_size: Option<usize>,
    /// Number of private images analysed.
    #[arg(long, default_value_t = 20)]
    pub samples: usize,
    /// Number of public images the attacker trains its decoders on.
    #[arg(long, default_value_t = 1000)]
    pub public: usize,
    /// Rank policies to evaluate (comma-separated; see `train --help` for the syntax).
    #[arg(
        long,
        default_value = "schedule,asym1,asym2,entropy",
        value_delimiter = ','
    )]
    pub ranks: Vec<String>,
    /// Noise-to-signal ratios to evaluate (comma-separated).
    #[arg(
        long,
        default_value = "0,0.05,0.1,0.2",
        value_delimiter = ',',
        allow_negative_numbers = true
    )]
    pub nsr: Vec<f32>,
    /// Lightweight-SVD iterations per component (1 or 2), as in training.
    #[arg(long, default_value_t = 1)]
    pub svd_iters: usize,
    /// Decompose with one basis per batch (as `train --shared-basis`).
    #[arg(long)]
    pub shared_basis: bool,
    /// Conv layers whose X_U is measured (comma-separated indices, or `all`).
    #[arg(long, default_value = "all")]
    pub layers: String,
    /// Conv layers attacked by the decoders (comma-separated indices, or `none`).
    #[arg(long, default_value = "0,1,2")]
    pub attack_layers: String,
    /// Decoders the attacker learns: ridge, conv (comma-separated), or none.
    #[arg(long, default_value = "ridge,conv", value_delimiter = ',')]
    pub decoders: Vec<String>,
    /// Training steps (batches of 32 public images) of each conv decoder.
    #[arg(long, default_value_t = 300)]
    pub decoder_steps: usize,
    /// Neighbours k of the mutual-information estimators.
    #[arg(long, default_value_t = 50)]
    pub k: usize,
    /// Threshold α of the local non-uniformity correction.
    #[arg(long, default_value_t = 0.4)]
    pub alpha: f64,
    /// Pixel pairs per image given to the MI estimators (a seeded sample when the layer has more).
    #[arg(long, default_value_t = 4096)]
    pub mi_points: usize,
    /// Jitter that breaks ties in I(X;X), as a fraction of the standard deviation of X.
    #[arg(long, default_value_t = 1e-3)]
    pub jitter: f64,
    /// Kernel sizes of the patch-entropy study (the paper's Fig. 9).
    #[arg(long, default_value = "1,3,5,7,9,11", value_delimiter = ',')]
    pub kernel_sizes: Vec<usize>,
    /// Also train the model in split mode once per --nsr and report test accuracy against leakage.
    #[arg(long)]
    pub tradeoff: bool,
    /// Epochs of each trade-off training run.
    #[arg(long, default_value_t = 1)]
    pub tradeoff_epochs: usize,
    /// Training images of each trade-off run. [default: the whole training split]
    #[arg(long)]
    pub tradeoff_train: Option<usize>,
    /// Rank policy of the trade-off runs.
    #[arg(long, default_value = "schedule")]
    pub tradeoff_rank: String,
    /// Images per batch (the decomposition's batch, and training).
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Worker threads. [default: all cores]
    #[arg(long)]
    pub threads: Option<usize>,
    /// Seed of fresh weights, sampling and noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Folder for the PNG plots and image grids (and privacy.json).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// One JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

const PRIVACY_HELP: &str = "\
What is measured (every stream is taken from a recording of the messages the split runtime really sends):

1. Low-rank structure, per conv layer: the singular-value spectrum of each sample's input X (channels x pixels),
   the energy kept by each rank policy's r (exact optimum, and what the lightweight SVD kept), the SVD-channel
   entropy mu = -log2 sum (s/sum s)^2 and ceil(2^mu), and the r each policy picks. The kernel-size study: the
   entropy of the k x k patch channels of the images for each --kernel-sizes (the paper's Fig. 9).
2. Mutual information, per image, between the pixel values of X and of what the accelerator sees at the same
   position (2-D samples, KSG with the local non-uniformity correction, --k, --alpha): rel_mi = I(X;X_U)/I(X;X).
   I(X;X) depends on the jitter that breaks ties (--jitter); the output states it, and gives beside it the
   Linfoot coefficient sqrt(1-exp(-2 I(X;X_U))) (0: independent, 1: a function of X), which needs no
   normalisation. Streams: X_U of each conv (--layers), for each --ranks and --nsr, and in training the
   output gradient dY of the first conv, paired with the channel mean of the image.
3. Reconstruction attacks: an attacker who knows the model and has --public images of the same kind simulates
   the split on them and learns a decoder from X_U back to the image: ridge regression on 3x3 windows of X_U,
   and a small conv decoder (3 conv layers of 48 channels, sub-pixel upsampling, Adam, MSE, --decoder-steps) trained with asymml's engine.
   PSNR (dB) and SSIM (Gaussian window 11, sigma 1.5) on the held-out private images, beside the same
   decoders trained on X itself (what sending X in the clear would leak) and the mean image.
4. With --tradeoff: the model trained in split mode for each --nsr; test accuracy against leakage.

--json prints one object: {\"layers\":[...],\"kernel_study\":[...],\"settings\":[{\"layer\",\"stream\",\"rank_policy\",
\"rank\",\"nsr\",\"energy_kept\",\"entropy\",\"rel_mi\",\"linfoot\",\"psnr_db\",\"ssim\",...}],\"tradeoff\":[...]}.
--out DIR writes privacy.json, spectra.png, energy.png, kernel_entropy.png, leakage.png, attack grids
(attack_<layer>_<rank>_nsr<nsr>.png: X, X_T, X_U, and each decoder's reconstruction) and tradeoff.png.

Examples:
  asymml privacy --images ../shared/data/images/cifar10 --samples 20 --out privacy-cifar
  asymml privacy --dataset fashion-mnist --data-dir ../shared/data/fashion-mnist --weights runs/vgg-small/model.safetensors --tradeoff --out privacy-fmnist";
