//! `asymml privacy`'s flags, parsed at the edge: rank policies, dataset, layer selections and decoders are
//! typed values, so a bad one is refused by clap with the flag's name.

use crate::data::DatasetKind;
use crate::values::{
    parse_batch_size, parse_epochs, parse_image_count, parse_image_count0, parse_input_size,
    parse_noise, parse_steps, parse_svd_iters, parse_svd_method, parse_threads, RankArg,
};
use clap::{Args, ValueEnum};
use std::path::PathBuf;
use std::str::FromStr;

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
    pub dataset: DatasetKind,
    /// Folder holding the dataset files.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Analyse these images (a PNG/JPEG file or a folder) instead of the dataset's: then, unless --data-dir
    /// is given, the attacker's public images are every other one of them (held out from its evaluation).
    #[arg(long)]
    pub images: Option<PathBuf>,
    /// Input size (images are resized to it; 1 to 4096). [default: the images' own size]
    #[arg(long, value_parser = parse_input_size)]
    pub input_size: Option<usize>,
    /// Number of private images analysed (1 to 10000000).
    #[arg(long, default_value_t = 20, value_parser = parse_image_count)]
    pub samples: usize,
    /// Number of public images the attacker trains its decoders on (0 to 10000000).
    #[arg(long, default_value_t = 1000, value_parser = parse_image_count0)]
    pub public: usize,
    /// Rank policies to evaluate (comma-separated; see `train --help` for the syntax). By default the one
    /// `train`, `infer` and `bench` use (guard), then the paper's.
    #[arg(
        long,
        default_value = "guard,schedule,asym1,asym2,entropy",
        value_delimiter = ','
    )]
    pub ranks: Vec<RankArg>,
    /// Noise-to-signal ratios to evaluate (comma-separated).
    #[arg(
        long,
        default_value = "0,0.05,0.1,0.2",
        value_delimiter = ',',
        allow_negative_numbers = true,
        value_parser = parse_noise
    )]
    pub nsr: Vec<f32>,
    /// Rounds per component of the paper's lightweight SVD (1 or 2), as in training; implies --svd light.
    #[arg(long, value_parser = parse_svd_iters)]
    pub svd_iters: Option<usize>,
    /// The decomposition, as in training: `block` (the default; `block:Q[:P[:ROUTE]]`) or `light` (the
    /// paper's Algorithm 1; `light:I`). The streams, ranks and energies measured are those it gives.
    #[arg(long, value_parser = parse_svd_method)]
    pub svd: Option<asymml_core::decomp::SvdMethod>,
    /// Decompose with one basis per batch (as `train --shared-basis`).
    #[arg(long)]
    pub shared_basis: bool,
    /// Also record the first conv's output gradient dY (the `dy` stream): on, off, or auto (up to 64 px).
    ///
    /// Also record the output gradient dY of the first conv (the `dy` stream), which needs a backward pass
    /// of the whole network for every setting: on, off, or auto (on for inputs up to 64x64 px; off above,
    /// where that backward pass costs several times all the rest of a setting).
    #[arg(long, value_enum, default_value_t = GradStream::Auto)]
    pub grad_stream: GradStream,
    /// Conv layers whose X_U is measured (comma-separated indices, or `all`).
    #[arg(long, default_value = "all")]
    pub layers: LayerSelection,
    /// Conv layers attacked by the decoders (comma-separated indices, or `none`).
    #[arg(long, default_value = "0,1,2")]
    pub attack_layers: LayerSelection,
    /// Decoders the attacker learns: ridge, conv (comma-separated), or none.
    #[arg(long, default_value = "ridge,conv", value_delimiter = ',')]
    pub decoders: Vec<Decoder>,
    /// Training steps of each conv decoder (1 to 1000000). [default: 300 batches of 32 whole streams for
    /// streams up to 64x64 positions; above, 150 batches of 8 random 32x32 crops, with a decoder of 24
    /// instead of 48 channels]
    #[arg(long, value_parser = parse_steps)]
    pub decoder_steps: Option<usize>,
    /// Neighbours k of the mutual-information estimators (1 to 10000).
    #[arg(long, default_value_t = 50, value_parser = parse_k)]
    pub k: usize,
    /// Threshold α of the local non-uniformity correction, in (0, 1).
    #[arg(long, default_value_t = 0.4, value_parser = parse_alpha)]
    pub alpha: f64,
    /// Pixel pairs per image given to the MI estimators (a seeded sample when the layer has more; 1 to
    /// 10000000).
    #[arg(long, default_value_t = 4096, value_parser = parse_image_count)]
    pub mi_points: usize,
    /// Jitter that breaks ties in I(X;X), as a fraction of the standard deviation of X (finite, above 0).
    #[arg(long, default_value_t = 1e-3, value_parser = parse_jitter)]
    pub jitter: f64,
    /// Kernel sizes of the patch-entropy study (the paper's Fig. 9; odd, 1 to 31).
    #[arg(
        long,
        default_value = "1,3,5,7,9,11",
        value_delimiter = ',',
        value_parser = parse_kernel_size
    )]
    pub kernel_sizes: Vec<usize>,
    /// Also train the model in split mode once per --nsr and report test accuracy against leakage.
    #[arg(long)]
    pub tradeoff: bool,
    /// Epochs of each trade-off training run (1 to 100000).
    #[arg(long, default_value_t = 1, value_parser = parse_epochs)]
    pub tradeoff_epochs: usize,
    /// Training images of each trade-off run. [default: the whole training split]
    #[arg(long, value_parser = parse_image_count)]
    pub tradeoff_train: Option<usize>,
    /// Rank policy of the trade-off runs.
    #[arg(long, default_value = "schedule")]
    pub tradeoff_rank: RankArg,
    /// Images per batch (the decomposition's batch, and training; 1 to 65536, or auto). [default: auto,
    /// 32 images, fewer for large inputs so that a batch holds at most 4 images of 224x224 px (memory)]
    #[arg(long, default_value = "auto", value_parser = parse_batch_or_auto)]
    pub batch_size: usize,
    /// Worker threads (1 to 1024). [default: all cores]
    #[arg(long, value_parser = parse_threads)]
    pub threads: Option<usize>,
    /// Seed of fresh weights, sampling and noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Formal accounting: each sample's X_U clipped to this ℓ₂ norm C, noise σ = NSR·C/√(N·H·W) per value;
    /// reports per conv, rank policy and --nsr the (ε, δ) of one release and of one forward pass (local DP).
    #[arg(long, value_parser = super::accounting::parse_clip)]
    pub clip: Option<f32>,
    /// δ of the formal accounting (with --clip), in (0, 1).
    #[arg(long, default_value_t = super::accounting::DEFAULT_DELTA, value_parser = super::accounting::parse_delta)]
    pub delta: f64,
    /// Calibrate a rank table instead of the report: per conv, the smallest rank whose X_U stays under every
    /// --target on these (public) images.
    ///
    /// Calibrate a rank table instead of the report: per conv of --layers, the smallest rank (or the
    /// fully-trusted route) whose X_U stays under every --target on these images, at the first --nsr.
    /// Calibration uses only the images given (--images, or the dataset): give public images of the kind you
    /// will protect, never the private ones. Convs outside --layers get the rank of the first --ranks policy.
    /// Writes --table-out, read with `--rank table:FILE`.
    #[arg(long)]
    pub calibrate: bool,
    /// Leakage each calibrated conv must stay under: comma-separated MEASURE=VALUE with MEASURE one of
    /// rel-mi, linfoot, edge-ssim (edge SSIM above its chance level), ssim-gain (needs --decoders).
    #[arg(long, default_value = "rel-mi=0.02,edge-ssim=0.1,ssim-gain=0.1")]
    pub target: Target,
    /// Where --calibrate writes the rank table. [default: rank_table.json in --out, else here]
    #[arg(long)]
    pub table_out: Option<PathBuf>,
    /// The privacy–speed frontier: each rank policy's speedup over trusted-only beside its leakage.
    ///
    /// The privacy–speed frontier: per rank policy (--ranks, plus the default policy of `train`, `infer` and
    /// `bench`) the trusted runtime's speedup over trusted-only, timed here like `asymml bench` (inference, on
    /// these images and this model, batch --batch-size or 8 when auto, one warm-up and --frontier-steps timed
    /// steps, --frontier-threads on each side), beside each --nsr's worst leakage over the measured convs,
    /// whether it hides the images and the accuracy cost of --tradeoff; writes frontier.png (and the timing,
    /// frontier_bench.json) with --out.
    #[arg(long, conflicts_with = "calibrate")]
    pub frontier: bool,
    /// Take the frontier's speedups from this bench.json (`asymml bench --json` or --out) instead of timing:
    /// it needs an inference row in trusted-only mode and one in split mode per rank policy, for this model
    /// and input size.
    #[arg(long, requires = "frontier", value_name = "FILE")]
    pub frontier_bench: Option<PathBuf>,
    /// Threads of the trusted runtime and of the in-process accelerator in the frontier's timing (1 to 1024).
    #[arg(long, default_value_t = 1, value_parser = parse_threads)]
    pub frontier_threads: usize,
    /// Timed steps of the frontier's timing, after one warm-up step (1 to 1000000).
    #[arg(long, default_value_t = 2, value_parser = parse_steps)]
    pub frontier_steps: usize,
    /// Folder for the PNG plots and image grids (and privacy.json).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// One JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

/// `--batch-size`: a batch size, or `auto` (0, sized to the input by the plan).
fn parse_batch_or_auto(s: &str) -> Result<usize, String> {
    if s.trim() == "auto" {
        Ok(0)
    } else {
        parse_batch_size(s)
    }
}

/// Pixels per batch of the automatic `--batch-size` (4 images of 224 × 224).
pub(crate) const AUTO_BATCH_PIXELS: usize = 4 * 224 * 224;

/// The automatic batch size for h × w inputs: 32, or fewer so that a batch holds at most
/// [`AUTO_BATCH_PIXELS`] pixels (at least 1).
pub(crate) fn auto_batch(h: usize, w: usize) -> usize {
    (AUTO_BATCH_PIXELS / (h * w).max(1)).clamp(1, 32)
}

/// `--k`: neighbours of the MI estimators, 1 to 10000.
fn parse_k(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(k @ 1..=10_000) => Ok(k),
        _ => Err("must be a whole number from 1 to 10000".into()),
    }
}

/// `--alpha`: in (0, 1).
fn parse_alpha(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(a) if a > 0.0 && a < 1.0 => Ok(a),
        _ => Err("must be a number between 0 and 1 (both excluded)".into()),
    }
}

/// `--jitter`: finite and above 0.
fn parse_jitter(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(j) if j.is_finite() && j > 0.0 => Ok(j),
        _ => Err("must be a finite number above 0".into()),
    }
}

/// `--kernel-sizes`: odd sizes from 1 to 63.
fn parse_kernel_size(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(k @ 1..=31) if k % 2 == 1 => Ok(k),
        _ => Err(format!(
            "kernel sizes must be odd numbers from 1 to 31 (got '{s}')"
        )),
    }
}

/// Conv layers named on the command line: every one, or a list of indices (`none` or empty: no layer).
/// Whether an index exists is known only once the model is built: see [`LayerSelection::resolve`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LayerSelection {
    All,
    /// Indices in the order given, without repeats.
    List(Vec<usize>),
}

impl FromStr for LayerSelection {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "all" => Ok(LayerSelection::All),
            "none" | "" => Ok(LayerSelection::List(Vec::new())),
            list => {
                let mut out = Vec::new();
                for p in list.split(',') {
                    let i: usize = p
                        .trim()
                        .parse()
                        .map_err(|_| format!("'{p}' is not a layer index"))?;
                    if !out.contains(&i) {
                        out.push(i);
                    }
                }
                Ok(LayerSelection::List(out))
            }
        }
    }
}

impl LayerSelection {
    /// The indices among the `n` conv layers of the model; `flag` names the flag in the error for an index
    /// that does not exist.
    pub(crate) fn resolve(&self, n: usize, flag: &str) -> anyhow::Result<Vec<usize>> {
        match self {
            LayerSelection::All => Ok((0..n).collect()),
            LayerSelection::List(list) => match list.iter().find(|&&i| i >= n) {
                Some(i) => anyhow::bail!(
                    "{flag}: layer {i} does not exist (the model has {n} conv layers)"
                ),
                None => Ok(list.clone()),
            },
        }
    }
}

/// `--target`: the largest leakage a calibrated conv may show, per measure (absent: not checked).
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Target {
    pub rel_mi: Option<f64>,
    pub linfoot: Option<f64>,
    pub edge_ssim: Option<f64>,
    pub ssim_gain: Option<f64>,
}

impl FromStr for Target {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut t = Target::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((name, value)) = part.split_once('=') else {
                return Err(format!(
                    "'{part}': expected MEASURE=VALUE (e.g. edge-ssim=0.3)"
                ));
            };
            let v: f64 = match value.trim().parse() {
                Ok(v) if f64::is_finite(v) && v >= 0.0 => v,
                _ => return Err(format!("'{part}': the value must be a finite number ≥ 0")),
            };
            let slot = match name.trim().to_ascii_lowercase().replace('_', "-").as_str() {
                "rel-mi" => &mut t.rel_mi,
                "linfoot" => &mut t.linfoot,
                "edge-ssim" => &mut t.edge_ssim,
                "ssim-gain" => &mut t.ssim_gain,
                other => {
                    return Err(format!(
                        "unknown measure '{other}' (rel-mi, linfoot, edge-ssim, ssim-gain)"
                    ))
                }
            };
            if slot.replace(v).is_some() {
                return Err(format!("'{}' is given twice", name.trim()));
            }
        }
        if t == Target::default() {
            return Err("give at least one MEASURE=VALUE".into());
        }
        Ok(t)
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = [
            ("rel-mi", self.rel_mi),
            ("linfoot", self.linfoot),
            ("edge-ssim", self.edge_ssim),
            ("ssim-gain", self.ssim_gain),
        ]
        .iter()
        .filter_map(|(n, v)| v.map(|v| format!("{n}={v}")))
        .collect();
        f.write_str(&parts.join(","))
    }
}

/// `--grad-stream`: whether the first conv's output gradient is recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum GradStream {
    /// On for inputs up to 64x64 px, off above.
    Auto,
    On,
    Off,
}

impl GradStream {
    /// Whether to record it for h × w inputs.
    pub(crate) fn resolve(self, h: usize, w: usize) -> bool {
        match self {
            GradStream::On => true,
            GradStream::Off => false,
            GradStream::Auto => h * w <= 64 * 64,
        }
    }
}

/// A decoder the attacker learns from a stream back to the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Decoder {
    /// Ridge regression on 3×3 windows of the stream.
    Ridge,
    /// A small conv decoder trained with asymml's engine.
    Conv,
    /// No decoder (no attack).
    None,
}

impl Decoder {
    /// The decoder's name in the report.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Decoder::Ridge => "ridge",
            Decoder::Conv => "conv",
            Decoder::None => "none",
        }
    }
}

const PRIVACY_HELP: &str = "\
What is measured (every stream is taken from a recording of the messages the split runtime really sends):

1. Low-rank structure, per conv layer: the singular-value spectrum of each sample's input X (channels x pixels),
   the energy kept by each rank policy's r (exact optimum, and what the decomposition of --svd kept), the SVD-channel
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
4. Structural leakage (what a person sees, which pixel-pair MI misses): edge_ssim, the SSIM of X_U's best edge
   map (Sobel magnitude of the channels' RMS or maximum, the first principal channel, the 4 channels of largest
   variance, and the channel mean and principal channel blurred by 1 and 2 px) against the image's at X_U's
   resolution, with its chance level (against another image) and edge_excess = edge_ssim - chance; and
   ssim_gain = (s - s0)/(1 - s0), the best attack's SSIM s over the mean image's s0. Judged on the grids: X_U
   is recognisable when edge_excess >= 0.1 or ssim_gain >= 0.1 (see docs/security.md).
5. With --tradeoff: the model trained in split mode for each --nsr; test accuracy against leakage.

--frontier: the privacy-speed frontier. Per rank policy (--ranks and the default policy) and --nsr: the trusted
runtime's speedup over trusted-only (timed as `asymml bench` does, inference, or read from --frontier-bench), the
worst leakage over the measured convs (rel_mi, edge_excess, ssim_gain, the best attack's SSIM and PSNR), whether
it hides the images (edge_excess < 0.1, ssim_gain < 0.1, rel_mi <= 2 %), the accuracy cost of --tradeoff's run
at that noise level, and whether no other point is both faster and less leaky (the Pareto set). --out adds
frontier.png (speedup against max(edge_excess, ssim_gain)) and, when timed, frontier_bench.json (the timing in
bench.json's format, for --frontier-bench).

--calibrate: per conv of --layers, the smallest rank (ranks doubled from 1, then bisected), or the fully-trusted
route, whose X_U stays under every --target on the given images at the first --nsr; writes a rank table JSON
(--table-out, else rank_table.json in --out or here) for `--rank table:FILE`, and calibration.json with every
probe in --out. It uses only the images you give it: give public images of the kind you protect.

Scale (memory stays bounded at 224 px): images go through the network in batches (--batch-size auto: 32, or
fewer so that a batch holds at most 4 images of 224x224 px) and only the measured convs' inputs are kept (the
spectra of every conv are taken batch by batch); of the recorded messages only X_U of the measured convs and dY
of the first conv are kept; the attacker's forward passes stop after the last attacked conv. Subsampling, the
same for every setting: the ridge decoder's normal equations use at most 32768 stream positions spread evenly
over the public images; the kernel-size study uses at most 4096 pixel positions per plane, spread evenly; the
conv decoder trains on whole streams up to 64x64 positions (48 channels, batches of 32, 300 steps) and above
on random 32x32 crops (24 channels, 8 crops per step, 150 steps); --grad-stream auto skips the dY stream (a
backward pass of the whole network per setting) above 64x64 px.

--json prints one object: {\"layers\":[...],\"kernel_study\":[...],\"settings\":[{\"layer\",\"stream\",\"rank_policy\",
\"rank\",\"nsr\",\"energy_kept\",\"entropy\",\"rel_mi\",\"linfoot\",\"edge_ssim\",\"psnr_db\",\"ssim\",\"ssim_gain\",...}],\"tradeoff\":[...],\"frontier\":[...] (with --frontier)}.
--out DIR writes privacy.json, spectra.png, energy.png, kernel_entropy.png, leakage.png, edge grids
(edges_conv<layer>_<rank>_nsr<nsr>.png: the image, its edge map, X_U's best edge map, X_U), attack grids
(attack_<layer>_<rank>_nsr<nsr>.png: X, X_T, X_U, and each decoder's reconstruction), tradeoff.png and frontier.png (--frontier).

Examples:
  asymml privacy --images ../shared/data/images/cifar10 --samples 20 --out privacy-cifar
  asymml privacy --dataset fashion-mnist --data-dir ../shared/data/fashion-mnist --weights runs/vgg-small/model.safetensors --tradeoff --out privacy-fmnist";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_selections() {
        let parse = |s: &str| s.parse::<LayerSelection>();
        assert_eq!(
            parse("all").unwrap().resolve(3, "--layers").unwrap(),
            vec![0, 1, 2]
        );
        assert!(parse("none")
            .unwrap()
            .resolve(3, "--layers")
            .unwrap()
            .is_empty());
        assert_eq!(
            parse("2,0,2").unwrap().resolve(3, "--layers").unwrap(),
            vec![2, 0]
        );
        let err = parse("3").unwrap().resolve(3, "--layers").unwrap_err();
        assert!(
            err.to_string().contains("--layers: layer 3 does not exist"),
            "{err}"
        );
        assert!(parse("x").is_err());
    }

    #[test]
    fn the_default_policy_is_measured_first() {
        use clap::{Args, FromArgMatches};
        let cmd = PrivacyArgs::augment_args(clap::Command::new("privacy"));
        let a =
            PrivacyArgs::from_arg_matches(&cmd.try_get_matches_from(["privacy"]).unwrap()).unwrap();
        let default: RankArg = crate::values::DEFAULT_RANK.parse().unwrap();
        assert_eq!(
            a.ranks.first().map(|r| r.to_string()),
            Some(default.to_string())
        );
        assert_eq!(a.ranks.len(), 5);
    }

    #[test]
    fn automatic_batch_size() {
        assert_eq!(auto_batch(32, 32), 32);
        assert_eq!(auto_batch(224, 224), 4);
        assert_eq!(auto_batch(4096, 4096), 1);
        assert_eq!(parse_batch_or_auto("auto"), Ok(0));
        assert_eq!(parse_batch_or_auto("8"), Ok(8));
        assert!(parse_batch_or_auto("0").is_err());
        assert!(GradStream::Auto.resolve(32, 32));
        assert!(!GradStream::Auto.resolve(224, 224));
        assert!(GradStream::On.resolve(224, 224) && !GradStream::Off.resolve(8, 8));
    }

    #[test]
    fn targets() {
        let t: Target = "edge-ssim=0.2, rel_mi=0.02".parse().unwrap();
        assert_eq!(
            t,
            Target {
                rel_mi: Some(0.02),
                edge_ssim: Some(0.2),
                ..Default::default()
            }
        );
        assert_eq!(t.to_string().parse::<Target>().unwrap(), t);
        for bad in [
            "",
            "edge-ssim",
            "edge-ssim=x",
            "psnr=3",
            "rel-mi=-1",
            "rel-mi=1,rel-mi=2",
        ] {
            assert!(bad.parse::<Target>().is_err(), "{bad}");
        }
    }
}
