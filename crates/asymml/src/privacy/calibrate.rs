//! `asymml privacy --calibrate`: per conv layer, the smallest rank r (or the fully-trusted route) whose X_U
//! stays under every `--target` on the calibration images, written as a rank table (`--rank table:FILE`).
//!
//! Search: ranks upward by doubling (1, 2, 4, …) until one passes, then bisection between the last failing
//! and the first passing rank, assuming leakage falls as r grows. A rank ≥ N (the conv's input channels) is
//! the trusted route: nothing of the input leaves. Every probe records what the split runtime really sends
//! with `fixed:R` at every conv: X_U of conv l depends only on conv l's rank (each conv's input is recomputed
//! in full in the trusted runtime), so one recording serves every conv probed at the same r.

use super::capture::{self, rows, StreamRequest};
use super::leakage;
use super::measure::{tensor_of, Attacker};
use super::plan::Plan;
use super::structure;
use crate::progress;
use anyhow::{Context, Result};
use asymml_core::decomp::{RankPolicy, RankTable, TableEntry, TableRank, TrustedRoute};
use asymml_core::{weights, Tensor};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// One probe: the leakage of conv `layer`'s X_U at rank `rank`.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Probe {
    pub rank: usize,
    pub rel_mi: f64,
    pub linfoot: f64,
    pub edge_ssim: f64,
    pub edge_ssim_chance: f64,
    /// edge_ssim above its chance level: what --target edge-ssim bounds.
    pub edge_excess: f64,
    pub ssim_gain: Option<f64>,
    pub pass: bool,
}

/// The search at one conv.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct LayerCalibration {
    pub layer: usize,
    pub conv: String,
    pub in_ch: usize,
    /// The rank chosen (None: the trusted route; also for convs outside --layers that the base policy
    /// routes so).
    pub rank: Option<usize>,
    /// Whether the conv was calibrated (else it has the base policy's rank).
    pub calibrated: bool,
    pub probes: Vec<Probe>,
}

/// Where one conv's search stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Search {
    /// The largest rank known to fail (0: none yet).
    pub lo: usize,
    /// The smallest rank known to pass (N: the trusted route, which always does).
    pub hi: Option<usize>,
    pub n: usize,
}

impl Search {
    pub(crate) fn new(n: usize) -> Search {
        Search {
            lo: 0,
            hi: None,
            n: n.max(1),
        }
    }

    /// The next rank to probe, or None when the search is over (a rank ≥ N passes without a probe).
    pub(crate) fn next(&mut self) -> Option<usize> {
        match self.hi {
            None => {
                let r = if self.lo == 0 { 1 } else { self.lo * 2 };
                if r >= self.n {
                    // Doubling reached N: bisect between lo and N (the trusted route passes).
                    self.hi = Some(self.n);
                    return self.next();
                }
                Some(r)
            }
            Some(hi) if hi > self.lo + 1 => Some(self.lo + (hi - self.lo) / 2),
            Some(_) => None,
        }
    }

    /// Records the outcome of a probe at rank r.
    pub(crate) fn record(&mut self, r: usize, pass: bool) {
        if pass {
            self.hi = Some(self.hi.map_or(r, |h| h.min(r)));
        } else {
            self.lo = self.lo.max(r);
        }
    }

    /// The result: Some(r) for a rank below N, None for the trusted route.
    pub(crate) fn result(&self) -> Option<usize> {
        self.hi.filter(|&h| h < self.n)
    }
}

/// What the calibration writes (calibration.json beside the table).
#[derive(Debug, Serialize)]
struct CalibrationReport {
    model: String,
    data: String,
    images: usize,
    nsr: f32,
    target: String,
    base_policy: String,
    table: String,
    layers: Vec<LayerCalibration>,
}

/// Runs the calibration and writes the rank table.
pub(crate) fn run(plan: &Plan) -> Result<()> {
    let a = &plan.args;
    let nsr = a.nsr.first().copied().unwrap_or(0.0);
    let base = a
        .ranks
        .first()
        .cloned()
        .unwrap_or_else(|| crate::values::RankArg::named(RankPolicy::Schedule));
    let data = &plan.data.private;
    let (x, labels) = tensor_of(data, &(0..data.len()).collect::<Vec<_>>());
    let inputs = capture::conv_inputs(&plan.model, &x, a.batch_size)?;
    let attack =
        !plan.decoders.is_empty() && !plan.data.public.is_empty() && a.target.ssim_gain.is_some();
    if a.target.ssim_gain.is_some() && !attack {
        eprintln!(
            "note: --target ssim-gain is not checked (no decoders or no public images for the attacker)"
        );
    }
    let attacker = if attack {
        Some(Attacker::new(plan, &x)?)
    } else {
        None
    };
    let mean_ssim = match &attacker {
        Some(at) => at.mean_image()?.attacks.first().map(|r| r.ssim),
        None => None,
    };
    // The base policy's ranks (for the convs not calibrated).
    let base_ranks = capture::streams(
        &plan.model,
        &x,
        &labels,
        &StreamRequest {
            split: plan.split(&base, nsr, a.seed),
            batch: a.batch_size,
            layers: &[],
            backward: false,
        },
    )?
    .ranks;
    let mut self_mi = BTreeMap::new();
    for &l in &plan.mi_layers {
        self_mi.insert(l, leakage::self_information(&inputs[l], &plan.mi)?);
    }
    let mut searches: BTreeMap<usize, Search> = plan
        .mi_layers
        .iter()
        .map(|&l| (l, Search::new(plan.model.convs[l].1)))
        .collect();
    let mut probes: BTreeMap<usize, Vec<Probe>> = BTreeMap::new();
    let pb = progress::bar(0, "calibrate", a.json);
    loop {
        let mut by_rank: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (&l, s) in searches.iter_mut() {
            if let Some(r) = s.next() {
                by_rank.entry(r).or_default().push(l);
            }
        }
        if by_rank.is_empty() {
            break;
        }
        pb.inc_length(by_rank.len() as u64);
        for (r, layers) in by_rank {
            pb.set_message(format!("rank {r} at convs {layers:?}"));
            let seed = a.seed ^ (r as u64).wrapping_mul(0x9E37_79B9);
            let request = StreamRequest {
                split: plan.split_policy(RankPolicy::Fixed(r), nsr, seed),
                batch: a.batch_size,
                layers: &layers,
                backward: false,
            };
            let sent = capture::streams(&plan.model, &x, &labels, &request)?;
            let public = match &attacker {
                Some(at) => Some(capture::streams(
                    &plan.model,
                    &at.public_x,
                    &at.public_labels,
                    &StreamRequest {
                        split: plan.split_policy(RankPolicy::Fixed(r), nsr, seed ^ 0xA77AC),
                        ..request
                    },
                )?),
                None => None,
            };
            for l in layers {
                let s = sent
                    .x_u
                    .get(&l)
                    .filter(|t| !t.is_empty())
                    .with_context(|| format!("conv {l} sent no X_U at rank {r}"))?;
                let lk = leakage::leak(&inputs[l], s, &self_mi[&l], &plan.mi)?;
                let edge = structure::edge_ssim(&x, s)?;
                let gain = match (&attacker, &public) {
                    (Some(at), Some(p)) => {
                        best_gain(at, plan, p.x_u.get(&l), s, mean_ssim, a.seed ^ l as u64)?
                    }
                    _ => None,
                };
                let t = &a.target;
                let under = |v: f64, lim: Option<f64>| lim.is_none_or(|m| v < m);
                let pass = under(lk.rel_mi, t.rel_mi)
                    && under(lk.linfoot, t.linfoot)
                    && under(edge.excess(), t.edge_ssim)
                    && gain.is_none_or(|g| under(g, t.ssim_gain));
                probes.entry(l).or_default().push(Probe {
                    rank: r,
                    rel_mi: lk.rel_mi,
                    linfoot: lk.linfoot,
                    edge_ssim: edge.mean,
                    edge_ssim_chance: edge.chance,
                    edge_excess: edge.excess(),
                    ssim_gain: gain,
                    pass,
                });
                if let Some(s) = searches.get_mut(&l) {
                    s.record(r, pass);
                }
            }
            pb.inc(1);
        }
    }
    pb.finish_and_clear();
    let layers: Vec<LayerCalibration> = plan
        .model
        .convs
        .iter()
        .enumerate()
        .map(|(l, (name, in_ch))| {
            let (rank, calibrated) = match searches.get(&l) {
                Some(s) => (s.result(), true),
                None => {
                    let r = base_ranks.get(l).copied().unwrap_or(1).max(1);
                    (Some(r), false)
                }
            };
            LayerCalibration {
                layer: l,
                conv: name.clone(),
                in_ch: *in_ch,
                rank,
                calibrated,
                probes: probes.remove(&l).unwrap_or_default(),
            }
        })
        .collect();
    let table = RankTable {
        model: plan.model.spec.name(),
        layers: layers
            .iter()
            .map(|c| TableEntry {
                conv: c.conv.clone(),
                rank: c
                    .rank
                    .map_or(TableRank::Route(TrustedRoute::Trusted), TableRank::Rank),
            })
            .collect(),
    };
    let path = a.table_out.clone().unwrap_or_else(|| match &a.out {
        Some(o) => o.join("rank_table.json"),
        None => PathBuf::from("rank_table.json"),
    });
    weights::write_atomic(&path, serde_json::to_string_pretty(&table)?.as_bytes())?;
    let report = CalibrationReport {
        model: plan.model.spec.name(),
        data: plan.data.describe.clone(),
        images: data.len(),
        nsr,
        target: a.target.to_string(),
        base_policy: base.text.clone(),
        table: path.display().to_string(),
        layers,
    };
    if let Some(o) = &a.out {
        weights::write_atomic(
            &o.join("calibration.json"),
            serde_json::to_string_pretty(&report)?.as_bytes(),
        )?;
    }
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

/// The best decoder's SSIM gain over the mean image on conv `l`'s X_U (None without a public stream).
fn best_gain(
    at: &Attacker,
    plan: &Plan,
    public: Option<&Tensor>,
    private: &Tensor,
    mean_ssim: Option<f64>,
    seed: u64,
) -> Result<Option<f64>> {
    let (Some(p), Some(m)) = (public.filter(|t| !t.is_empty()), mean_ssim) else {
        return Ok(None);
    };
    let attacked = rows(private, &plan.data.attacked);
    let recons = at.decode(p, &attacked, seed)?;
    let best = at
        .score(&recons)?
        .iter()
        .map(|r| r.ssim)
        .fold(f64::NAN, f64::max);
    Ok(best.is_finite().then(|| structure::ssim_gain(best, m)))
}

fn print_report(r: &CalibrationReport) {
    println!(
        "asymml privacy --calibrate: {} on {}, nsr {}, target {}",
        r.model, r.data, r.nsr, r.target
    );
    println!(
        "  {:<28} {:>5} {:>9}  probes (rank: rel_mi / edge_ssim over chance / ssim_gain, + pass, - fail)",
        "conv", "N", "chosen"
    );
    for l in &r.layers {
        let chosen = match (l.rank, l.calibrated) {
            (None, _) => "trusted".to_string(),
            (Some(k), true) => k.to_string(),
            (Some(k), false) => format!("{k} (base)"),
        };
        let probes: Vec<String> = l
            .probes
            .iter()
            .map(|p| {
                format!(
                    "{}: {:.3}/{:.3}/{}{}",
                    p.rank,
                    p.rel_mi,
                    p.edge_excess,
                    p.ssim_gain.map_or("-".into(), |g| format!("{g:.3}")),
                    if p.pass { "+" } else { "-" }
                )
            })
            .collect();
        println!(
            "  {:<28} {:>5} {:>9}  {}",
            format!("{} {}", l.layer, l.conv),
            l.in_ch,
            chosen,
            probes.join("  ")
        );
    }
    println!(
        "  convs outside --layers have the {} policy's rank; rank table written to {}",
        r.base_policy, r.table
    );
    println!("  use it with --rank table:{}", r.table);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a search against a conv whose leakage passes from rank `first_pass` on.
    fn search(n: usize, first_pass: usize) -> (Option<usize>, Vec<usize>) {
        let mut s = Search::new(n);
        let mut probed = Vec::new();
        while let Some(r) = s.next() {
            assert!(r >= 1 && r < n, "probe {r} of {n}");
            probed.push(r);
            s.record(r, r >= first_pass);
            assert!(probed.len() < 64);
        }
        (s.result(), probed)
    }

    #[test]
    fn finds_the_smallest_passing_rank() {
        assert_eq!(search(64, 1), (Some(1), vec![1]));
        assert_eq!(search(64, 5).0, Some(5));
        assert_eq!(search(64, 5).1, vec![1, 2, 4, 8, 6, 5]);
        assert_eq!(search(64, 33).0, Some(33));
        assert_eq!(search(64, 63).0, Some(63));
        // Nothing below N passes: the trusted route.
        assert_eq!(search(64, 64).0, None);
        assert_eq!(search(3, 3), (None, vec![1, 2]));
        // One channel: no probe, the trusted route.
        assert_eq!(search(1, 1), (None, vec![]));
        for first in 1..=40 {
            assert_eq!(search(40, first).0, (first < 40).then_some(first));
        }
    }
}
