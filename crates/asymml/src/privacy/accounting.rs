//! The formal (ε, δ) accounting of clipped, noised residuals (`--clip`, `--noise`/`--nsr`, `--delta`), for
//! `asymml privacy` (one forward pass) and `asymml train` (the whole run). The mechanism and the accountant
//! are `asymml_core::dp`; this module finds which convs release a residual and of what size, composes, and
//! words the result.
//!
//! What is accounted: local DP of one example's residuals. Each release is one conv's X_U of that example
//! (d = N·H·W values) clipped to ℓ₂ norm C, plus N(0, σ²) per value with σ = nsr·C/√d. Neighbouring inputs
//! are any two examples (replace-one, the local model), so the ℓ₂ sensitivity is 2C and the noise multiplier
//! z = σ/(2C) = nsr/(2√d). Releases compose over the convs whose X_U leaves and over every forward pass that
//! processes the example (RDP adds; q = 1: each example's residual is released every time it is processed).

use anyhow::{bail, Result};
use asymml_core::decomp::{RankTable, TableRank};
use asymml_core::dp::{gaussian_epsilon, local_noise_multiplier, Conversion, RdpAccountant};
use asymml_core::layers::Conv2d;
use asymml_core::models::{ConvExec, Net};
use asymml_core::Tensor;
use serde::Serialize;

/// The default δ (`--delta`).
pub(crate) const DEFAULT_DELTA: f64 = 1e-5;

/// `--delta`: in (0, 1).
pub(crate) fn parse_delta(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(d) if d > 0.0 && d < 1.0 => Ok(d),
        _ => Err("must be a number between 0 and 1 (both excluded), e.g. 1e-5".into()),
    }
}

/// `--clip`: finite and above 0.
pub(crate) fn parse_clip(s: &str) -> Result<f32, String> {
    match s.trim().parse::<f32>() {
        Ok(c) if c.is_finite() && c > 0.0 => Ok(c),
        _ => Err(
            "must be a finite number above 0 (the ℓ₂ norm each sample's X_U is clipped to)".into(),
        ),
    }
}

/// One conv of the network, as the split runtime treats its input.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct ConvRelease {
    pub layer: usize,
    pub name: String,
    /// Values of one sample's residual: N·H·W of the conv's input.
    pub d: usize,
    /// True when this conv sends a residual of its own (a new release).
    pub released: bool,
    /// Why it does not, when it does not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why_not: Option<String>,
}

/// Records each conv's input shape and whether it reads the input of the conv before it, without computing
/// anything (the outputs are zeros of the right shape).
#[derive(Default)]
struct Probe {
    /// (conv id, input shape, same input as).
    seen: Vec<(usize, Vec<usize>, Option<usize>)>,
}

impl Probe {
    fn record(
        &mut self,
        conv: &mut Conv2d,
        x: &Tensor,
        y: &mut Tensor,
        same: Option<usize>,
    ) -> asymml_core::Result<()> {
        let out = conv.out_shape(&x.shape)?;
        y.resize_zero(&out);
        self.seen.push((conv.id, x.shape.clone(), same));
        Ok(())
    }
}

impl ConvExec for Probe {
    fn conv_forward(
        &mut self,
        conv: &mut Conv2d,
        x: &Tensor,
        y: &mut Tensor,
        _train: bool,
    ) -> asymml_core::Result<()> {
        self.record(conv, x, y, None)
    }

    fn conv_forward_same_input(
        &mut self,
        conv: &mut Conv2d,
        x: &Tensor,
        y: &mut Tensor,
        _train: bool,
        same_input_as: usize,
    ) -> asymml_core::Result<()> {
        self.record(conv, x, y, Some(same_input_as))
    }

    fn conv_backward(
        &mut self,
        _conv: &mut Conv2d,
        _x: &Tensor,
        _dy: &Tensor,
        _dx: Option<&mut Tensor>,
    ) -> asymml_core::Result<()> {
        Ok(())
    }
}

/// The convs of `net` in id order: the size of each one's residual and whether it is a release of its own.
/// A conv routed `"trusted"` by `table`, or by `guard` (an input map at least `guard` × the input's side),
/// releases nothing; a conv that reuses the residual already sent for
/// another conv on the same input (a ResNet shortcut) releases nothing new. Runs one evaluation-mode
/// forward pass of a zero image through the layers (no convolution is computed; BatchNorm statistics are
/// not updated).
pub(crate) fn release_layout(
    net: &mut Net,
    table: Option<&RankTable>,
    guard: Option<f32>,
) -> Result<Vec<ConvRelease>> {
    let mut names = Vec::new();
    net.visit_convs(&mut |name, c| names.push((c.id, name.to_string())));
    names.sort_by_key(|e| e.0);
    let s = &net.spec;
    let x = Tensor::zeros(&[1, s.in_ch, s.input_size, s.input_size]);
    let input_side = s.input_size;
    let mut probe = Probe::default();
    net.forward(&x, false, &mut probe)?;
    let mut out: Vec<ConvRelease> = Vec::new();
    for (id, name) in &names {
        let Some((_, shape, same)) = probe.seen.iter().find(|(i, _, _)| i == id) else {
            bail!("conv {name} was not reached by a forward pass");
        };
        let d = shape.iter().skip(1).product::<usize>();
        let trusted = matches!(table.and_then(|t| t.get(name)), Some(TableRank::Route(_)));
        let side = shape.iter().skip(2).copied().max().unwrap_or(0);
        let guarded = guard.is_some_and(|f| side as f64 >= f as f64 * input_side as f64);
        let source = same.and_then(|f| out.iter().find(|c| c.layer == f));
        let (released, why_not) = if guarded {
            (
                false,
                Some("run wholly in the trusted runtime (guard: an image-like map)".to_string()),
            )
        } else if trusted {
            (
                false,
                Some("run wholly in the trusted runtime (rank table)".to_string()),
            )
        } else if let Some(src) = source.filter(|c| c.released) {
            (
                false,
                Some(format!("reuses the X_U already sent for conv {}", src.name)),
            )
        } else {
            (true, None)
        };
        out.push(ConvRelease {
            layer: *id,
            name: name.clone(),
            d,
            released,
            why_not,
        });
    }
    Ok(out)
}

/// An (ε, δ) pair; `eps: null` in JSON means ε = ∞ (no finite bound).
#[derive(Clone, Copy, Debug, Serialize)]
pub(crate) struct Spent {
    pub eps: Option<f64>,
    pub delta: f64,
    /// The Rényi order the bound was found at.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rdp_order: Option<f64>,
}

impl Spent {
    fn infinite(delta: f64) -> Spent {
        Spent {
            eps: None,
            delta,
            rdp_order: None,
        }
    }

    /// "ε = 12.3" or "ε = ∞".
    pub(crate) fn text(&self) -> String {
        match self.eps {
            Some(e) => format!("ε = {}", fmt_eps(e)),
            None => "ε = ∞".into(),
        }
    }
}

/// δ as written on the command line would be: 1e-5 rather than 0.00001.
pub(crate) fn fmt_delta(d: f64) -> String {
    if d < 1e-3 {
        format!("{d:e}")
    } else {
        d.to_string()
    }
}

fn fmt_eps(e: f64) -> String {
    if e == 0.0 {
        "0".into()
    } else if !(1e-3..1e5).contains(&e) {
        format!("{e:.3e}")
    } else {
        format!("{e:.4}")
    }
}

/// One conv's share.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct LayerAccount {
    #[serde(flatten)]
    pub conv: ConvRelease,
    /// σ / C = nsr / √d.
    pub sigma_over_clip: f64,
    /// z = σ / (2C), the noise multiplier under replace-one sensitivity 2C.
    pub noise_multiplier: f64,
    /// (ε, δ) of one release of this conv's residual.
    pub one_release: Spent,
}

/// The accounting of one setting (clip, nsr, δ) over a number of forward passes per example.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Accounting {
    pub guarantee: &'static str,
    pub clip: Option<f32>,
    pub nsr: f32,
    pub delta: f64,
    pub calibration: &'static str,
    pub neighbouring: &'static str,
    pub layers: Vec<LayerAccount>,
    /// Convs whose residual leaves in one forward pass.
    pub releases_per_forward: usize,
    /// (ε, δ) of one forward pass (all its releases composed).
    pub one_forward: Spent,
    /// Forward passes per example accounted (`account_run`), and the releases they make.
    pub forward_passes: u64,
    pub releases: u64,
    /// (ε, δ) of all of them composed.
    pub total: Spent,
    /// Why ε is ∞, when it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unbounded: Option<&'static str>,
    pub not_covered: Vec<&'static str>,
}

const GUARANTEE: &str = "local differential privacy of one example's residuals X_U (RDP accountant, Gaussian mechanism, composition over the releasing convs and forward passes, tight RDP-to-(ε, δ) conversion)";
const CALIBRATION: &str =
    "each sample's X_U at one conv (d = N·H·W values) clipped to ℓ₂ norm C, then N(0, σ²) per value with σ = nsr·C/√d";
const NEIGHBOURING: &str =
    "replace-one (any two examples; the local model): ℓ₂ sensitivity 2C, noise multiplier z = σ/(2C) = nsr/(2√d)";
const NO_CLIP: &str = "no --clip: the noise is scaled to each sample's rms(X), so one example's residual has no bounded sensitivity and no finite ε holds";
const NO_NOISE: &str = "--clip without noise (nsr = 0): clipping alone gives no privacy";
pub(crate) const NOT_COVERED: [&str; 4] = [
    "∇Y: the backward pass sends each conv's output gradient to the accelerator without noise",
    "the conv weights (and their updates), which the accelerator holds and which are trained on the data",
    "BatchNorm in training mode: batch statistics make other examples' X_U depend on this example; only each example's own residual is accounted",
    "floating-point effects of Gaussian sampling (the bound assumes exact real arithmetic)",
];

/// The accounting of `passes` forward passes per example through the convs `layout`.
pub(crate) fn account(
    layout: &[ConvRelease],
    clip: Option<f32>,
    nsr: f32,
    delta: f64,
    passes: u64,
) -> Result<Accounting> {
    if !(delta > 0.0 && delta < 1.0) {
        bail!("--delta must be in (0, 1) (got {delta})");
    }
    if let Some(c) = clip {
        if !(c.is_finite() && c > 0.0) {
            bail!("--clip must be finite and above 0 (got {c})");
        }
    }
    let unbounded = match clip {
        None => Some(NO_CLIP),
        Some(_) if nsr.is_nan() || nsr <= 0.0 => Some(NO_NOISE),
        Some(_) => None,
    };
    let mut layers = Vec::with_capacity(layout.len());
    let mut forward = RdpAccountant::default();
    for c in layout {
        let z = local_noise_multiplier(nsr as f64, c.d);
        let one = match unbounded {
            Some(_) => Spent::infinite(delta),
            None => spent(gaussian_epsilon(z, 1, delta)?),
        };
        if c.released && unbounded.is_none() {
            forward.compose_gaussian(z, 1)?;
        }
        layers.push(LayerAccount {
            conv: c.clone(),
            sigma_over_clip: nsr as f64 / (c.d.max(1) as f64).sqrt(),
            noise_multiplier: z,
            one_release: one,
        });
    }
    let per_forward = layout.iter().filter(|c| c.released).count();
    let (one_forward, total) = match unbounded {
        Some(_) if per_forward > 0 && passes > 0 => {
            (Spent::infinite(delta), Spent::infinite(delta))
        }
        _ => {
            let one = spent(forward.epsilon(delta, Conversion::Tight)?);
            // The same releases `passes` times each.
            let mut all = RdpAccountant::default();
            if unbounded.is_none() {
                for c in layout.iter().filter(|c| c.released) {
                    all.compose_gaussian(local_noise_multiplier(nsr as f64, c.d), passes)?;
                }
            }
            (one, spent(all.epsilon(delta, Conversion::Tight)?))
        }
    };
    Ok(Accounting {
        guarantee: GUARANTEE,
        clip,
        nsr,
        delta,
        calibration: CALIBRATION,
        neighbouring: NEIGHBOURING,
        layers,
        releases_per_forward: per_forward,
        one_forward,
        forward_passes: passes,
        releases: per_forward as u64 * passes,
        total,
        unbounded: if per_forward > 0 && passes > 0 {
            unbounded
        } else {
            None
        },
        not_covered: NOT_COVERED.to_vec(),
    })
}

fn spent(e: asymml_core::dp::EpsDelta) -> Spent {
    if e.eps.is_finite() {
        Spent {
            eps: Some(e.eps),
            delta: e.delta,
            rdp_order: e.order.is_finite().then_some(e.order),
        }
    } else {
        Spent::infinite(e.delta)
    }
}

impl Accounting {
    /// The per-conv table and the one-forward-pass bound, as text lines.
    pub(crate) fn layer_lines(&self) -> Vec<String> {
        let mut out = vec![format!(
            "  {:<28} {:>9} {:>10} {:>10}  {}",
            "conv", "d", "sigma/C", "z", "one release"
        )];
        for l in &self.layers {
            let what = if l.conv.released {
                format!("{} (δ = {})", l.one_release.text(), fmt_delta(self.delta))
            } else {
                format!(
                    "no release: {}",
                    l.conv.why_not.as_deref().unwrap_or("nothing sent")
                )
            };
            out.push(format!(
                "  {:<28} {:>9} {:>10.3e} {:>10.3e}  {}",
                format!("{} {}", l.conv.layer, l.conv.name),
                l.conv.d,
                l.sigma_over_clip,
                l.noise_multiplier,
                what
            ));
        }
        out.push(format!(
            "  one forward pass ({} release(s) composed): {} at δ = {}",
            self.releases_per_forward,
            self.one_forward.text(),
            fmt_delta(self.delta)
        ));
        out
    }

    /// The lines that state what is and is not covered.
    pub(crate) fn scope_lines(&self) -> Vec<String> {
        let mut out = vec![
            format!("  guarantee: {}", self.guarantee),
            format!(
                "  mechanism: {}; clip C = {}, nsr = {}",
                self.calibration,
                self.clip.map_or("none".into(), |c| c.to_string()),
                self.nsr
            ),
            format!("  neighbouring: {}", self.neighbouring),
        ];
        if let Some(u) = self.unbounded {
            out.push(format!("  ε = ∞: {u}"));
        }
        out.push("  not covered:".into());
        out.extend(self.not_covered.iter().map(|n| format!("    - {n}")));
        out
    }
}

/// The accounting of one rank policy and noise level in `asymml privacy`.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct PolicyAccounting {
    pub rank_policy: String,
    #[serde(flatten)]
    pub accounting: Accounting,
}

/// `asymml privacy --clip C`: per rank policy and --nsr, the (ε, δ) of one release at each conv and of one
/// forward pass. Empty without --clip.
pub(crate) fn for_privacy(plan: &super::plan::Plan) -> Result<Vec<PolicyAccounting>> {
    let a = &plan.args;
    if a.clip.is_none() {
        return Ok(Vec::new());
    }
    let mut net = plan.model.net()?;
    let mut out = Vec::new();
    for rank in &a.ranks {
        let layout = release_layout(&mut net, rank.table.as_deref(), rank.guard)?;
        for &nsr in &a.nsr {
            out.push(PolicyAccounting {
                rank_policy: rank.to_string(),
                accounting: account(&layout, a.clip, nsr, a.delta, 1)?,
            });
        }
    }
    Ok(out)
}

/// The text of `for_privacy`'s result: the per-conv table once per distinct layout, and one line per rank
/// policy and nsr.
pub(crate) fn print_privacy(all: &[PolicyAccounting]) {
    let Some(first) = all.first() else {
        return;
    };
    println!();
    println!(
        "Formal accounting (--clip {}; local DP of one example's X_U per forward pass; the bound depends on C, \
         nsr and each conv's size d, not on the rank — only convs that send nothing are left out):",
        first.accounting.clip.unwrap_or(0.0)
    );
    let mut shown: Vec<(Vec<bool>, f32)> = Vec::new();
    for p in all {
        let acc = &p.accounting;
        let key: Vec<bool> = acc.layers.iter().map(|l| l.conv.released).collect();
        if !shown.iter().any(|(k, n)| *k == key && *n == acc.nsr) {
            println!("  rank {}, nsr {}:", p.rank_policy, acc.nsr);
            for l in acc.layer_lines() {
                println!("  {l}");
            }
            shown.push((key, acc.nsr));
        } else {
            println!(
                "  rank {}, nsr {}: one forward pass {} at δ = {} ({} release(s))",
                p.rank_policy,
                acc.nsr,
                acc.one_forward.text(),
                fmt_delta(acc.delta),
                acc.releases_per_forward
            );
        }
    }
    let acc = &first.accounting;
    println!("  guarantee: {}", acc.guarantee);
    println!("  mechanism: {}", acc.calibration);
    println!("  neighbouring: {}", acc.neighbouring);
    if all.iter().any(|p| p.accounting.unbounded.is_some()) {
        println!("  ε = ∞ at nsr 0: {NO_NOISE}");
    }
    println!("  not covered:");
    for n in &acc.not_covered {
        println!("    - {n}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use asymml_core::decomp::{TableEntry, TrustedRoute};
    use asymml_core::dp::gaussian_epsilon;
    use asymml_core::models::ModelSpec;

    fn layout(
        model: &str,
        in_ch: usize,
        size: usize,
        table: Option<&RankTable>,
    ) -> Vec<ConvRelease> {
        let mut net = ModelSpec::parse(model, in_ch, 10, size)
            .unwrap()
            .build(0)
            .unwrap();
        release_layout(&mut net, table, None).unwrap()
    }

    #[test]
    fn layout_sizes_and_shortcuts() {
        // vgg-small on 28×28 grey images: convs on 1×28×28, 32×14×14, 64×7×7.
        let v = layout("vgg-small", 1, 28, None);
        let d: Vec<usize> = v.iter().map(|c| c.d).collect();
        assert_eq!(d, vec![784, 32 * 14 * 14, 64 * 7 * 7]);
        assert!(v.iter().all(|c| c.released));
        // ResNet-18 (CIFAR): 20 convs, of which the 3 downsample shortcuts reuse their block's X_U.
        let r = layout("resnet18-cifar", 3, 32, None);
        assert_eq!(r.len(), 20);
        assert_eq!(r[0].d, 3 * 32 * 32);
        let shortcuts: Vec<&str> = r
            .iter()
            .filter(|c| !c.released)
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(shortcuts.len(), 3, "{shortcuts:?}");
        assert!(shortcuts.iter().all(|n| n.contains("downsample")));
        // A conv routed "trusted" by a rank table releases nothing.
        let table = RankTable {
            model: String::new(),
            layers: v
                .iter()
                .enumerate()
                .map(|(i, c)| TableEntry {
                    conv: c.name.clone(),
                    rank: if i == 0 {
                        TableRank::Route(TrustedRoute::Trusted)
                    } else {
                        TableRank::Rank(2)
                    },
                })
                .collect(),
        };
        let t = layout("vgg-small", 1, 28, Some(&table));
        assert!(!t[0].released && t[1].released && t[2].released);
    }

    #[test]
    fn accounting_composes_releases_and_passes() {
        let v = layout("vgg-small", 1, 28, None);
        let (clip, nsr, delta) = (Some(1.0f32), 4.0f32, 1e-5);
        let one = account(&v, clip, nsr, delta, 1).unwrap();
        assert_eq!(one.releases_per_forward, 3);
        // Each conv's single release is the Gaussian with z = nsr/(2√d).
        for l in &one.layers {
            let z = nsr as f64 / (2.0 * (l.conv.d as f64).sqrt());
            assert!((l.noise_multiplier - z).abs() < 1e-12);
            let want = gaussian_epsilon(z, 1, delta).unwrap().eps;
            assert!((l.one_release.eps.unwrap() - want).abs() < 1e-9 * want);
        }
        // Two passes over three convs: RDP 2·Σ_l α/(2 z_l²) — as one Gaussian with 1/z² = 2·Σ 1/z_l².
        let two = account(&v, clip, nsr, delta, 2).unwrap();
        assert_eq!(two.releases, 6);
        let inv: f64 = v
            .iter()
            .map(|c| 4.0 * c.d as f64 / (nsr as f64 * nsr as f64))
            .sum();
        let want = gaussian_epsilon((1.0 / (2.0 * inv)).sqrt(), 1, delta)
            .unwrap()
            .eps;
        let got = two.total.eps.unwrap();
        assert!((got - want).abs() < 1e-9 * want, "{got} vs {want}");
        assert!(got > one.total.eps.unwrap());
        // A trusted-routed conv does not count.
        let mut fewer = v.clone();
        fewer[1].released = false;
        let f = account(&fewer, clip, nsr, delta, 1).unwrap();
        assert_eq!(f.releases_per_forward, 2);
        assert!(f.one_forward.eps.unwrap() < one.one_forward.eps.unwrap());
        // No clip, or no noise: ε = ∞, said plainly.
        let none = account(&v, None, nsr, delta, 1).unwrap();
        assert!(none.total.eps.is_none() && none.unbounded == Some(NO_CLIP));
        let silent = account(&v, clip, 0.0, delta, 1).unwrap();
        assert!(silent.total.eps.is_none() && silent.unbounded == Some(NO_NOISE));
        // Nothing released: ε = 0.
        let nothing: Vec<ConvRelease> = v
            .iter()
            .cloned()
            .map(|mut c| {
                c.released = false;
                c
            })
            .collect();
        assert_eq!(
            account(&nothing, clip, nsr, delta, 5).unwrap().total.eps,
            Some(0.0)
        );
        // Bad δ or clip are refused.
        assert!(account(&v, clip, nsr, 0.0, 1).is_err());
        assert!(account(&v, Some(-1.0), nsr, delta, 1).is_err());
        assert!(parse_delta("1").is_err() && parse_delta("1e-5").is_ok());
        assert!(
            parse_clip("0").is_err() && parse_clip("inf").is_err() && parse_clip("2.5").is_ok()
        );
    }
}
