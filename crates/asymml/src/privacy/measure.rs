//! `asymml privacy`'s measurements: each conv's input for the private images (spectra, I(X;X)), the attacks'
//! reference points, then per (rank policy, nsr) what the split runtime sends, its leakage and the attacks on
//! it.

use super::args::Decoder;
use super::attack::{self, ConvDecoder, DecoderBudget, Ridge};
use super::capture::{self, rows, StreamRequest};
use super::grid;
use super::leakage::{self, Leak};
use super::lowrank::{self, KernelEntropy, LayerSpectra};
use super::plan::Plan;
use super::structure;
use crate::data::Dataset;
use crate::progress;
use crate::values::RankArg;
use anyhow::Result;
use asymml_core::rng::Rng;
use asymml_core::Tensor;
use indicatif::ProgressBar;
use serde::Serialize;
use std::collections::BTreeMap;

/// One attack's result.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct AttackResult {
    pub decoder: String,
    pub psnr_db: f64,
    pub ssim: f64,
}

/// One (stream, layer, policy, noise) setting.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Setting {
    pub layer: usize,
    /// `x_u` (the residual of the conv's input) or `dy` (the first conv's output gradient, in training).
    pub stream: &'static str,
    pub rank_policy: String,
    pub rank: usize,
    pub nsr: f32,
    /// Mean optimal energy fraction of X kept trusted by this rank (exact spectra).
    pub energy_kept: f64,
    /// What the split's decomposition (`--svd`; the field keeps its first name) kept: 1 − ‖X_U‖²/‖X‖² (without
    /// noise; absent when nsr > 0).
    pub energy_kept_light: Option<f64>,
    /// Mean SVD-channel entropy μ of the layer's input (bits).
    pub entropy: f64,
    pub rel_mi: f64,
    pub mi_nats: f64,
    pub linfoot: f64,
    /// The best attack on this stream (largest PSNR), when attacked.
    pub psnr_db: Option<f64>,
    pub ssim: Option<f64>,
    /// The best attack's SSIM gain over the mean image, (s − s₀)/(1 − s₀) with s the largest SSIM of the
    /// decoders and s₀ the mean image's: 0 = no better than the mean image, 1 = a perfect reconstruction.
    pub ssim_gain: Option<f64>,
    /// Edge SSIM of X_U (see `structure.rs`): mean over the images of the best candidate edge map's SSIM
    /// against the image's edge map at X_U's resolution.
    pub edge_ssim: Option<f64>,
    /// The largest edge SSIM over the images.
    pub edge_ssim_max: Option<f64>,
    /// The same best-candidate score against another image's edge map (chance level).
    pub edge_ssim_chance: Option<f64>,
    /// edge_ssim − edge_ssim_chance: the structural measure (recognisable from 0.1).
    pub edge_excess: Option<f64>,
    pub attacks: Vec<AttackResult>,
}

/// Reference points of the attacks: decoders trained on X itself, and the mean image.
#[derive(Debug, Serialize)]
pub(crate) struct Baseline {
    pub layer: usize,
    /// `x` (the layer's whole input, as an accelerator would see it without the split) or `mean_image`.
    pub input: &'static str,
    pub attacks: Vec<AttackResult>,
}

/// Everything measured.
pub(crate) struct Measured {
    /// The exact spectra of each conv's input.
    pub spectra: Vec<LayerSpectra>,
    /// (h, w) of each conv's input.
    pub input_sizes: Vec<(usize, usize)>,
    /// The r each rank policy picked at each conv (largest over the batches).
    pub layer_ranks: Vec<BTreeMap<String, usize>>,
    pub kernel_study: Vec<KernelEntropy>,
    pub settings: Vec<Setting>,
    pub baselines: Vec<Baseline>,
}

/// Measures everything the plan asks for, with a progress bar (hidden with `--json`).
pub(crate) fn measure(plan: &Plan) -> Result<Measured> {
    let a = &plan.args;
    let pb = progress::bar((a.ranks.len() * a.nsr.len()) as u64 + 3, "privacy", a.json);
    let private = Private::measure(plan, &pb)?;
    let attacker = Attacker::new(plan, &private.x)?;
    pb.inc(1);
    let baselines = attacker.baselines(&private, &pb)?;
    pb.inc(1);
    let mean_ssim = baselines
        .iter()
        .find(|b| b.input == "mean_image")
        .and_then(|b| b.attacks.first())
        .map(|a| a.ssim);
    let m = Measurer {
        plan,
        private,
        attacker,
        pb,
        mean_ssim,
    };
    let mut settings = Vec::new();
    let mut layer_ranks = vec![BTreeMap::new(); plan.model.convs.len()];
    for policy in &a.ranks {
        for &nsr in &a.nsr {
            let ranks = m.setting(policy, nsr, &mut settings)?;
            for (l, r) in ranks.iter().enumerate() {
                layer_ranks[l].insert(policy.text.clone(), *r);
            }
            m.pb.inc(1);
        }
    }
    m.pb.finish_and_clear();
    Ok(Measured {
        input_sizes: m.private.input_sizes,
        spectra: m.private.spectra,
        layer_ranks,
        kernel_study: m.private.kernel_study,
        settings,
        baselines,
    })
}

/// (h, w) of a [n, c, h, w] tensor ((0, 0) for another shape).
fn spatial(t: &Tensor) -> (usize, usize) {
    (
        t.shape.get(2).copied().unwrap_or(0),
        t.shape.get(3).copied().unwrap_or(0),
    )
}

/// A dataset's images (by index) as one normalised tensor [n, c, h, w] and their labels.
pub(super) fn tensor_of(data: &Dataset, idx: &[usize]) -> (Tensor, Vec<usize>) {
    let mut x = Tensor::zeros(&[idx.len(), data.c, data.h, data.w]);
    let mut labels = Vec::new();
    data.fill_batch(idx, None, &mut Rng::new(0), &mut x.data, &mut labels);
    (x, labels)
}

/// The private images through the trusted runtime.
struct Private {
    /// The images [n, c, h, w] and their labels.
    x: Tensor,
    labels: Vec<usize>,
    /// Each measured conv's input (empty for the others).
    inputs: Vec<Tensor>,
    /// (h, w) of each conv's input.
    input_sizes: Vec<(usize, usize)>,
    spectra: Vec<LayerSpectra>,
    kernel_study: Vec<KernelEntropy>,
    /// I(X;X) per image of each measured conv's input.
    self_mi: BTreeMap<usize, Vec<f64>>,
    /// I(X;X) per image of the images' channel mean (the pair of the ∇Y stream).
    gray_self_mi: Vec<f64>,
}

impl Private {
    fn measure(plan: &Plan, pb: &ProgressBar) -> Result<Private> {
        let data = &plan.data.private;
        let (x, labels) = tensor_of(data, &(0..data.len()).collect::<Vec<_>>());
        pb.set_message("conv inputs and spectra");
        // Every conv's spectra and shape batch by batch; only the measured convs' inputs are kept.
        let mut keep = plan.mi_layers.clone();
        keep.extend(plan.attack_layers.iter().copied());
        let mut spectra: Vec<LayerSpectra> = Vec::new();
        let mut input_sizes = Vec::new();
        let inputs = capture::conv_inputs_kept(
            &plan.model,
            &x,
            plan.args.batch_size,
            Some(&keep),
            |batch| {
                spectra.resize_with(batch.len(), || LayerSpectra {
                    spectra: Vec::new(),
                });
                input_sizes = batch.iter().map(spatial).collect();
                for (s, t) in spectra.iter_mut().zip(batch) {
                    s.spectra.extend(LayerSpectra::of(t).spectra);
                }
                Ok(())
            },
        )?;
        let kernel_study = plan
            .args
            .kernel_sizes
            .iter()
            .map(|&k| lowrank::kernel_entropy(&x, k))
            .collect();
        pb.inc(1);
        pb.set_message("I(X;X) per layer");
        let mut self_mi = BTreeMap::new();
        for &l in &plan.mi_layers {
            self_mi.insert(l, leakage::self_information(&inputs[l], &plan.mi)?);
        }
        let gray = leakage::channel_mean_repeated(&x, 1)?;
        let gray_self_mi = leakage::self_information(&gray, &plan.mi)?;
        Ok(Private {
            x,
            labels,
            inputs,
            input_sizes,
            spectra,
            kernel_study,
            self_mi,
            gray_self_mi,
        })
    }
}

/// The attacker: its public images (and their conv inputs, when it attacks), and the attacked private images
/// its reconstructions are scored against.
pub(super) struct Attacker<'p> {
    plan: &'p Plan,
    pub(super) public_x: Tensor,
    pub(super) public_labels: Vec<usize>,
    public_inputs: Vec<Tensor>,
    truth: Tensor,
}

impl<'p> Attacker<'p> {
    /// `private_x`: all the private images.
    pub(super) fn new(plan: &'p Plan, private_x: &Tensor) -> Result<Attacker<'p>> {
        let public = &plan.data.public;
        let (public_x, _) = tensor_of(public, &(0..public.len()).collect::<Vec<_>>());
        let public_inputs = if plan.attack_layers.is_empty() {
            Vec::new()
        } else {
            capture::conv_inputs_kept(
                &plan.model,
                &public_x,
                plan.args.batch_size,
                Some(&plan.attack_layers),
                |_| Ok(()),
            )?
        };
        Ok(Attacker {
            plan,
            public_labels: public.labels.iter().map(|&l| l as usize).collect(),
            public_x,
            public_inputs,
            truth: rows(private_x, &plan.data.attacked),
        })
    }

    /// Each decoder trained on the public streams, and its reconstruction of the private ones.
    pub(super) fn decode(
        &self,
        public_s: &Tensor,
        private_s: &Tensor,
        seed: u64,
    ) -> Result<Vec<(String, Tensor)>> {
        let (plan, target) = (self.plan, &self.public_x);
        let mut out = Vec::new();
        for &d in &plan.decoders {
            let recon = match d {
                Decoder::Ridge => Ridge::fit(public_s, target, plan.threads)?
                    .predict(private_s, plan.data.private.c)?,
                _ => {
                    let (h, w) = spatial(public_s);
                    let budget = DecoderBudget::for_stream(h, w, plan.args.decoder_steps);
                    ConvDecoder::fit(public_s, target, budget, seed)?
                }
                .predict(private_s)?,
            };
            out.push((d.name().to_string(), recon));
        }
        Ok(out)
    }

    /// PSNR and SSIM of each reconstruction.
    pub(super) fn score(&self, recons: &[(String, Tensor)]) -> Result<Vec<AttackResult>> {
        recons
            .iter()
            .map(|(d, r)| {
                let (p, s) = attack::quality(r, &self.truth, &self.plan.scale)?;
                Ok(AttackResult {
                    decoder: d.clone(),
                    psnr_db: p,
                    ssim: s,
                })
            })
            .collect()
    }

    /// The attacks on each attacked conv's whole input X, and the mean public image as the reconstruction of
    /// every private one (none without attacked layers).
    fn baselines(&self, private: &Private, pb: &ProgressBar) -> Result<Vec<Baseline>> {
        let (plan, mut out) = (self.plan, Vec::new());
        for &l in &plan.attack_layers {
            pb.set_message(format!("attacks on X of conv {l} (reference)"));
            let private_x = rows(&private.inputs[l], &plan.data.attacked);
            let recons = self.decode(&self.public_inputs[l], &private_x, plan.args.seed)?;
            out.push(Baseline {
                layer: l,
                input: "x",
                attacks: self.score(&recons)?,
            });
        }
        if !plan.attack_layers.is_empty() {
            out.push(self.mean_image()?);
        }
        Ok(out)
    }

    pub(super) fn mean_image(&self) -> Result<Baseline> {
        let n = self.public_x.shape[0];
        let per = self.public_x.len() / n.max(1);
        let mut mean = vec![0f32; per];
        for img in self.public_x.data.chunks(per) {
            mean.iter_mut()
                .zip(img)
                .for_each(|(m, v)| *m += v / n as f32);
        }
        let mut recon = self.truth.clone();
        recon
            .data
            .chunks_mut(per)
            .for_each(|c| c.copy_from_slice(&mean));
        let (p, s) = attack::quality(&recon, &self.truth, &self.plan.scale)?;
        Ok(Baseline {
            layer: 0,
            input: "mean_image",
            attacks: vec![AttackResult {
                decoder: "mean".into(),
                psnr_db: p,
                ssim: s,
            }],
        })
    }
}

/// The (rank policy, nsr) setting being measured, and the rank it gave each conv.
struct At<'a> {
    policy: &'a str,
    nsr: f32,
    ranks: &'a [usize],
}

impl Setting {
    /// The setting of `stream` at conv `layer`, its leakage `lk` (no attack yet, no light energy).
    fn new(
        at: &At,
        layer: usize,
        stream: &'static str,
        spectra: &LayerSpectra,
        lk: &Leak,
    ) -> Setting {
        let rank = at.ranks[layer];
        Setting {
            layer,
            stream,
            rank_policy: at.policy.to_string(),
            rank,
            nsr: at.nsr,
            energy_kept: spectra.energy_kept(rank),
            energy_kept_light: None,
            entropy: spectra.entropy(),
            rel_mi: lk.rel_mi,
            mi_nats: lk.mi_nats,
            linfoot: lk.linfoot,
            psnr_db: None,
            ssim: None,
            ssim_gain: None,
            edge_ssim: None,
            edge_ssim_max: None,
            edge_ssim_chance: None,
            edge_excess: None,
            attacks: Vec::new(),
        }
    }

    /// Records the attacks on this setting's stream; the best one (largest PSNR) as its PSNR and SSIM, and
    /// the largest SSIM's gain over the mean image's SSIM `mean_ssim`.
    fn attacked(&mut self, results: Vec<AttackResult>, mean_ssim: Option<f64>) {
        let best = results
            .iter()
            .max_by(|x, y| x.psnr_db.total_cmp(&y.psnr_db));
        self.psnr_db = best.map(|b| b.psnr_db);
        self.ssim = best.map(|b| b.ssim);
        let top = results.iter().map(|r| r.ssim).fold(f64::NAN, f64::max);
        self.ssim_gain = match mean_ssim {
            Some(m) if top.is_finite() => Some(structure::ssim_gain(top, m)),
            _ => None,
        };
        self.attacks = results;
    }

    /// Records the edge SSIM of this setting's stream.
    fn edges(&mut self, e: structure::EdgeScore) {
        self.edge_ssim = Some(e.mean);
        self.edge_ssim_max = Some(e.max);
        self.edge_ssim_chance = e.chance.is_finite().then_some(e.chance);
        self.edge_excess = Some(e.excess());
    }
}

/// The measurement of the (rank policy, nsr) settings, after the private images' own measurements.
struct Measurer<'p> {
    plan: &'p Plan,
    private: Private,
    attacker: Attacker<'p>,
    pb: ProgressBar,
    /// The mean image's SSIM (the attacks' floor), when attacked.
    mean_ssim: Option<f64>,
}

impl Measurer<'_> {
    /// Measures one (policy, nsr) setting into `settings`: X_U of each measured conv, ∇Y of the first conv,
    /// and the attacks. Returns the rank of every conv.
    fn setting(
        &self,
        policy: &RankArg,
        nsr: f32,
        settings: &mut Vec<Setting>,
    ) -> Result<Vec<usize>> {
        let (plan, private) = (self.plan, &self.private);
        self.pb
            .set_message(format!("{}, nsr {nsr}: streams", policy.text));
        let mut layers = plan.mi_layers.clone();
        layers.extend(plan.attack_layers.iter().copied());
        let request = StreamRequest {
            split: plan.split(policy, nsr, plan.args.seed),
            batch: plan.args.batch_size,
            layers: &layers,
            backward: plan.grad_stream,
        };
        let sent = capture::streams_full(&plan.model, &private.x, &private.labels, &request)?;
        let at = At {
            policy: &policy.text,
            nsr,
            ranks: &sent.ranks,
        };
        for &l in &plan.mi_layers {
            let Some(s) = sent.x_u.get(&l).filter(|t| !t.is_empty()) else {
                continue;
            };
            let msg = format!("{}, nsr {nsr}: MI of X_U at conv {l}", policy.text);
            self.pb.set_message(msg);
            let lk = leakage::leak(&private.inputs[l], s, &private.self_mi[&l], &plan.mi)?;
            settings.push(self.x_u_setting(&at, l, s, &lk)?);
            if let Some(out) = &plan.args.out {
                let name = policy.text.replace([':', '.', '/'], "_");
                let path = out.join(format!("edges_conv{l}_{name}_nsr{nsr}.png"));
                grid::write_edge_grid(&path, &private.x, s, &plan.scale)?;
            }
        }
        if let Some(st) = self.dy_setting(&at, &sent.dy0)? {
            settings.push(st);
        }
        if !plan.attack_layers.is_empty() {
            self.attacks(&at, policy, &sent.x_u, settings)?;
        }
        Ok(sent.ranks)
    }

    /// The setting of X_U at conv `l`, with its edge SSIM and what the lightweight SVD kept when there is no
    /// noise.
    fn x_u_setting(&self, at: &At, l: usize, x_u: &Tensor, lk: &Leak) -> Result<Setting> {
        let mut st = Setting::new(at, l, "x_u", &self.private.spectra[l], lk);
        if at.nsr == 0.0 {
            st.energy_kept_light = Some(lowrank::energy_kept_light(&self.private.inputs[l], x_u));
        }
        st.edges(structure::edge_ssim(&self.private.x, x_u)?);
        Ok(st)
    }

    /// The setting of ∇Y of the first conv, paired with the channel mean of the image (none when the first
    /// conv's output is not the image's size).
    fn dy_setting(&self, at: &At, dy0: &Tensor) -> Result<Option<Setting>> {
        let x = &self.private.x;
        if dy0.is_empty() || dy0.shape[2..] != x.shape[2..] {
            return Ok(None);
        }
        let g = leakage::channel_mean_repeated(x, dy0.shape[1])?;
        let lk = leakage::leak(&g, dy0, &self.private.gray_self_mi, &self.plan.mi)?;
        Ok(Some(Setting::new(
            at,
            0,
            "dy",
            &self.private.spectra[0],
            &lk,
        )))
    }

    /// The attacks on X_U of each attacked conv: the attacker simulates the split on its public images and
    /// learns its decoders there. The results join the setting of that X_U (a new one, without MI, when its
    /// MI was not measured).
    fn attacks(
        &self,
        at: &At,
        policy: &RankArg,
        x_u: &BTreeMap<usize, Tensor>,
        settings: &mut Vec<Setting>,
    ) -> Result<()> {
        let plan = self.plan;
        self.pb
            .set_message(format!("{}, nsr {}: attacks", at.policy, at.nsr));
        let request = StreamRequest {
            split: plan.split(policy, at.nsr, plan.args.seed ^ 0xA77AC),
            batch: plan.args.batch_size,
            layers: &plan.attack_layers,
            backward: false,
        };
        let attacker = &self.attacker;
        let public = capture::streams(
            &plan.model,
            &attacker.public_x,
            &attacker.public_labels,
            &request,
        )?;
        for &l in &plan.attack_layers {
            let (Some(ps), Some(s)) = (public.x_u.get(&l), x_u.get(&l)) else {
                continue;
            };
            if ps.is_empty() || s.is_empty() {
                continue;
            }
            if ps.data.iter().chain(&s.data).all(|&v| v == 0.0) {
                // Nothing was sent (the conv ran wholly in the trusted runtime): there is nothing to attack,
                // and a decoder fed zeros would only learn a constant guess — no gain by definition.
                if let Some(st) = settings.iter_mut().find(|st| {
                    st.layer == l
                        && st.stream == "x_u"
                        && st.rank_policy == at.policy
                        && st.nsr == at.nsr
                }) {
                    st.ssim_gain = Some(0.0);
                }
                continue;
            }
            let results = self.attack(at, l, ps, s)?;
            let found = settings.iter_mut().find(|st| {
                st.layer == l
                    && st.stream == "x_u"
                    && st.rank_policy == at.policy
                    && st.nsr == at.nsr
            });
            match found {
                Some(st) => st.attacked(results, self.mean_ssim),
                None => {
                    let mut st = self.x_u_setting(at, l, s, &Leak::default())?;
                    st.rel_mi = f64::NAN;
                    st.mi_nats = f64::NAN;
                    st.linfoot = f64::NAN;
                    st.attacked(results, self.mean_ssim);
                    settings.push(st);
                }
            }
        }
        Ok(())
    }

    /// The decoders learnt on the public X_U of conv `l` (`public_s`), scored on the attacked private images'
    /// (from `x_u`, every private image's); with `--out`, their image grid.
    fn attack(
        &self,
        at: &At,
        l: usize,
        public_s: &Tensor,
        x_u: &Tensor,
    ) -> Result<Vec<AttackResult>> {
        let (plan, attacker) = (self.plan, &self.attacker);
        let private_s = rows(x_u, &plan.data.attacked);
        let recons = attacker.decode(public_s, &private_s, plan.args.seed ^ l as u64)?;
        let results = attacker.score(&recons)?;
        if let Some(out) = &plan.args.out {
            let policy = at.policy.replace([':', '.', '/'], "_");
            let path = out.join(format!("attack_conv{l}_{policy}_nsr{}.png", at.nsr));
            let x = rows(&self.private.inputs[l], &plan.data.attacked);
            grid::write_attack_grid(&path, &attacker.truth, &x, &private_s, &recons, &plan.scale)?;
        }
        Ok(results)
    }
}
