//! `asymml privacy`'s plan: the flags checked and resolved into the images, the model and the settings to
//! measure, before any measurement.

use super::args::{Decoder, PrivacyArgs};
use super::attack::PixelScale;
use super::leakage::MiConfig;
use crate::batch::{check_fit, fit_to};
use crate::data::{self, Dataset};
use crate::values::{check_batch_bytes, RankArg, MAX_INPUT_SIZE};
use crate::weightfile::{self, WeightInfo};
use anyhow::{bail, Context, Result};
use asymml_core::decomp::RankPolicy;
use asymml_core::models::{ModelSpec, Net};
use asymml_core::weights;
use asymml_trusted::split::{Basis, SplitConfig};
use std::collections::BTreeMap;
use std::path::Path;

/// Everything `asymml privacy` measures, resolved from its flags.
pub(crate) struct Plan {
    pub args: PrivacyArgs,
    /// Worker threads.
    pub threads: usize,
    pub data: Data,
    pub model: Model,
    /// Conv layers whose X_U is measured.
    pub mi_layers: Vec<usize>,
    /// Conv layers attacked (none without decoders, attacked images or public images).
    pub attack_layers: Vec<usize>,
    /// The decoders the attacker learns (`--decoders` without `none`).
    pub decoders: Vec<Decoder>,
    pub mi: MiConfig,
    /// The private images' normalisation, to score reconstructions in pixels.
    pub scale: PixelScale,
    /// Record the first conv's output gradient (a backward pass per setting; `--grad-stream`).
    pub grad_stream: bool,
}

impl Plan {
    /// Checks the flags, loads the images and the model, and resolves the layers and decoders. Creates the
    /// `--out` folder.
    pub(crate) fn resolve(mut args: PrivacyArgs, threads: usize) -> Result<Plan> {
        let (weight_bytes, info) = match &args.weights {
            Some(p) => {
                let (b, i) = weightfile::read(p)?;
                (Some(b), i)
            }
            None => (None, WeightInfo::default()),
        };
        args.svd =
            Some(crate::values::svd_method(args.svd, args.svd_iters).map_err(anyhow::Error::msg)?);
        let data = Data::load(&args, &info)?;
        if data.private.is_empty() {
            bail!("no images to analyse");
        }
        if args.batch_size == 0 {
            args.batch_size = super::args::auto_batch(data.private.h, data.private.w);
        }
        let model = Model::build(&args, &info, weight_bytes.as_deref(), &data.private)?;
        let n_convs = model.convs.len();
        for rank in args.ranks.iter().chain([&args.tradeoff_rank]) {
            rank.check_covers(model.convs.iter().map(|(n, _)| n.as_str()))
                .map_err(anyhow::Error::msg)?;
        }
        let mi_layers = args.layers.resolve(n_convs, "--layers")?;
        let decoders: Vec<Decoder> = args
            .decoders
            .iter()
            .copied()
            .filter(|d| *d != Decoder::None)
            .collect();
        let attack_layers =
            if decoders.is_empty() || data.attacked.is_empty() || data.public.is_empty() {
                Vec::new()
            } else {
                args.attack_layers.resolve(n_convs, "--attack-layers")?
            };
        if let Some(out) = &args.out {
            std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        }
        Ok(Plan {
            mi: MiConfig {
                k: args.k,
                alpha: args.alpha,
                points: args.mi_points,
                jitter: args.jitter,
                seed: args.seed,
            },
            scale: PixelScale {
                mean: data.private.mean.clone(),
                std: data.private.std.clone(),
            },
            grad_stream: args.grad_stream.resolve(data.private.h, data.private.w),
            args,
            threads,
            data,
            model,
            mi_layers,
            attack_layers,
            decoders,
        })
    }

    /// The split's settings for a rank policy (or table) and noise level (the trusted runtime's training
    /// defaults).
    pub(crate) fn split(&self, rank: &RankArg, nsr: f32, seed: u64) -> SplitConfig {
        let mut cfg = self.split_policy(rank.policy, nsr, seed);
        rank.apply(&mut cfg);
        cfg
    }

    /// The split's settings for a rank policy (no table) and noise level.
    pub(crate) fn split_policy(&self, policy: RankPolicy, nsr: f32, seed: u64) -> SplitConfig {
        SplitConfig {
            policy,
            iters: self.args.svd_iters.unwrap_or(1),
            svd: self.args.svd,
            nsr,
            seed,
            // One basis fixed for the whole evaluation (`auto` would choose by timings).
            basis: if self.args.shared_basis {
                Basis::Shared
            } else {
                Basis::PerSample
            },
            clip: self.args.clip,
            // The Freivalds checks send nothing: the recorded streams are the same without them.
            integrity: false,
            ..Default::default()
        }
    }
}

/// The images to analyse and the attacker's public images.
pub(crate) struct Data {
    pub private: Dataset,
    pub public: Dataset,
    /// Indices into `private` of the images attacked (held out from the attacker's training).
    pub attacked: Vec<usize>,
    pub describe: String,
}

impl Data {
    /// The images of `--images`, else the dataset's (normalised as the weights record, when they do).
    fn load(a: &PrivacyArgs, info: &WeightInfo) -> Result<Data> {
        match &a.images {
            Some(images) => Data::from_images(a, images, info),
            None => Data::from_dataset(a),
        }
    }

    /// The first `--samples` of `--images`; the attacker's public images are the first `--public` of
    /// `--data-dir`'s training split when given, else the even-numbered private images (the odd-numbered ones
    /// are attacked).
    fn from_images(a: &PrivacyArgs, images: &Path, info: &WeightInfo) -> Result<Data> {
        let norm = match (&info.mean, &info.std) {
            (Some(m), Some(s)) => Some((m.clone(), s.clone())),
            _ => None,
        };
        let channels = info.spec.as_ref().map_or(3, |s| s.in_ch);
        let classes = info.spec.as_ref().map_or(10, |s| s.classes);
        let size = a.input_size.or(info.spec.as_ref().map(|s| s.input_size));
        let all = images_dataset(images, channels, size, classes, norm)?;
        let n = all.len().min(a.samples);
        let private = all.select(&(0..n).collect::<Vec<_>>());
        if let Some(dir) = &a.data_dir {
            let (train, _) = data::load(a.dataset, Some(dir), channels, private.h, a.seed)?;
            data::check_images_bytes(train.len(), train.c, private.h)?;
            let train = fit_to(train, private.h);
            let public = train.select(&(0..a.public.min(train.len())).collect::<Vec<_>>());
            return Ok(Data {
                attacked: (0..private.len()).collect(),
                describe: format!("{} ({} images)", images.display(), private.len()),
                private,
                public,
            });
        }
        let public = private.select(&(0..n).step_by(2).collect::<Vec<_>>());
        Ok(Data {
            attacked: (1..n).step_by(2).collect(),
            describe: format!(
                "{} ({} images; attacker trains on the even-numbered ones)",
                images.display(),
                private.len()
            ),
            private,
            public,
        })
    }

    /// The first `--samples` of the dataset's test split; the attacker's public images are the first
    /// `--public` of its training split.
    fn from_dataset(a: &PrivacyArgs) -> Result<Data> {
        let (train, test) = data::load(a.dataset, a.data_dir.as_deref(), 3, 224, a.seed)?;
        let (train, test) = match a.input_size {
            Some(s) => {
                for d in [&train, &test] {
                    data::check_images_bytes(d.len(), d.c, s)?;
                }
                (fit_to(train, s), fit_to(test, s))
            }
            None => (train, test),
        };
        let private = test.select(&(0..a.samples.min(test.len())).collect::<Vec<_>>());
        let public = train.select(&(0..a.public.min(train.len())).collect::<Vec<_>>());
        Ok(Data {
            attacked: (0..private.len()).collect(),
            describe: format!(
                "{} {} ({} test images; attacker: {} training images)",
                a.dataset,
                a.data_dir
                    .as_ref()
                    .map_or("(embedded sample)".to_string(), |d| d.display().to_string()),
                private.len(),
                public.len()
            ),
            private,
            public,
        })
    }
}

/// Per-channel mean and standard deviation (0..1 units) of `n` u8 images of `c` planes of `hw` pixels.
fn channel_stats(images: &[u8], c: usize, hw: usize) -> (Vec<f32>, Vec<f32>) {
    let mut mean = vec![0f32; c];
    let mut std = vec![1f32; c];
    for ch in 0..c {
        let (mut s, mut s2, mut n) = (0f64, 0f64, 0f64);
        for img in images.chunks(c * hw) {
            for &v in &img[ch * hw..(ch + 1) * hw] {
                let x = v as f64 / 255.0;
                s += x;
                s2 += x * x;
                n += 1.0;
            }
        }
        if n > 0.0 {
            let m = s / n;
            mean[ch] = m as f32;
            std[ch] = ((s2 / n - m * m).max(0.0).sqrt() as f32).max(1e-3);
        }
    }
    (mean, std)
}

/// The class label in a file name ending in `_<label>` (as the CIFAR-10 sample's), else 0.
fn label_of(path: &Path, classes: usize) -> u32 {
    path.file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| s.rsplit('_').next())
        .and_then(|l| l.parse::<u32>().ok())
        .filter(|&l| (l as usize) < classes)
        .unwrap_or(0)
}

/// Loads the images of `--images` as a dataset (normalised with `norm`, else with their own statistics).
fn images_dataset(
    path: &Path,
    channels: usize,
    size: Option<usize>,
    classes: usize,
    norm: Option<(Vec<f32>, Vec<f32>)>,
) -> Result<Dataset> {
    let files = data::list_images(path)?;
    let size = match size {
        Some(s) => s,
        None => {
            // The header only, under the decoding limits; the size must be one a model takes.
            let (w, h) = data::image_dimensions(&files[0])?;
            let own = w.min(h) as usize;
            if own > MAX_INPUT_SIZE {
                bail!(
                    "{} is {w}×{h} px: above the largest input size ({MAX_INPUT_SIZE} px); pass --input-size",
                    files[0].display()
                );
            }
            own
        }
    };
    data::check_images_bytes(files.len(), channels, size)?;
    let mut images = Vec::with_capacity(files.len() * channels * size * size);
    let mut labels = Vec::with_capacity(files.len());
    for f in &files {
        images.extend(data::load_image(f, channels, size)?);
        labels.push(label_of(f, classes));
    }
    let (mean, std) = norm.unwrap_or_else(|| channel_stats(&images, channels, size * size));
    Ok(Dataset {
        images,
        n: files.len(),
        c: channels,
        h: size,
        w: size,
        labels,
        num_classes: classes,
        class_names: (0..classes).map(|i| i.to_string()).collect(),
        mean,
        std,
    })
}

/// The model: its spec and weights (a fresh network per run, the same weights every time), and the name and
/// input channels of each conv.
pub(crate) struct Model {
    pub spec: ModelSpec,
    /// The weights, serialised (None: the fresh weights of `seed`, rebuilt on demand).
    bytes: Option<Vec<u8>>,
    seed: u64,
    pub convs: Vec<(String, usize)>,
    /// A network with the model's weights, lent out by [`Model::lease`] (built again when absent).
    cache: std::sync::Mutex<Option<Net>>,
}

/// A network lent by [`Model::lease`]; it goes back to the model when dropped.
pub(crate) struct NetLease<'m> {
    model: &'m Model,
    net: Option<Net>,
}

impl std::ops::Deref for NetLease<'_> {
    type Target = Net;
    fn deref(&self) -> &Net {
        self.net
            .as_ref()
            .expect("a lease holds its network until dropped")
    }
}

impl std::ops::DerefMut for NetLease<'_> {
    fn deref_mut(&mut self) -> &mut Net {
        self.net
            .as_mut()
            .expect("a lease holds its network until dropped")
    }
}

impl Drop for NetLease<'_> {
    fn drop(&mut self) {
        if let (Some(net), Ok(mut c)) = (self.net.take(), self.model.cache.lock()) {
            *c = Some(net);
        }
    }
}

impl Model {
    /// The model of `--model`/`--weights` for the private images: the weights' (checked against the
    /// images), else `--model` (default vgg-small) with fresh weights from `--seed`.
    fn build(
        a: &PrivacyArgs,
        info: &WeightInfo,
        weight_bytes: Option<&[u8]>,
        private: &Dataset,
    ) -> Result<Model> {
        let spec = match &info.spec {
            Some(_) => weightfile::resolve_spec(
                info,
                a.model.as_deref(),
                Some(private.c),
                Some(private.num_classes),
                Some(private.h),
            )?,
            None => ModelSpec::parse(
                a.model.as_deref().unwrap_or("vgg-small"),
                private.c,
                private.num_classes.max(2),
                private.h,
            )?,
        };
        check_fit(&spec, private, "private")?;
        check_batch_bytes(a.batch_size, spec.in_ch, spec.width, spec.input_size)?;
        let mut net = spec.build(a.seed)?;
        // Fresh weights are rebuilt from the seed for each run; loaded ones are kept serialised.
        let bytes = match (weight_bytes, &a.weights) {
            (Some(b), Some(p)) => {
                weightfile::load_into(&mut net, b, p)?;
                Some(weights::serialize(
                    &weights::state_entries(&mut net),
                    &BTreeMap::new(),
                )?)
            }
            _ => None,
        };
        let mut convs = Vec::new();
        net.visit_convs(&mut |name, c| convs.push((name.to_string(), c.in_ch)));
        Ok(Model {
            spec,
            bytes,
            seed: a.seed,
            convs,
            cache: std::sync::Mutex::new(Some(net)),
        })
    }

    /// The model's network, reused from one run to the next: the weights never change (the capture takes
    /// no optimiser step), a training-mode forward uses the batch's statistics, not the running ones, and
    /// every backward starts from zeroed gradients, so a reused network records the same streams as a fresh
    /// one without building 100+ M parameters again for every batch.
    pub(crate) fn lease(&self) -> Result<NetLease<'_>> {
        let cached = self.cache.lock().ok().and_then(|mut c| c.take());
        let net = match cached {
            Some(n) => n,
            None => self.net()?,
        };
        Ok(NetLease {
            model: self,
            net: Some(net),
        })
    }

    /// A fresh network with the model's weights.
    pub(crate) fn net(&self) -> Result<Net> {
        let mut net = self.spec.build(self.seed)?;
        if let Some(b) = &self.bytes {
            weights::load_bytes(&mut net, b, "")?;
        }
        Ok(net)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_from_file_names() {
        assert_eq!(label_of(Path::new("a/cifar10_03_7.png"), 10), 7);
        assert_eq!(label_of(Path::new("a/cat.png"), 10), 0);
        assert_eq!(label_of(Path::new("a/x_12.png"), 10), 0);
    }
}
