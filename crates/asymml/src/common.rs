//! Shared pieces of the commands: thread pool, model set-up from flags or weight-file metadata, batching,
//! evaluation loops, progress bars.

use crate::data::{Augment, Dataset};
use anyhow::{bail, Context, Result};
use asymml_core::models::{ModelSpec, Net};
use asymml_core::rng::Rng;
use asymml_core::weights;
use asymml_core::Tensor;
use asymml_trusted::Session;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::BTreeMap;
use std::path::Path;

/// Metadata keys asymml writes into weight files.
pub const META_SPEC: &str = "asymml.spec";
pub const META_MEAN: &str = "asymml.mean";
pub const META_STD: &str = "asymml.std";
pub const META_CLASSES: &str = "asymml.class_names";
pub const META_DATASET: &str = "asymml.dataset";
pub const META_ARGS: &str = "asymml.train_args";

/// Builds the global rayon pool with `threads` workers (all cores when `None`).
pub fn init_threads(threads: Option<usize>) -> Result<usize> {
    let n = threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if n == 0 {
        bail!("--threads must be at least 1");
    }
    // A second call (tests) keeps the first pool; that is fine.
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global();
    Ok(rayon::current_num_threads())
}

/// What a weight file says about the model it holds.
#[derive(Clone, Debug, Default)]
pub struct WeightInfo {
    pub spec: Option<ModelSpec>,
    pub mean: Option<Vec<f32>>,
    pub std: Option<Vec<f32>>,
    pub class_names: Option<Vec<String>>,
    pub meta: BTreeMap<String, String>,
}

/// Reads the asymml metadata of a weight file (a torchvision state dict has none: all fields `None`).
pub fn weight_info(path: &Path) -> Result<(Vec<u8>, WeightInfo)> {
    let bytes = weights::read_file(path)?;
    let meta = weights::metadata(&bytes).with_context(|| format!("reading {}", path.display()))?;
    let info = WeightInfo {
        spec: from_meta(&meta, META_SPEC),
        mean: from_meta(&meta, META_MEAN),
        std: from_meta(&meta, META_STD),
        class_names: from_meta(&meta, META_CLASSES),
        meta: meta.clone(),
    };
    Ok((bytes, info))
}

/// A JSON value from weight-file metadata (`None` when absent or malformed).
fn from_meta<T: serde::de::DeserializeOwned>(
    meta: &BTreeMap<String, String>,
    key: &str,
) -> Option<T> {
    meta.get(key).and_then(|v| serde_json::from_str(v).ok())
}

/// Metadata describing a model trained on `data` (spec, normalisation, class names, dataset name).
pub fn model_metadata(spec: &ModelSpec, data: &Dataset, dataset: &str) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    m.insert(META_SPEC.into(), to_json(spec));
    m.insert(META_MEAN.into(), to_json(&data.mean));
    m.insert(META_STD.into(), to_json(&data.std));
    m.insert(META_CLASSES.into(), to_json(&data.class_names));
    m.insert(META_DATASET.into(), dataset.to_string());
    m
}

/// JSON text of a value (metadata values are JSON strings).
pub fn to_json<T: serde::Serialize + ?Sized>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// Loads weights into `net` from bytes read earlier, with the file named in errors.
pub fn load_weights(net: &mut Net, bytes: &[u8], path: &Path) -> Result<()> {
    weights::load_bytes(net, bytes, "")
        .with_context(|| format!("loading weights from {}", path.display()))
}

/// Makes the dataset's images the model's input size (resizing when they differ).
pub fn fit_to(data: Dataset, size: usize) -> Dataset {
    if data.h == size && data.w == size {
        data
    } else {
        data.resize_to(size)
    }
}

/// Checks that a dataset fits a model (channels, classes).
pub fn check_fit(spec: &ModelSpec, data: &Dataset, what: &str) -> Result<()> {
    if data.c != spec.in_ch {
        bail!(
            "the {what} images have {} channel(s) but model {} takes {}",
            data.c,
            spec.name(),
            spec.in_ch
        );
    }
    if data.num_classes > spec.classes {
        bail!(
            "the {what} data has {} classes but model {} has {} outputs",
            data.num_classes,
            spec.name(),
            spec.classes
        );
    }
    Ok(())
}

/// A progress bar on stderr (hidden when stderr is not a terminal, or when `quiet`).
pub fn progress(len: u64, what: &str, quiet: bool) -> ProgressBar {
    let target = if quiet {
        ProgressDrawTarget::hidden()
    } else {
        ProgressDrawTarget::stderr()
    };
    let pb = ProgressBar::with_draw_target(Some(len), target);
    pb.set_style(
        ProgressStyle::with_template(
            "{prefix:>10} [{bar:30.cyan/blue}] {pos}/{len} {msg} ({elapsed}<{eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb.set_prefix(what.to_string());
    pb
}

/// A reusable batch buffer.
pub struct Batch {
    pub x: Tensor,
    pub labels: Vec<usize>,
}

impl Batch {
    pub fn new() -> Self {
        Batch {
            x: Tensor::default(),
            labels: Vec::new(),
        }
    }

    /// Fills the buffer with the images at `idx`.
    pub fn fill(&mut self, data: &Dataset, idx: &[usize], aug: Option<&Augment>, rng: &mut Rng) {
        self.x.resize(&[idx.len(), data.c, data.h, data.w]);
        data.fill_batch(idx, aug, rng, &mut self.x.data, &mut self.labels);
    }
}

impl Default for Batch {
    fn default() -> Self {
        Self::new()
    }
}

/// Mean loss and accuracy of `session` on `data` in evaluation mode.
pub fn evaluate(
    session: &mut Session,
    data: &Dataset,
    batch_size: usize,
    pb: &ProgressBar,
) -> Result<(f64, f64)> {
    let mut batch = Batch::new();
    let mut rng = Rng::new(0);
    let (mut loss_sum, mut correct) = (0.0f64, 0usize);
    let order: Vec<usize> = (0..data.len()).collect();
    for idx in order.chunks(batch_size.max(1)) {
        batch.fill(data, idx, None, &mut rng);
        let (loss, c) = session.eval_batch(&batch.x, &batch.labels)?;
        loss_sum += loss as f64 * idx.len() as f64;
        correct += c;
        pb.inc(idx.len() as u64);
    }
    let n = data.len().max(1) as f64;
    Ok((loss_sum / n, correct as f64 / n))
}

/// A session in `mode`: trusted-only computes every conv here; split starts (or reaches) the accelerator,
/// registers the conv layers and returns the handle that keeps a local accelerator alive.
pub fn make_session(
    net: asymml_core::models::Net,
    config: asymml_trusted::TrainConfig,
    mode: asymml_trusted::Mode,
    split: &crate::cli::SplitArgs,
    threads: usize,
    seed: u64,
) -> Result<(Session, Option<crate::accelerator::AcceleratorHandle>)> {
    let mut session = Session::new(net, config, mode);
    let handle = attach_accelerator(&mut session, split, threads, seed)?;
    Ok((session, handle))
}

/// In split mode, starts (or reaches) the accelerator and registers the session's conv layers with their
/// current weights (so call it after loading weights or a checkpoint); nothing in trusted-only mode.
pub fn attach_accelerator(
    session: &mut Session,
    split: &crate::cli::SplitArgs,
    threads: usize,
    seed: u64,
) -> Result<Option<crate::accelerator::AcceleratorHandle>> {
    use asymml_trusted::split::SplitExec;
    let device = crate::accelerator::device_flag(split.accelerator_device.as_deref())?;
    match session.mode {
        asymml_trusted::Mode::TrustedOnly => Ok(None),
        asymml_trusted::Mode::Split => {
            let cfg = split_config(split, seed)?;
            let (transport, handle) = crate::accelerator::start(
                &split.accelerator,
                split.accelerator_threads.unwrap_or(threads),
                device,
            )?;
            let (kind, wd) = (session.config.optimizer, session.config.weight_decay);
            let exec = SplitExec::connect(transport, &mut session.net, kind, wd, cfg)?;
            session.set_split_exec(exec);
            Ok(Some(handle))
        }
        asymml_trusted::Mode::UntrustedOnly => {
            if device != asymml_untrusted::Device::Cpu {
                bail!(
                    "--mode untrusted-only runs the whole network on the CPU accelerator backend only; \
                     --accelerator-device {device} is for --mode split"
                );
            }
            let (transport, handle) = crate::accelerator::start(
                &split.accelerator,
                split.accelerator_threads.unwrap_or(threads),
                device,
            )?;
            let (kind, wd) = (session.config.optimizer, session.config.weight_decay);
            let remote = asymml_trusted::remote::RemoteClient::connect(
                transport,
                &mut session.net,
                kind,
                wd,
            )?;
            session.set_remote(Box::new(remote));
            Ok(Some(handle))
        }
    }
}

/// The split configuration from the flags.
pub fn split_config(
    split: &crate::cli::SplitArgs,
    seed: u64,
) -> Result<asymml_trusted::split::SplitConfig> {
    let policy: asymml_core::decomp::RankPolicy = split
        .rank
        .parse()
        .map_err(|e| anyhow::anyhow!("--rank: {e}"))?;
    if !(1..=2).contains(&split.svd_iters) {
        bail!("--svd-iters must be 1 or 2");
    }
    if !(split.noise.is_finite() && split.noise >= 0.0) {
        bail!("--noise must be a non-negative number");
    }
    Ok(asymml_trusted::split::SplitConfig {
        policy,
        iters: split.svd_iters,
        nsr: split.noise,
        seed,
        shared_basis: split.shared_basis,
    })
}
