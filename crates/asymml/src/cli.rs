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
    /// Where layers run. Only trusted-only (every layer in the trusted runtime) exists so far.
    #[arg(long, default_value = "trusted-only")]
    pub mode: String,
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
    /// Where layers run (trusted-only).
    #[arg(long, default_value = "trusted-only")]
    pub mode: String,
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
    /// Where layers run (trusted-only).
    #[arg(long, default_value = "trusted-only")]
    pub mode: String,
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
    /// Worker threads. [default: all cores]
    #[arg(long)]
    pub threads: Option<usize>,
    /// PyTorch's numbers from `python3 tools/bench_torch.py --json`, to print speed ratios.
    #[arg(long)]
    pub torch: Option<PathBuf>,
    /// One JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}
