//! `asymml privacy`: what the untrusted accelerator can learn about the private images — the low-rank
//! structure of conv inputs, the mutual information of every stream it sees, reconstruction attacks, and the
//! privacy–accuracy trade-off. Every stream is taken from a recording of the split runtime's own messages.

mod attack;
mod capture;
mod grid;
mod leakage;
mod lowrank;
mod tradeoff;

pub use attack::{psnr, ssim};

use crate::cli::PrivacyArgs;
use crate::common;
use crate::data::{self, Dataset, DatasetKind};
use crate::plot;
use anyhow::{bail, Context, Result};
use asymml_core::decomp::RankPolicy;
use asymml_core::models::{ModelSpec, Net};
use asymml_core::rng::Rng;
use asymml_core::{weights, Tensor};
use attack::{ConvDecoder, PixelScale, Ridge};
use grid::Tile;
use leakage::{Leak, MiConfig};
use lowrank::{KernelEntropy, LayerSpectra};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

/// One conv layer's low-rank structure.
#[derive(Debug, Serialize)]
struct LayerReport {
    layer: usize,
    name: String,
    in_ch: usize,
    h: usize,
    w: usize,
    /// Mean SVD-channel entropy μ (bits) and ⌈2^μ⌉ of it; the largest ⌈2^μ⌉ over the images.
    entropy: f64,
    entropy_rank: usize,
    entropy_rank_max: usize,
    /// Mean singular values over the largest one (first 64).
    spectrum: Vec<f64>,
    /// Mean energy fraction kept by r = 1, 2, … (first 64).
    energy_curve: Vec<f64>,
    /// The r each rank policy picked (largest over the batches).
    ranks: BTreeMap<String, usize>,
}

/// One attack's result.
#[derive(Clone, Debug, Serialize)]
struct AttackResult {
    decoder: String,
    psnr_db: f64,
    ssim: f64,
}

/// One (stream, layer, policy, noise) setting.
#[derive(Clone, Debug, Serialize)]
struct Setting {
    layer: usize,
    /// `x_u` (the residual of the conv's input) or `dy` (the first conv's output gradient, in training).
    stream: &'static str,
    rank_policy: String,
    rank: usize,
    nsr: f32,
    /// Mean optimal energy fraction of X kept trusted by this rank (exact spectra).
    energy_kept: f64,
    /// What the lightweight SVD kept: 1 − ‖X_U‖²/‖X‖² (without noise; absent when nsr > 0).
    energy_kept_light: Option<f64>,
    /// Mean SVD-channel entropy μ of the layer's input (bits).
    entropy: f64,
    rel_mi: f64,
    mi_nats: f64,
    linfoot: f64,
    /// The best attack on this stream (largest PSNR), when attacked.
    psnr_db: Option<f64>,
    ssim: Option<f64>,
    attacks: Vec<AttackResult>,
}

/// Reference points of the attacks: decoders trained on X itself, and the mean image.
#[derive(Debug, Serialize)]
struct Baseline {
    layer: usize,
    /// `x` (the layer's whole input, as an accelerator would see it without the split) or `mean_image`.
    input: &'static str,
    attacks: Vec<AttackResult>,
}

#[derive(Debug, Serialize)]
struct MiInfo {
    estimator: &'static str,
    k: usize,
    alpha: f64,
    points_per_image: usize,
    jitter: f64,
    normalisation: String,
}

#[derive(Debug, Serialize)]
struct Report {
    model: String,
    data: String,
    images: usize,
    attack_private_images: usize,
    public_images: usize,
    mi: MiInfo,
    layers: Vec<LayerReport>,
    kernel_study: Vec<KernelEntropy>,
    settings: Vec<Setting>,
    baselines: Vec<Baseline>,
    tradeoff: Vec<tradeoff::TradeoffEntry>,
    notes: Vec<String>,
}

/// Parses a layer list: `all`/`none` or comma-separated indices below `n`.
fn layer_list(s: &str, n: usize, flag: &str) -> Result<Vec<usize>> {
    match s.trim() {
        "all" => Ok((0..n).collect()),
        "none" | "" => Ok(Vec::new()),
        list => {
            let mut out = Vec::new();
            for p in list.split(',') {
                let i: usize = p
                    .trim()
                    .parse()
                    .with_context(|| format!("{flag}: '{p}' is not a layer index"))?;
                if i >= n {
                    bail!("{flag}: layer {i} does not exist (the model has {n} conv layers)");
                }
                if !out.contains(&i) {
                    out.push(i);
                }
            }
            Ok(out)
        }
    }
}

/// The images to analyse and the attacker's public images.
struct Data {
    private: Dataset,
    public: Dataset,
    /// Indices into `private` of the images attacked (held out from the attacker's training).
    attacked: Vec<usize>,
    describe: String,
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
            let (w, h) = image::image_dimensions(&files[0])
                .with_context(|| format!("reading {}", files[0].display()))?;
            w.min(h) as usize
        }
    };
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

/// A dataset's images (by index) as one normalised tensor [n, c, h, w] and their labels.
fn tensor_of(data: &Dataset, idx: &[usize]) -> (Tensor, Vec<usize>) {
    let mut x = Tensor::zeros(&[idx.len(), data.c, data.h, data.w]);
    let mut labels = Vec::new();
    data.fill_batch(idx, None, &mut Rng::new(0), &mut x.data, &mut labels);
    (x, labels)
}

/// Rows `idx` of a [n, ...] tensor.
fn rows(t: &Tensor, idx: &[usize]) -> Tensor {
    let n = t.shape.first().copied().unwrap_or(0);
    let per = t.len().checked_div(n).unwrap_or(0);
    let mut shape = t.shape.clone();
    if let Some(s) = shape.first_mut() {
        *s = idx.len();
    }
    let mut data = Vec::with_capacity(idx.len() * per);
    for &i in idx {
        data.extend_from_slice(&t.data[i * per..(i + 1) * per]);
    }
    Tensor { shape, data }
}

/// Concatenates [b, ...] tensors along the batch.
fn concat(parts: &[Tensor]) -> Tensor {
    let Some(first) = parts.iter().find(|t| !t.shape.is_empty()) else {
        return Tensor::default();
    };
    let mut shape = first.shape.clone();
    shape[0] = parts
        .iter()
        .map(|t| t.shape.first().copied().unwrap_or(0))
        .sum();
    let data = parts.iter().flat_map(|t| t.data.iter().copied()).collect();
    Tensor { shape, data }
}

/// Rebuilds the model from its serialised weights (a fresh network per run, the same weights every time).
struct ModelSource {
    spec: ModelSpec,
    bytes: Vec<u8>,
    seed: u64,
}

impl ModelSource {
    fn net(&self) -> Result<Net> {
        let mut net = self.spec.build(self.seed)?;
        weights::load_bytes(&mut net, &self.bytes, "")?;
        Ok(net)
    }
}

/// Every conv's input for the images `x` (training-mode forward, batches of `batch`).
fn conv_inputs(src: &ModelSource, x: &Tensor, batch: usize) -> Result<Vec<Tensor>> {
    let n = x.shape[0];
    let mut per_layer: Vec<Vec<Tensor>> = Vec::new();
    for start in (0..n).step_by(batch) {
        let idx: Vec<usize> = (start..(start + batch).min(n)).collect();
        let mut net = src.net()?;
        let inputs = capture::conv_inputs(&mut net, &rows(x, &idx))?;
        per_layer.resize_with(inputs.len(), Vec::new);
        for (l, t) in inputs.into_iter().enumerate() {
            per_layer[l].push(t);
        }
    }
    Ok(per_layer.iter().map(|p| concat(p)).collect())
}

/// What the split runtime sent for the images `x` in batches: X_U of the `wanted` layers, ∇Y of the first
/// conv (with `backward`), and the largest rank of every conv over the batches.
#[allow(clippy::too_many_arguments)]
fn streams(
    src: &ModelSource,
    x: &Tensor,
    labels: &[usize],
    batch: usize,
    policy: RankPolicy,
    nsr: f32,
    iters: usize,
    seed: u64,
    wanted: &[usize],
    shared_basis: bool,
    backward: bool,
) -> Result<(BTreeMap<usize, Tensor>, Tensor, Vec<usize>)> {
    let n = x.shape[0];
    let mut xu: BTreeMap<usize, Vec<Tensor>> = BTreeMap::new();
    let mut dy = Vec::new();
    let mut ranks: Vec<usize> = Vec::new();
    for (bi, start) in (0..n).step_by(batch).enumerate() {
        let idx: Vec<usize> = (start..(start + batch).min(n)).collect();
        let mut net = src.net()?;
        let s = capture::split_streams(
            &mut net,
            &rows(x, &idx),
            &labels[start..start + idx.len()],
            policy,
            nsr,
            iters,
            seed ^ (bi as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            shared_basis,
            backward,
        )?;
        ranks.resize(s.ranks.len(), 0);
        ranks
            .iter_mut()
            .zip(&s.ranks)
            .for_each(|(a, b)| *a = (*a).max(*b));
        for (l, t) in s.x_u.into_iter().enumerate() {
            if wanted.contains(&l) {
                xu.entry(l).or_default().push(t);
            }
        }
        dy.push(s.dy0);
    }
    Ok((
        xu.into_iter().map(|(l, p)| (l, concat(&p))).collect(),
        concat(&dy),
        ranks,
    ))
}

/// 1 − ‖X_U‖²/‖X‖², averaged per image.
fn energy_light(x: &Tensor, xu: &Tensor) -> f64 {
    let n = x.shape.first().copied().unwrap_or(0);
    if n == 0 || x.len() != xu.len() {
        return f64::NAN;
    }
    let per = x.len() / n;
    let mut total = 0.0;
    for i in 0..n {
        let sq = |v: &[f32]| v.iter().map(|a| (*a as f64) * (*a as f64)).sum::<f64>();
        let (ex, eu) = (
            sq(&x.data[i * per..][..per]),
            sq(&xu.data[i * per..][..per]),
        );
        total += if ex > 0.0 { 1.0 - eu / ex } else { 1.0 };
    }
    total / n as f64
}

/// Runs `asymml privacy`.
pub fn run(a: PrivacyArgs) -> Result<()> {
    let threads = common::init_threads(a.threads)?;
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    if a.samples == 0 {
        bail!("--samples must be at least 1");
    }
    if !(1..=2).contains(&a.svd_iters) {
        bail!("--svd-iters must be 1 or 2");
    }
    if a.k == 0 || !(a.alpha > 0.0 && a.alpha < 1.0) || a.jitter.is_nan() || a.jitter <= 0.0 {
        bail!("--k must be at least 1, --alpha in (0, 1) and --jitter positive");
    }
    if a.nsr.iter().any(|v| !(v.is_finite() && *v >= 0.0)) {
        bail!("--nsr values must be non-negative numbers");
    }
    let policies: Vec<(String, RankPolicy)> = a
        .ranks
        .iter()
        .map(|r| {
            r.parse::<RankPolicy>()
                .map(|p| (r.trim().to_string(), p))
                .map_err(|e| anyhow::anyhow!("--ranks: {e}"))
        })
        .collect::<Result<_>>()?;
    for d in &a.decoders {
        if !["ridge", "conv", "none"].contains(&d.as_str()) {
            bail!("--decoders: unknown decoder '{d}' (ridge, conv or none)");
        }
    }
    for &k in &a.kernel_sizes {
        if k == 0 || k % 2 == 0 {
            bail!("--kernel-sizes must be odd numbers (got {k})");
        }
    }
    let quiet = a.json;

    // ---- model and data ----
    let (wbytes, info) = match &a.weights {
        Some(p) => {
            let (b, i) = common::weight_info(p)?;
            (Some(b), i)
        }
        None => (None, common::WeightInfo::default()),
    };
    let kind: DatasetKind = a.dataset.parse()?;
    let norm = match (&info.mean, &info.std) {
        (Some(m), Some(s)) => Some((m.clone(), s.clone())),
        _ => None,
    };
    let data = if let Some(images) = &a.images {
        let channels = info.spec.as_ref().map_or(3, |s| s.in_ch);
        let classes = info.spec.as_ref().map_or(10, |s| s.classes);
        let size = a.input_size.or(info.spec.as_ref().map(|s| s.input_size));
        let all = images_dataset(images, channels, size, classes, norm.clone())?;
        let n = all.len().min(a.samples);
        let private = all.select(&(0..n).collect::<Vec<_>>());
        if let Some(dir) = &a.data_dir {
            let (train, _) = data::load(kind, Some(dir), channels, private.h, a.seed)?;
            let train = common::fit_to(train, private.h);
            let public = train.select(&(0..a.public.min(train.len())).collect::<Vec<_>>());
            Data {
                attacked: (0..private.len()).collect(),
                describe: format!("{} ({} images)", images.display(), private.len()),
                private,
                public,
            }
        } else {
            // The attacker's public images are the even-numbered ones; the odd-numbered ones are attacked.
            let public = private.select(&(0..n).step_by(2).collect::<Vec<_>>());
            Data {
                attacked: (1..n).step_by(2).collect(),
                describe: format!(
                    "{} ({} images; attacker trains on the even-numbered ones)",
                    images.display(),
                    private.len()
                ),
                private,
                public,
            }
        }
    } else {
        let (train, test) = data::load(kind, a.data_dir.as_deref(), 3, 224, a.seed)?;
        let (train, test) = match a.input_size {
            Some(s) => (common::fit_to(train, s), common::fit_to(test, s)),
            None => (train, test),
        };
        let private = test.select(&(0..a.samples.min(test.len())).collect::<Vec<_>>());
        let public = train.select(&(0..a.public.min(train.len())).collect::<Vec<_>>());
        Data {
            attacked: (0..private.len()).collect(),
            describe: format!(
                "{} {} ({} test images; attacker: {} training images)",
                kind,
                a.data_dir
                    .as_ref()
                    .map_or("(embedded sample)".to_string(), |d| d.display().to_string()),
                private.len(),
                public.len()
            ),
            private,
            public,
        }
    };
    if data.private.is_empty() {
        bail!("no images to analyse");
    }
    let spec = match &info.spec {
        Some(_) => crate::evaluate::resolve_spec(
            &info,
            a.model.as_deref(),
            Some(data.private.c),
            Some(data.private.num_classes),
            Some(data.private.h),
        )?,
        None => ModelSpec::parse(
            a.model.as_deref().unwrap_or("vgg-small"),
            data.private.c,
            data.private.num_classes.max(2),
            data.private.h,
        )?,
    };
    common::check_fit(&spec, &data.private, "private")?;
    let mut net = spec.build(a.seed)?;
    if let (Some(b), Some(p)) = (&wbytes, &a.weights) {
        common::load_weights(&mut net, b, p)?;
    }
    let bytes = weights::serialize(&weights::state_entries(&mut net), &BTreeMap::new())?;
    let src = ModelSource {
        spec: spec.clone(),
        bytes,
        seed: a.seed,
    };
    let mut conv_meta = Vec::new();
    net.visit_convs(&mut |name, c| conv_meta.push((name.to_string(), c.in_ch)));
    let n_convs = conv_meta.len();
    let mi_layers = layer_list(&a.layers, n_convs, "--layers")?;
    let decoders: Vec<&str> = a
        .decoders
        .iter()
        .map(|s| s.as_str())
        .filter(|d| *d != "none")
        .collect();
    let attack_layers = if decoders.is_empty() || data.attacked.is_empty() || data.public.is_empty()
    {
        Vec::new()
    } else {
        layer_list(&a.attack_layers, n_convs, "--attack-layers")?
    };
    let scale = PixelScale {
        mean: data.private.mean.clone(),
        std: data.private.std.clone(),
    };
    let cfg = MiConfig {
        k: a.k,
        alpha: a.alpha,
        points: a.mi_points,
        jitter: a.jitter,
        seed: a.seed,
    };
    if let Some(out) = &a.out {
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    }

    // ---- the private images through the trusted runtime ----
    let all_idx: Vec<usize> = (0..data.private.len()).collect();
    let (x0, labels) = tensor_of(&data.private, &all_idx);
    let work = (policies.len() * a.nsr.len()) as u64 + 3;
    let pb = common::progress(work, "privacy", quiet);
    pb.set_message("conv inputs and spectra");
    let inputs = conv_inputs(&src, &x0, a.batch_size)?;
    let spectra: Vec<LayerSpectra> = inputs.iter().map(LayerSpectra::of).collect();
    let kernel_study: Vec<KernelEntropy> = a
        .kernel_sizes
        .iter()
        .map(|&k| lowrank::kernel_entropy(&x0, k))
        .collect();
    pb.inc(1);
    pb.set_message("I(X;X) per layer");
    let mut self_mi: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    for &l in &mi_layers {
        self_mi.insert(l, leakage::self_information(&inputs[l], &cfg)?);
    }
    let (pub_x, _) = tensor_of(&data.public, &(0..data.public.len()).collect::<Vec<_>>());
    let attacked_x = rows(&x0, &data.attacked);
    let mut notes = Vec::new();

    // ---- baselines: the attacks on X itself and the mean image ----
    let mut baselines = Vec::new();
    let pub_inputs = if attack_layers.is_empty() {
        Vec::new()
    } else {
        conv_inputs(&src, &pub_x, a.batch_size)?
    };
    pb.inc(1);
    let decode =
        |public_s: &Tensor, private_s: &Tensor, seed: u64| -> Result<Vec<(String, Tensor)>> {
            let mut out = Vec::new();
            for d in &decoders {
                let recon = match *d {
                    "ridge" => {
                        Ridge::fit(public_s, &pub_x, threads)?.predict(private_s, data.private.c)?
                    }
                    _ => ConvDecoder::fit(public_s, &pub_x, a.decoder_steps, 32, seed)?
                        .predict(private_s)?,
                };
                out.push((d.to_string(), recon));
            }
            Ok(out)
        };
    let score = |recons: &[(String, Tensor)]| -> Result<Vec<AttackResult>> {
        recons
            .iter()
            .map(|(d, r)| {
                let (p, s) = attack::quality(r, &attacked_x, &scale)?;
                Ok(AttackResult {
                    decoder: d.clone(),
                    psnr_db: p,
                    ssim: s,
                })
            })
            .collect()
    };
    for &l in &attack_layers {
        pb.set_message(format!("attacks on X of conv {l} (reference)"));
        let recons = decode(&pub_inputs[l], &rows(&inputs[l], &data.attacked), a.seed)?;
        baselines.push(Baseline {
            layer: l,
            input: "x",
            attacks: score(&recons)?,
        });
    }
    if !attack_layers.is_empty() {
        // The mean public image as the reconstruction of every private one.
        let per = pub_x.len() / pub_x.shape[0].max(1);
        let mut mean = vec![0f32; per];
        for img in pub_x.data.chunks(per) {
            mean.iter_mut()
                .zip(img)
                .for_each(|(m, v)| *m += v / pub_x.shape[0] as f32);
        }
        let mut recon = attacked_x.clone();
        recon
            .data
            .chunks_mut(per)
            .for_each(|c| c.copy_from_slice(&mean));
        let (p, s) = attack::quality(&recon, &attacked_x, &scale)?;
        baselines.push(Baseline {
            layer: 0,
            input: "mean_image",
            attacks: vec![AttackResult {
                decoder: "mean".into(),
                psnr_db: p,
                ssim: s,
            }],
        });
    }
    pb.inc(1);

    // ---- every (policy, nsr) setting ----
    let mut settings = Vec::new();
    let mut layer_ranks: Vec<BTreeMap<String, usize>> = vec![BTreeMap::new(); n_convs];
    let gray = leakage::channel_mean_repeated(&x0, 1)?;
    let gray_self = leakage::self_information(&gray, &cfg)?;
    let mut wanted: Vec<usize> = mi_layers.clone();
    wanted.extend(attack_layers.iter().copied());
    for (pname, policy) in &policies {
        for &nsr in &a.nsr {
            pb.set_message(format!("{pname}, nsr {nsr}: streams"));
            let (xu, dy0, ranks) = streams(
                &src,
                &x0,
                &labels,
                a.batch_size,
                *policy,
                nsr,
                a.svd_iters,
                a.seed,
                &wanted,
                a.shared_basis,
                true,
            )?;
            for (l, r) in ranks.iter().enumerate() {
                layer_ranks[l].insert(pname.clone(), *r);
            }
            for &l in &mi_layers {
                let Some(s) = xu.get(&l).filter(|t| !t.is_empty()) else {
                    continue;
                };
                pb.set_message(format!("{pname}, nsr {nsr}: MI of X_U at conv {l}"));
                let lk = leakage::leak(&inputs[l], s, &self_mi[&l], &cfg)?;
                settings.push(setting(
                    l,
                    "x_u",
                    pname,
                    ranks[l],
                    nsr,
                    &spectra[l],
                    &lk,
                    nsr == 0.0,
                    &inputs[l],
                    s,
                ));
            }
            if !dy0.is_empty() {
                let m = dy0.shape[1];
                if dy0.shape[2..] == x0.shape[2..] {
                    let g = leakage::channel_mean_repeated(&x0, m)?;

                    let lk = leakage::leak(&g, &dy0, &gray_self, &cfg)?;
                    let mut st = setting(
                        0,
                        "dy",
                        pname,
                        ranks[0],
                        nsr,
                        &spectra[0],
                        &lk,
                        false,
                        &inputs[0],
                        &dy0,
                    );
                    st.energy_kept_light = None;
                    settings.push(st);
                }
            }
            // Attacks: the attacker simulates the split on its public images.
            if !attack_layers.is_empty() {
                pb.set_message(format!("{pname}, nsr {nsr}: attacks"));
                let pub_labels: Vec<usize> =
                    data.public.labels.iter().map(|&l| l as usize).collect();
                let (pub_xu, _, _) = streams(
                    &src,
                    &pub_x,
                    &pub_labels,
                    a.batch_size,
                    *policy,
                    nsr,
                    a.svd_iters,
                    a.seed ^ 0xA77AC,
                    &attack_layers,
                    a.shared_basis,
                    false,
                )?;
                for &l in &attack_layers {
                    let (Some(ps), Some(s)) = (pub_xu.get(&l), xu.get(&l)) else {
                        continue;
                    };
                    if ps.is_empty() || s.is_empty() {
                        continue;
                    }
                    let private_s = rows(s, &data.attacked);
                    let recons = decode(ps, &private_s, a.seed ^ l as u64)?;
                    let results = score(&recons)?;
                    if let Some(out) = &a.out {
                        let path = out.join(format!(
                            "attack_conv{l}_{}_nsr{nsr}.png",
                            pname.replace([':', '.'], "_")
                        ));
                        write_attack_grid(
                            &path,
                            &attacked_x,
                            &rows(&inputs[l], &data.attacked),
                            &private_s,
                            &recons,
                            &scale,
                        )?;
                    }
                    let best = results
                        .iter()
                        .max_by(|x, y| x.psnr_db.total_cmp(&y.psnr_db))
                        .cloned();
                    match settings.iter_mut().find(|st| {
                        st.layer == l
                            && st.stream == "x_u"
                            && st.rank_policy == *pname
                            && st.nsr == nsr
                    }) {
                        Some(st) => {
                            st.psnr_db = best.as_ref().map(|b| b.psnr_db);
                            st.ssim = best.as_ref().map(|b| b.ssim);
                            st.attacks = results;
                        }
                        None => {
                            let mut st = setting(
                                l,
                                "x_u",
                                pname,
                                ranks[l],
                                nsr,
                                &spectra[l],
                                &Leak::default(),
                                nsr == 0.0,
                                &inputs[l],
                                s,
                            );
                            st.rel_mi = f64::NAN;
                            st.mi_nats = f64::NAN;
                            st.linfoot = f64::NAN;
                            st.psnr_db = best.as_ref().map(|b| b.psnr_db);
                            st.ssim = best.as_ref().map(|b| b.ssim);
                            st.attacks = results;
                            settings.push(st);
                        }
                    }
                }
            }
            pb.inc(1);
        }
    }
    pb.finish_and_clear();

    // ---- the trade-off ----
    let tradeoff = if a.tradeoff {
        tradeoff::run(&a, &spec, &settings_rel_mi(&settings), threads, quiet)?
    } else {
        Vec::new()
    };

    if spec.in_ch == 1 {
        notes.push(
            "one input channel: the first conv's input is a 1 × HW matrix of rank 1, so r = 1 keeps all of it \
             trusted and X_U at the first conv is zero (only the noise when nsr > 0)"
                .into(),
        );
    }
    let layers: Vec<LayerReport> = (0..n_convs)
        .map(|l| {
            let (name, in_ch) = conv_meta[l].clone();
            let sp = &spectra[l];
            let mu = sp.entropy();
            LayerReport {
                layer: l,
                name,
                in_ch,
                h: inputs[l].shape.get(2).copied().unwrap_or(0),
                w: inputs[l].shape.get(3).copied().unwrap_or(0),
                entropy: mu,
                entropy_rank: ((mu.exp2() * (1.0 - 1e-9)).ceil() as usize).max(1),
                entropy_rank_max: sp.entropy_rank_max(),
                spectrum: sp.mean_normalised(64),
                energy_curve: sp.energy_curve(64),
                ranks: layer_ranks[l].clone(),
            }
        })
        .collect();
    let report = Report {
        model: spec.name(),
        data: data.describe.clone(),
        images: data.private.len(),
        attack_private_images: if attack_layers.is_empty() { 0 } else { data.attacked.len() },
        public_images: if attack_layers.is_empty() { 0 } else { data.public.len() },
        mi: MiInfo {
            estimator: "KSG (variant 2, as in the paper's code) with the local non-uniformity correction, max-norm, pixel pairs as 2-D samples",
            k: a.k,
            alpha: a.alpha,
            points_per_image: a.mi_points,
            jitter: a.jitter,
            normalisation: format!(
                "rel_mi = I(X;S) / I(X;X) per image; every variable gets independent Gaussian jitter of {} x its \
                 standard deviation before estimation, and I(X;X) is estimated between two such jittered copies \
                 of X, so it grows as the jitter shrinks; linfoot = sqrt(1 - exp(-2 I(X;S))) needs no \
                 normalisation",
                a.jitter
            ),
        },
        layers,
        kernel_study,
        settings,
        baselines,
        tradeoff,
        notes,
    };
    if let Some(out) = &a.out {
        write_plots(out, &report)?;
        let text = serde_json::to_string_pretty(&report)?;
        weights::write_atomic(&out.join("privacy.json"), text.as_bytes())?;
    }
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_report(&report, a.out.as_deref());
    }
    Ok(())
}

/// Leakage of X_U by (policy, nsr) for the trade-off table: at the first conv, and the largest over the
/// measured convs with its layer.
fn settings_rel_mi(settings: &[Setting]) -> Vec<tradeoff::Leakage> {
    let mut out: Vec<tradeoff::Leakage> = Vec::new();
    for s in settings
        .iter()
        .filter(|s| s.stream == "x_u" && s.rel_mi.is_finite())
    {
        let i = match out
            .iter()
            .position(|l| l.policy == s.rank_policy && l.nsr == s.nsr)
        {
            Some(i) => i,
            None => {
                out.push(tradeoff::Leakage {
                    policy: s.rank_policy.clone(),
                    nsr: s.nsr,
                    ..Default::default()
                });
                out.len() - 1
            }
        };
        let l = &mut out[i];
        if s.layer == 0 {
            l.first = Some((s.rel_mi, s.linfoot));
        }
        if l.max.is_none_or(|(m, _)| s.rel_mi > m) {
            l.max = Some((s.rel_mi, s.layer));
        }
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn setting(
    layer: usize,
    stream: &'static str,
    policy: &str,
    rank: usize,
    nsr: f32,
    spectra: &LayerSpectra,
    lk: &Leak,
    light: bool,
    x: &Tensor,
    s: &Tensor,
) -> Setting {
    Setting {
        layer,
        stream,
        rank_policy: policy.to_string(),
        rank,
        nsr,
        energy_kept: spectra.energy_kept(rank),
        energy_kept_light: light.then(|| energy_light(x, s)),
        entropy: spectra.entropy(),
        rel_mi: lk.rel_mi,
        mi_nats: lk.mi_nats,
        linfoot: lk.linfoot,
        psnr_db: None,
        ssim: None,
        attacks: Vec::new(),
    }
}

/// The image-grid PNG of one attack: per attacked image (up to 6), X, X_T = X − X_U, X_U and each decoder's
/// reconstruction.
fn write_attack_grid(
    path: &Path,
    images: &Tensor,
    x: &Tensor,
    xu: &Tensor,
    recons: &[(String, Tensor)],
    scale: &PixelScale,
) -> Result<()> {
    let n = images.shape[0].min(6);
    let tile = |t: &Tensor, i: usize, pixels: bool| -> Tile {
        let (c, h, w) = (t.shape[1], t.shape[2], t.shape[3]);
        let per = c * h * w;
        let raw = &t.data[i * per..][..per];
        Tile {
            c,
            h,
            w,
            data: if pixels {
                scale.to_unit(raw, c)
            } else {
                raw.to_vec()
            },
            stretch: !pixels,
        }
    };
    let mut grid_rows = Vec::new();
    for i in 0..n {
        let mut xt = x.clone();
        xt.data.iter_mut().zip(&xu.data).for_each(|(a, b)| *a -= b);
        let mut row = vec![
            tile(images, i, true),
            tile(&xt, i, xt.shape == images.shape),
            tile(xu, i, false),
        ];
        for (_, r) in recons {
            row.push(tile(r, i, true));
        }
        grid_rows.push(row);
    }
    grid::write_grid(path, &grid_rows)
}

/// Points (1, v_0), (2, v_1), …
fn from_one(v: &[f64]) -> Vec<(f64, f64)> {
    v.iter()
        .enumerate()
        .map(|(i, v)| ((i + 1) as f64, *v))
        .collect()
}

fn write_plots(out: &Path, r: &Report) -> Result<()> {
    let spectra: Vec<(String, Vec<(f64, f64)>)> = r
        .layers
        .iter()
        .map(|l| {
            (
                format!("conv {} ({} ch)", l.layer, l.in_ch),
                from_one(&l.spectrum),
            )
        })
        .collect();
    plot::line_plot(
        &out.join("spectra.png"),
        "Singular values of each conv input (mean, over the largest)",
        "index",
        "s_i / s_1",
        &spectra,
        true,
    )?;
    let energy: Vec<(String, Vec<(f64, f64)>)> = r
        .layers
        .iter()
        .map(|l| (format!("conv {}", l.layer), from_one(&l.energy_curve)))
        .collect();
    plot::line_plot(
        &out.join("energy.png"),
        "Energy of X kept by rank r (exact SVD)",
        "r",
        "energy kept",
        &energy,
        false,
    )?;
    if !r.kernel_study.is_empty() {
        let k: Vec<(f64, f64)> = r
            .kernel_study
            .iter()
            .map(|k| (k.kernel as f64, k.entropy))
            .collect();
        plot::line_plot(
            &out.join("kernel_entropy.png"),
            "Entropy of the k x k patch channels of the images",
            "kernel size k",
            "entropy (bits)",
            &[("images".to_string(), k)],
            false,
        )?;
    }
    // Leakage: rel_mi of X_U at each layer, one series per (policy, nsr).
    let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for s in r
        .settings
        .iter()
        .filter(|s| s.stream == "x_u" && s.rel_mi.is_finite())
    {
        series
            .entry(format!("{} nsr {}", s.rank_policy, s.nsr))
            .or_default()
            .push((s.layer as f64, s.rel_mi));
    }
    if !series.is_empty() {
        let series: Vec<_> = series.into_iter().collect();
        plot::line_plot(
            &out.join("leakage.png"),
            "Relative MI I(X;X_U)/I(X;X) per conv layer",
            "conv layer",
            "relative MI",
            &series,
            false,
        )?;
    }
    if !r.tradeoff.is_empty() {
        let pts: Vec<(f64, f64)> = r
            .tradeoff
            .iter()
            .filter_map(|t| t.max_rel_mi.map(|m| (m, t.test_acc * 100.0)))
            .collect();
        if !pts.is_empty() {
            plot::line_plot(
                &out.join("tradeoff.png"),
                "Test accuracy against leakage (largest over the convs), one point per nsr",
                "largest relative MI I(X;X_U)/I(X;X)",
                "test accuracy (%)",
                &[("split".to_string(), pts)],
                false,
            )?;
        }
    }
    Ok(())
}

fn fmt_opt(v: Option<f64>, prec: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.prec$}"))
}

fn print_report(r: &Report, out: Option<&Path>) {
    println!("asymml privacy: {} on {}", r.model, r.data);
    println!();
    println!(
        "Low-rank structure (exact spectra of each conv input, mean over {} images):",
        r.images
    );
    let pols: Vec<String> = r
        .layers
        .first()
        .map(|l| l.ranks.keys().cloned().collect())
        .unwrap_or_default();
    println!(
        "  {:<28} {:>5} {:>9} {:>8} {:>8}  ranks ({})",
        "conv",
        "N",
        "HxW",
        "mu",
        "2^mu",
        pols.join(", ")
    );
    for l in &r.layers {
        let ranks: Vec<String> = pols
            .iter()
            .map(|p| l.ranks.get(p).map_or("-".into(), |r| r.to_string()))
            .collect();
        println!(
            "  {:<28} {:>5} {:>9} {:>8.3} {:>8}  {}",
            format!("{} {}", l.layer, l.name),
            l.in_ch,
            format!("{}x{}", l.h, l.w),
            l.entropy,
            l.entropy_rank,
            ranks.join(", ")
        );
    }
    if !r.kernel_study.is_empty() {
        let ks: Vec<String> = r
            .kernel_study
            .iter()
            .map(|k| format!("k={}: {:.3}", k.kernel, k.entropy))
            .collect();
        println!(
            "  patch-channel entropy of the images (bits): {}",
            ks.join("  ")
        );
    }
    println!();
    println!(
        "Leakage ({}; k = {}, alpha = {}):",
        r.mi.estimator, r.mi.k, r.mi.alpha
    );
    println!(
        "  {:<6} {:<5} {:<10} {:>4} {:>6} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "stream", "conv", "rank", "r", "nsr", "energy", "rel_mi", "linfoot", "psnr_dB", "ssim"
    );
    for s in &r.settings {
        println!(
            "  {:<6} {:<5} {:<10} {:>4} {:>6} {:>8.4} {:>8.4} {:>8.4} {:>8} {:>8}",
            s.stream,
            s.layer,
            s.rank_policy,
            s.rank,
            s.nsr,
            s.energy_kept,
            s.rel_mi,
            s.linfoot,
            fmt_opt(s.psnr_db, 2),
            fmt_opt(s.ssim, 4)
        );
    }
    for b in &r.baselines {
        for at in &b.attacks {
            println!(
                "  reference: {} decoder on {} of conv {}: PSNR {:.2} dB, SSIM {:.4}",
                at.decoder, b.input, b.layer, at.psnr_db, at.ssim
            );
        }
    }
    println!("  {}", r.mi.normalisation);
    if !r.tradeoff.is_empty() {
        println!();
        println!("Trade-off (split training):");
        for t in &r.tradeoff {
            println!(
                "  nsr {:<5} rank {:<9} test accuracy {:.2}%  rel_mi at conv 0 {}, largest {} (conv {})",
                t.nsr,
                t.rank_policy,
                t.test_acc * 100.0,
                fmt_opt(t.rel_mi, 4),
                fmt_opt(t.max_rel_mi, 4),
                t.max_rel_mi_layer.map_or("-".into(), |l| l.to_string())
            );
        }
    }
    for n in &r.notes {
        println!("note: {n}");
    }
    if let Some(o) = out {
        println!("plots and privacy.json in {}", o.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_lists() {
        assert_eq!(layer_list("all", 3, "--layers").unwrap(), vec![0, 1, 2]);
        assert!(layer_list("none", 3, "--layers").unwrap().is_empty());
        assert_eq!(layer_list("2,0,2", 3, "--layers").unwrap(), vec![2, 0]);
        assert!(layer_list("3", 3, "--layers").is_err());
        assert!(layer_list("x", 3, "--layers").is_err());
    }

    #[test]
    fn labels_from_file_names() {
        assert_eq!(label_of(Path::new("a/cifar10_03_7.png"), 10), 7);
        assert_eq!(label_of(Path::new("a/cat.png"), 10), 0);
        assert_eq!(label_of(Path::new("a/x_12.png"), 10), 0);
    }
}
