//! `asymml privacy`'s report: privacy.json's object, the text on stdout, and the PNG plots.

use super::lowrank::KernelEntropy;
use super::measure::{Baseline, Measured, Setting};
use super::plan::Plan;
use super::tradeoff::TradeoffEntry;
use crate::plot;
use anyhow::Result;
use asymml_core::weights;
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

#[derive(Debug, Serialize)]
struct MiInfo {
    estimator: &'static str,
    k: usize,
    alpha: f64,
    points_per_image: usize,
    jitter: f64,
    normalisation: String,
}

/// Everything `asymml privacy` reports (privacy.json, `--json`).
#[derive(Debug, Serialize)]
pub(crate) struct Report {
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
    tradeoff: Vec<TradeoffEntry>,
    notes: Vec<String>,
    /// With --clip: the formal (ε, δ) accounting per rank policy and nsr (`accounting.rs`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) formal_accounting: Vec<super::accounting::PolicyAccounting>,
    /// With --frontier: per rank policy and nsr, the trusted runtime's speedup beside the worst leakage
    /// (`frontier.rs`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) frontier: Vec<super::frontier::FrontierEntry>,
}

impl Report {
    /// The report of the measurements `m` and the trade-off runs of `plan`.
    pub(crate) fn new(plan: &Plan, m: Measured, tradeoff: Vec<TradeoffEntry>) -> Report {
        let (data, attacked) = (&plan.data, !plan.attack_layers.is_empty());
        let mut notes = Vec::new();
        if plan.model.spec.in_ch == 1 {
            notes.push(
                "one input channel: the first conv's input is a 1 × HW matrix of rank 1, so r = 1 keeps all of it \
                 trusted and X_U at the first conv is zero (only the noise when nsr > 0)"
                    .into(),
            );
        }
        Report {
            model: plan.model.spec.name(),
            data: data.describe.clone(),
            images: data.private.len(),
            attack_private_images: if attacked { data.attacked.len() } else { 0 },
            public_images: if attacked { data.public.len() } else { 0 },
            mi: mi_info(plan),
            layers: layer_reports(plan, &m),
            kernel_study: m.kernel_study,
            settings: m.settings,
            baselines: m.baselines,
            tradeoff,
            notes,
            formal_accounting: Vec::new(),
            frontier: Vec::new(),
        }
    }

    /// With `--out`: the plots and privacy.json; on stdout, the JSON object (`--json`) or the text report.
    pub(crate) fn emit(&self, out: Option<&Path>, json: bool) -> Result<()> {
        if let Some(out) = out {
            write_plots(out, self)?;
            let text = serde_json::to_string_pretty(self)?;
            weights::write_atomic(&out.join("privacy.json"), text.as_bytes())?;
        }
        if json {
            println!("{}", serde_json::to_string(self)?);
        } else {
            print_report(self, out);
        }
        Ok(())
    }
}

fn mi_info(plan: &Plan) -> MiInfo {
    let a = &plan.args;
    MiInfo {
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
    }
}

fn layer_reports(plan: &Plan, m: &Measured) -> Vec<LayerReport> {
    plan.model
        .convs
        .iter()
        .enumerate()
        .map(|(l, (name, in_ch))| {
            let sp = &m.spectra[l];
            let mu = sp.entropy();
            let (h, w) = m.input_sizes[l];
            LayerReport {
                layer: l,
                name: name.clone(),
                in_ch: *in_ch,
                h,
                w,
                entropy: mu,
                entropy_rank: ((mu.exp2() * (1.0 - 1e-9)).ceil() as usize).max(1),
                entropy_rank_max: sp.entropy_rank_max(),
                spectrum: sp.mean_normalised(64),
                energy_curve: sp.energy_curve(64),
                ranks: m.layer_ranks[l].clone(),
            }
        })
        .collect()
}

/// Points (1, v_0), (2, v_1), …
fn from_one(v: &[f64]) -> Vec<(f64, f64)> {
    v.iter()
        .enumerate()
        .map(|(i, v)| ((i + 1) as f64, *v))
        .collect()
}

/// spectra.png, energy.png, kernel_entropy.png, leakage.png, tradeoff.png and frontier.png (the last four when
/// there is something to plot).
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
    write_leakage_plot(out, &r.settings)?;
    if !r.frontier.is_empty() {
        super::frontier::plot(&out.join("frontier.png"), &r.frontier, &r.model)?;
    }
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
    Ok(())
}

/// leakage.png: rel_mi of X_U at each layer, one series per (policy, nsr).
fn write_leakage_plot(out: &Path, settings: &[Setting]) -> Result<()> {
    let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for s in settings
        .iter()
        .filter(|s| s.stream == "x_u" && s.rel_mi.is_finite())
    {
        series
            .entry(format!("{} nsr {}", s.rank_policy, s.nsr))
            .or_default()
            .push((s.layer as f64, s.rel_mi));
    }
    if series.is_empty() {
        return Ok(());
    }
    let series: Vec<_> = series.into_iter().collect();
    plot::line_plot(
        &out.join("leakage.png"),
        "Relative MI I(X;X_U)/I(X;X) per conv layer",
        "conv layer",
        "relative MI",
        &series,
        false,
    )?;
    Ok(())
}

fn fmt_opt(v: Option<f64>, prec: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.prec$}"))
}

fn print_report(r: &Report, out: Option<&Path>) {
    println!("asymml privacy: {} on {}", r.model, r.data);
    println!();
    print_layers(r);
    println!();
    print_leakage(r);
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
    if !r.frontier.is_empty() {
        println!();
        super::frontier::print(&r.frontier);
    }
    super::accounting::print_privacy(&r.formal_accounting);
    for n in &r.notes {
        println!("note: {n}");
    }
    if let Some(o) = out {
        println!("plots and privacy.json in {}", o.display());
    }
}

/// The low-rank structure table and the kernel-size study.
fn print_layers(r: &Report) {
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
}

/// The leakage table, the attacks' reference points and the normalisation.
fn print_leakage(r: &Report) {
    println!(
        "Leakage ({}; k = {}, alpha = {}):",
        r.mi.estimator, r.mi.k, r.mi.alpha
    );
    println!(
        "  {:<6} {:<5} {:<10} {:>4} {:>6} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "stream",
        "conv",
        "rank",
        "r",
        "nsr",
        "energy",
        "rel_mi",
        "linfoot",
        "edge_ssim",
        "edge_xs",
        "psnr_dB",
        "ssim",
        "ssim_gain"
    );
    for s in &r.settings {
        println!(
            "  {:<6} {:<5} {:<10} {:>4} {:>6} {:>8.4} {:>8.4} {:>8.4} {:>9} {:>8} {:>8} {:>8} {:>8}",
            s.stream,
            s.layer,
            s.rank_policy,
            s.rank,
            s.nsr,
            s.energy_kept,
            s.rel_mi,
            s.linfoot,
            fmt_opt(s.edge_ssim, 4),
            fmt_opt(s.edge_excess, 4),
            fmt_opt(s.psnr_db, 2),
            fmt_opt(s.ssim, 4),
            fmt_opt(s.ssim_gain, 4)
        );
    }
    println!(
        "  edge_ssim: X_U's best edge map against the image's; edge_xs: edge_ssim minus its chance level (the \
         same against another image's map); ssim_gain: the best attack's SSIM over the mean image's, \
         (s - s0)/(1 - s0). Recognisable: edge_xs >= {} or ssim_gain >= {} (see docs/security.md).",
        super::structure::EDGE_SSIM_RECOGNISABLE,
        super::structure::SSIM_GAIN_RECOGNISABLE
    );
    for b in &r.baselines {
        for at in &b.attacks {
            println!(
                "  reference: {} decoder on {} of conv {}: PSNR {:.2} dB, SSIM {:.4}",
                at.decoder, b.input, b.layer, at.psnr_db, at.ssim
            );
        }
    }
    println!("  {}", r.mi.normalisation);
}
