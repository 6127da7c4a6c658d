//! `asymml privacy --frontier`: the privacy–speed frontier. Per rank policy, the trusted runtime's speedup over
//! trusted-only — timed by the bench module on the privacy run's own model, weights and images, or read from a
//! bench.json — beside the worst leakage over the measured convs at each noise level (aggregated from the
//! report's settings, not measured again), whether that hides the images, the accuracy cost from
//! `--tradeoff`, and which points no other point beats on both speed and leakage (the Pareto set).

use super::args::PrivacyArgs;
use super::measure::Setting;
use super::plan::Plan;
use super::structure::{EDGE_SSIM_RECOGNISABLE, SSIM_GAIN_RECOGNISABLE};
use super::tradeoff::TradeoffEntry;
use crate::batch::Batch;
use crate::cli::BenchArgs;
use crate::values::{RankArg, DEFAULT_RANK};
use anyhow::{anyhow, bail, Context, Result};
use asymml_core::rng::Rng;
use asymml_trusted::split::Basis;
use serde::Serialize;
use serde_json::Value;
use std::path::Path;

/// rel_mi at or below which a setting can hide the images (with edge_excess and ssim_gain below their
/// thresholds; see docs/security.md, "What "recognisable" means").
pub(crate) const REL_MI_HIDES: f64 = 0.02;

/// The timing's batch when `--batch-size` is `auto`.
const DEFAULT_BENCH_BATCH: usize = 8;

/// Whether two rank arguments name the same policy: the same text, or the same settings under another text
/// (`asym1` and `energy:0.97`).
fn same_policy(a: &RankArg, b: &RankArg) -> bool {
    let settings = |r: &RankArg| RankArg {
        text: String::new(),
        ..r.clone()
    };
    a.text == b.text || settings(a) == settings(b)
}

/// The default rank policy of `train`, `infer`, `bench` and `verify` ([`DEFAULT_RANK`]).
fn default_rank() -> Result<RankArg> {
    DEFAULT_RANK
        .parse()
        .map_err(|e| anyhow!("the default rank policy '{DEFAULT_RANK}': {e}"))
}

/// Adds the default rank policy to `--ranks` unless one of them is the same policy, so that it is measured.
pub(crate) fn add_default_policy(a: &mut PrivacyArgs) -> Result<()> {
    let default = default_rank()?;
    if !a.ranks.iter().any(|r| same_policy(r, &default)) {
        a.ranks.push(default);
    }
    Ok(())
}

/// One rank policy of the frontier.
#[derive(Clone, Debug)]
struct Policy {
    rank: RankArg,
    /// The text in the table and the plot: the policy's, or `default (<text>)` for the default policy.
    label: String,
    default: bool,
}

/// `--ranks` without repeats, the default policy labelled as such.
fn policies(ranks: &[RankArg]) -> Result<Vec<Policy>> {
    let default = default_rank()?;
    let mut out: Vec<Policy> = Vec::new();
    for r in ranks {
        if out.iter().any(|p| p.rank.text == r.text) {
            continue;
        }
        let is_default = same_policy(r, &default) && !out.iter().any(|p| p.default);
        out.push(Policy {
            rank: r.clone(),
            label: if is_default {
                format!("default ({})", r.text)
            } else {
                r.text.clone()
            },
            default: is_default,
        });
    }
    Ok(out)
}

/// The trusted runtime's speed in split mode with one rank policy, against trusted-only.
#[derive(Clone, Debug, PartialEq)]
struct Speed {
    /// Trusted-only's trusted time over the split's (the paper's speedup of the TEE).
    trusted_speedup: f64,
    /// Trusted-only's wall time over the split's.
    wall_speedup: Option<f64>,
    /// The trusted runtime's time per step, split and trusted-only (seconds, median).
    trusted_s: f64,
    trusted_only_s: f64,
    batch: usize,
    trusted_threads: Option<usize>,
    accelerator_threads: Option<usize>,
}

/// The frontier's speeds: one per policy, and where they come from.
pub(crate) struct Speeds {
    policies: Vec<Policy>,
    speeds: Vec<Speed>,
    /// `timed` or the bench.json read.
    source: String,
    /// Timed steps (`None` when read from a file).
    steps: Option<usize>,
}

/// The speedup of every policy of the plan: read from `--frontier-bench`, else timed. `batch_flag` is
/// `--batch-size` as given (0: auto, timed with 8 images).
pub(crate) fn speeds(plan: &Plan, batch_flag: usize) -> Result<Speeds> {
    let a = &plan.args;
    let policies = policies(&a.ranks)?;
    let model = plan.model.spec.name();
    let size = plan.model.spec.input_size;
    let (rows, source, steps) = match &a.frontier_bench {
        Some(path) => (read_bench(path)?, path.display().to_string(), None),
        None => {
            let batch = if batch_flag == 0 {
                DEFAULT_BENCH_BATCH
            } else {
                batch_flag
            };
            let rows = time(plan, &policies, batch)?;
            if let Some(out) = &a.out {
                // bench.json's format, for --frontier-bench next time.
                let text = serde_json::to_string_pretty(&serde_json::json!({ "results": rows }))?;
                asymml_core::weights::write_atomic(
                    &out.join("frontier_bench.json"),
                    text.as_bytes(),
                )?;
            }
            (rows, "timed".to_string(), Some(a.frontier_steps))
        }
    };
    let speeds = speeds_from_rows(&rows, &model, size, &policies, &source)?;
    Ok(Speeds {
        policies,
        speeds,
        source,
        steps,
    })
}

/// The rows of a bench.json (`{"results":[…]}`).
fn read_bench(path: &Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--frontier-bench: reading {}", path.display()))?;
    let v: Value = serde_json::from_str(&text).with_context(|| {
        format!(
            "--frontier-bench: {} is not JSON (expected bench.json from `asymml bench --json` or --out)",
            path.display()
        )
    })?;
    match v.get("results").and_then(Value::as_array) {
        Some(rows) => Ok(rows.clone()),
        None => bail!(
            "--frontier-bench: {} has no \"results\" array (expected bench.json from `asymml bench --json` or \
             --out)",
            path.display()
        ),
    }
}

/// Times trusted-only and the split with every policy: inference, on `batch` of the private images (repeated
/// to fill it), with the plan's model and weights, its decomposition settings and the largest `--nsr`'s noise,
/// one warm-up and `--frontier-steps` timed steps, `--frontier-threads` on each side.
fn time(plan: &Plan, policies: &[Policy], batch: usize) -> Result<Vec<Value>> {
    let a = &plan.args;
    let spec = &plan.model.spec;
    let threads = a.frontier_threads;
    let mut b = bench_args()?;
    b.models.clear();
    b.images = None;
    b.input_size = Some(spec.input_size);
    b.split.rank = policies.iter().map(|p| p.rank.clone()).collect();
    b.split.svd_iters = a.svd_iters;
    b.split.svd = a.svd;
    b.split.basis = Some(if a.shared_basis {
        Basis::Shared
    } else {
        Basis::PerSample
    });
    b.split.noise = a.nsr.iter().copied().fold(0.0, f32::max);
    b.split.clip = a.clip;
    b.split.accelerator_threads = Some(threads);
    b.batch_size = batch.max(2);
    b.channels = spec.in_ch;
    b.classes = spec.classes;
    b.steps = a.frontier_steps;
    b.warmup = 1;
    b.threads = Some(threads);
    b.json = a.json;
    let images = &plan.data.private;
    let idx: Vec<usize> = (0..b.batch_size).map(|i| i % images.len()).collect();
    let mut x = Batch::new();
    x.fill(images, &idx, None, &mut Rng::new(a.seed));
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .context("the frontier's timing: starting its thread pool")?;
    let net = || plan.model.net();
    let results = pool.install(|| crate::bench::time_batch(&b, spec, &x.x, &net, threads))?;
    results
        .iter()
        .map(|r| serde_json::to_value(r).context("the frontier's timing"))
        .collect()
}

/// `asymml bench`'s flags at their defaults, in trusted-only and split mode, inference only.
fn bench_args() -> Result<BenchArgs> {
    use clap::{Args, FromArgMatches};
    let cmd = BenchArgs::augment_args(clap::Command::new("bench"));
    let m = cmd
        .try_get_matches_from(["bench", "--modes", "trusted-only,split", "--phase", "infer"])
        .map_err(|e| anyhow!("the frontier's timing: {e}"))?;
    BenchArgs::from_arg_matches(&m).map_err(|e| anyhow!("the frontier's timing: {e}"))
}

/// Each policy's speed from bench rows: the inference rows of `model` at `size` px in split mode with the
/// policy's text, and in trusted-only mode at the same batch size. `source` names the rows in errors.
fn speeds_from_rows(
    rows: &[Value],
    model: &str,
    size: usize,
    policies: &[Policy],
    source: &str,
) -> Result<Vec<Speed>> {
    let s = |r: &Value, k: &str| r.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let u = |r: &Value, k: &str| r.get(k).and_then(Value::as_u64).map(|v| v as usize);
    let f = |r: &Value, k: &str| r.get(k).and_then(Value::as_f64);
    let have = || {
        let list: Vec<String> = rows
            .iter()
            .map(|r| {
                let rank = s(r, "rank");
                format!(
                    "{} {} {}{}{} at {} px",
                    s(r, "model"),
                    s(r, "phase"),
                    s(r, "mode"),
                    if rank.is_empty() { "" } else { " " },
                    rank,
                    u(r, "input_size").map_or("?".into(), |v| v.to_string())
                )
            })
            .collect();
        if list.is_empty() {
            "no rows".to_string()
        } else {
            list.join("; ")
        }
    };
    let of_model = |r: &Value, mode: &str| {
        s(r, "model") == model && s(r, "phase") == "infer" && s(r, "mode") == mode
    };
    let mut out = Vec::with_capacity(policies.len());
    for p in policies {
        let text = p.rank.text.as_str();
        let candidates: Vec<&Value> = rows
            .iter()
            .filter(|r| of_model(r, "split") && s(r, "rank") == text)
            .collect();
        let Some(split) = candidates
            .iter()
            .copied()
            .find(|r| u(r, "input_size") == Some(size))
        else {
            bail!(
                "{source}: no inference row of {model} at {size} px in split mode with rank policy '{text}' \
                 (time it with `asymml bench --models {model} --input-size {size} --phase infer --modes \
                 trusted-only,split --rank {text} --json`); it has: {}",
                have()
            );
        };
        let batch = u(split, "batch");
        let Some(only) = rows.iter().find(|r| {
            of_model(r, "trusted-only")
                && u(r, "input_size") == Some(size)
                && u(r, "batch") == batch
        }) else {
            bail!(
                "{source}: no inference row of {model} at {size} px in trusted-only mode with batch {} (the \
                 speedup is over trusted-only at the same batch); it has: {}",
                batch.map_or("?".into(), |b| b.to_string()),
                have()
            );
        };
        let (Some(t), Some(t0)) = (f(split, "trusted_s"), f(only, "trusted_s")) else {
            bail!("{source}: a row of {model} has no trusted_s");
        };
        if !(t > 0.0 && t0 > 0.0 && t.is_finite() && t0.is_finite()) {
            bail!(
                "{source}: {model}'s trusted times must be positive and finite (split '{text}': {t}, \
                 trusted-only: {t0})"
            );
        }
        let wall = match (f(split, "median_s"), f(only, "median_s")) {
            (Some(w), Some(w0)) if w > 0.0 && w.is_finite() && w0.is_finite() => Some(w0 / w),
            _ => None,
        };
        out.push(Speed {
            trusted_speedup: t0 / t,
            wall_speedup: wall,
            trusted_s: t,
            trusted_only_s: t0,
            batch: batch.unwrap_or(0),
            trusted_threads: u(split, "trusted_threads"),
            accelerator_threads: u(split, "accelerator_threads"),
        });
    }
    Ok(out)
}

/// One point of the frontier: a rank policy at one noise level.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct FrontierEntry {
    /// The policy as given (`--ranks`), and its label (`default (…)` for the default policy).
    pub policy: String,
    pub label: String,
    pub default: bool,
    pub nsr: f32,
    /// The measured convs (`--layers`) and the rank the policy gave each.
    pub layers: Vec<usize>,
    pub ranks: Vec<usize>,
    /// The trusted runtime's speedup over trusted-only, and the wall-time speedup (the same for every nsr).
    pub trusted_speedup: f64,
    pub wall_speedup: Option<f64>,
    /// The trusted runtime's time per step, split and trusted-only (seconds).
    pub trusted_s: f64,
    pub trusted_only_s: f64,
    /// The timing: its batch, threads, timed steps (absent when read from a file) and source (`timed` or
    /// the bench.json).
    pub bench_batch: usize,
    pub bench_trusted_threads: Option<usize>,
    pub bench_accelerator_threads: Option<usize>,
    pub bench_steps: Option<usize>,
    pub bench_source: String,
    /// The worst conv's rel_mi, edge_excess (edge SSIM over its chance level) and ssim_gain, each with its
    /// conv.
    pub max_rel_mi: Option<f64>,
    pub max_rel_mi_layer: Option<usize>,
    pub max_edge_excess: Option<f64>,
    pub max_edge_excess_layer: Option<usize>,
    pub max_ssim_gain: Option<f64>,
    pub max_ssim_gain_layer: Option<usize>,
    /// The best attack's SSIM and PSNR (dB): the largest over the attacked convs, and the conv of the SSIM.
    pub attack_ssim: Option<f64>,
    pub attack_psnr_db: Option<f64>,
    pub attack_layer: Option<usize>,
    /// max(max_edge_excess, max_ssim_gain): the plotted leakage.
    pub leakage: Option<f64>,
    /// edge_excess < 0.1, ssim_gain < 0.1 (when attacked) and rel_mi ≤ 2 % at every measured conv (absent
    /// when the edge measure is missing).
    pub hides: Option<bool>,
    /// With --tradeoff, for its rank policy: the test accuracy trained at this nsr, and the accuracy lost
    /// against the run at nsr 0 (whose split computes what trusted-only does), when that run exists.
    pub test_acc: Option<f64>,
    pub accuracy_cost: Option<f64>,
    /// No other point has a speedup ≥ and a leakage ≤ this one's, one of them strictly.
    pub pareto: bool,
}

/// The largest finite value of `f` over `settings`, with its conv.
fn worst(settings: &[&Setting], f: impl Fn(&Setting) -> Option<f64>) -> Option<(f64, usize)> {
    settings
        .iter()
        .filter_map(|s| f(s).filter(|v| v.is_finite()).map(|v| (v, s.layer)))
        .fold(None, |acc, (v, l)| match acc {
            Some((m, _)) if m >= v => acc,
            _ => Some((v, l)),
        })
}

/// Whether a setting with these worst values hides the images (docs/security.md's threshold);
/// `None` without the edge measure.
fn hides(rel_mi: Option<f64>, edge_excess: Option<f64>, ssim_gain: Option<f64>) -> Option<bool> {
    let edge = edge_excess?;
    Some(
        edge < EDGE_SSIM_RECOGNISABLE
            && ssim_gain.is_none_or(|g| g < SSIM_GAIN_RECOGNISABLE)
            && rel_mi.is_some_and(|m| m <= REL_MI_HIDES),
    )
}

/// The frontier: per policy and `--nsr`, its speed beside the worst leakage of its X_U settings, the
/// trade-off's accuracy, and the Pareto set.
pub(crate) fn entries(
    plan: &Plan,
    sp: &Speeds,
    settings: &[Setting],
    tradeoff: &[TradeoffEntry],
) -> Vec<FrontierEntry> {
    let mut out = Vec::new();
    for (p, speed) in sp.policies.iter().zip(&sp.speeds) {
        for &nsr in &plan.args.nsr {
            let text = p.rank.text.as_str();
            let mut at: Vec<&Setting> = settings
                .iter()
                .filter(|s| s.stream == "x_u" && s.rank_policy == text && s.nsr == nsr)
                .collect();
            at.sort_by_key(|s| {
                plan.mi_layers
                    .iter()
                    .position(|&l| l == s.layer)
                    .unwrap_or(usize::MAX)
            });
            let rel = worst(&at, |s| Some(s.rel_mi));
            let edge = worst(&at, |s| s.edge_excess);
            let gain = worst(&at, |s| s.ssim_gain);
            let ssim = worst(&at, |s| s.ssim);
            let psnr = worst(&at, |s| s.psnr_db);
            let leakage = match (edge, gain) {
                (Some(e), Some(g)) => Some(e.0.max(g.0)),
                (e, g) => e.or(g).map(|v| v.0),
            };
            let acc_at = |n: f32| {
                tradeoff
                    .iter()
                    .find(|t| t.rank_policy == text && t.nsr == n)
                    .map(|t| t.test_acc)
            };
            let test_acc = acc_at(nsr);
            out.push(FrontierEntry {
                policy: text.to_string(),
                label: p.label.clone(),
                default: p.default,
                nsr,
                layers: at.iter().map(|s| s.layer).collect(),
                ranks: at.iter().map(|s| s.rank).collect(),
                trusted_speedup: speed.trusted_speedup,
                wall_speedup: speed.wall_speedup,
                trusted_s: speed.trusted_s,
                trusted_only_s: speed.trusted_only_s,
                bench_batch: speed.batch,
                bench_trusted_threads: speed.trusted_threads,
                bench_accelerator_threads: speed.accelerator_threads,
                bench_steps: sp.steps,
                bench_source: sp.source.clone(),
                max_rel_mi: rel.map(|v| v.0),
                max_rel_mi_layer: rel.map(|v| v.1),
                max_edge_excess: edge.map(|v| v.0),
                max_edge_excess_layer: edge.map(|v| v.1),
                max_ssim_gain: gain.map(|v| v.0),
                max_ssim_gain_layer: gain.map(|v| v.1),
                attack_ssim: ssim.map(|v| v.0),
                attack_psnr_db: psnr.map(|v| v.0),
                attack_layer: ssim.map(|v| v.1),
                leakage,
                hides: hides(rel.map(|v| v.0), edge.map(|v| v.0), gain.map(|v| v.0)),
                test_acc,
                accuracy_cost: test_acc.zip(acc_at(0.0)).map(|(a, a0)| a0 - a),
                pareto: false,
            });
        }
    }
    let points: Vec<(f64, Option<f64>)> =
        out.iter().map(|e| (e.trusted_speedup, e.leakage)).collect();
    for (e, on) in out.iter_mut().zip(pareto(&points)) {
        e.pareto = on;
    }
    out
}

/// The Pareto set of (speedup, leakage) points: a point is on it unless another is at least as fast and at
/// most as leaky, and strictly better in one of the two. Points without a finite leakage are never on it and
/// beat none.
pub(crate) fn pareto(points: &[(f64, Option<f64>)]) -> Vec<bool> {
    let ok = |p: &(f64, Option<f64>)| match p.1 {
        Some(y) if p.0.is_finite() && y.is_finite() => Some((p.0, y)),
        _ => None,
    };
    points
        .iter()
        .map(|p| {
            let Some((x, y)) = ok(p) else {
                return false;
            };
            !points
                .iter()
                .filter_map(ok)
                .any(|(qx, qy)| qx >= x && qy <= y && (qx > x || qy < y))
        })
        .collect()
}

fn fmt_opt(v: Option<f64>, prec: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.prec$}"))
}

/// The frontier table on stdout.
pub(crate) fn print(entries: &[FrontierEntry]) {
    let Some(first) = entries.first() else {
        return;
    };
    let threads = |t: Option<usize>| t.map_or("?".into(), |t| t.to_string());
    println!(
        "Privacy–speed frontier (speed: {}, inference, batch {}, {} trusted + {} accelerator thread(s){}; \
         leakage: the worst of convs {}):",
        if first.bench_source == "timed" {
            "timed here".to_string()
        } else {
            format!("from {}", first.bench_source)
        },
        first.bench_batch,
        threads(first.bench_trusted_threads),
        threads(first.bench_accelerator_threads),
        first
            .bench_steps
            .map_or(String::new(), |s| format!(", {s} timed step(s) after 1 warm-up")),
        first
            .layers
            .iter()
            .map(|l| l.to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
    println!(
        "  {:<22} {:<16} {:>5} {:>8} {:>6} {:>8} {:>8} {:>9} {:>8} {:>8} {:>6} {:>8} {:>6}",
        "policy",
        "ranks",
        "nsr",
        "speedup",
        "wall",
        "rel_mi",
        "edge_xs",
        "ssim_gain",
        "atk_ssim",
        "atk_psnr",
        "hides",
        "acc_cost",
        "pareto"
    );
    for e in entries {
        let ranks: Vec<String> = e.ranks.iter().map(|r| r.to_string()).collect();
        println!(
            "  {:<22} {:<16} {:>5} {:>7.2}× {:>6} {:>8} {:>8} {:>9} {:>8} {:>8} {:>6} {:>8} {:>6}",
            e.label,
            ranks.join("/"),
            e.nsr,
            e.trusted_speedup,
            e.wall_speedup.map_or("-".into(), |w| format!("{w:.2}×")),
            fmt_opt(e.max_rel_mi, 4),
            fmt_opt(e.max_edge_excess, 3),
            fmt_opt(e.max_ssim_gain, 3),
            fmt_opt(e.attack_ssim, 3),
            fmt_opt(e.attack_psnr_db, 2),
            e.hides.map_or("-", |h| if h { "yes" } else { "no" }),
            e.accuracy_cost
                .map_or("-".into(), |c| format!("{:.2}%", c * 100.0)),
            if e.pareto { "*" } else { "" }
        );
    }
    println!(
        "  speedup: the trusted runtime's time in trusted-only mode over its time in split mode; rel_mi, edge_xs \
         (edge SSIM over chance), ssim_gain and the attack's SSIM/PSNR: the largest over the measured convs; \
         hides: edge_xs < {EDGE_SSIM_RECOGNISABLE}, ssim_gain < {SSIM_GAIN_RECOGNISABLE} and rel_mi <= \
         {REL_MI_HIDES}; acc_cost: --tradeoff's test accuracy at nsr 0 less at this nsr; pareto (*): no other \
         point is both at least as fast and at most as leaky (max(edge_xs, ssim_gain))."
    );
}

/// frontier.png: speedup against leakage, one point per policy and nsr.
pub(crate) fn plot(path: &Path, entries: &[FrontierEntry], model: &str) -> Result<()> {
    let pts: Vec<&FrontierEntry> = entries
        .iter()
        .filter(|e| e.trusted_speedup.is_finite() && e.leakage.is_some_and(f64::is_finite))
        .collect();
    if pts.is_empty() {
        return Ok(());
    }
    let title = match entries.first() {
        Some(e) => format!(
            "Privacy–speed frontier: {model}, inference, batch {}",
            e.bench_batch
        ),
        None => format!("Privacy–speed frontier: {model}"),
    };
    Ok(draw::frontier(path, &pts, &title)?)
}

/// The frontier plot, drawn with plotters and the bundled font (as `crate::plot`).
mod draw {
    use super::FrontierEntry;
    use crate::plot::{padded_by as padded, render, DrawResult, PlotError, FONT, PALETTE};
    use plotters::prelude::*;
    use std::path::Path;

    const SIZE: (u32, u32) = (1100, 700);
    const THRESHOLD: f64 = super::EDGE_SSIM_RECOGNISABLE;

    /// Draws the plot; drawing errors and (defensively) a panic inside plotters become an error.
    pub(super) fn frontier(
        path: &Path,
        pts: &[&FrontierEntry],
        title: &str,
    ) -> Result<(), PlotError> {
        render(path, || draw(path, pts, title))
    }

    fn draw(path: &Path, pts: &[&FrontierEntry], title: &str) -> DrawResult {
        let xy = |e: &FrontierEntry| (e.trusted_speedup, e.leakage.unwrap_or(0.0));
        let xs = pts.iter().map(|e| e.trusted_speedup);
        let ys = pts.iter().map(|e| xy(e).1);
        let (x_lo, x_hi) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
        let (y_lo, y_hi) = ys
            .chain([0.0, THRESHOLD])
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
                (a.min(v), b.max(v))
            });
        // Room on the right for the labels.
        let (x0, x1) = padded(x_lo, x_hi, 0.08, 0.3);
        let (y0, y1) = padded(y_lo, y_hi, 0.08, 0.1);

        let root = BitMapBackend::new(path, SIZE).into_drawing_area();
        root.fill(&WHITE)?;
        let body = root.titled(title, (FONT, 22))?;
        let mut chart = ChartBuilder::on(&body)
            .margin(14)
            .margin_right(28)
            .x_label_area_size(50)
            .y_label_area_size(80)
            .build_cartesian_2d(x0..x1, y0..y1)?;
        chart
            .configure_mesh()
            .x_desc("trusted runtime's speedup over trusted-only (×)")
            .y_desc("worst-layer leakage: max(edge_excess, ssim_gain)")
            .axis_desc_style((FONT, 16))
            .label_style((FONT, 13))
            .light_line_style(RGBColor(238, 238, 238))
            .bold_line_style(RGBColor(215, 215, 215))
            .x_labels(10)
            .y_labels(10)
            .draw()?;

        let red = RGBColor(200, 30, 30);
        chart
            .draw_series(DashedLineSeries::new(
                vec![(x0, THRESHOLD), (x1, THRESHOLD)],
                10,
                6,
                red.stroke_width(2),
            ))?
            .label(format!("recognisable from {THRESHOLD}"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x - 8, y), (x + 16, y)], red.stroke_width(2))
            });

        let mut front: Vec<(f64, f64)> = pts.iter().filter(|e| e.pareto).map(|e| xy(e)).collect();
        front.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)));
        chart
            .draw_series(LineSeries::new(front, BLACK.stroke_width(2)))?
            .label("Pareto set (filled markers)")
            .legend(|(x, y)| {
                EmptyElement::at((x, y))
                    + PathElement::new(vec![(-8, 0), (16, 0)], BLACK.stroke_width(2))
                    + Circle::new((4, 0), 4, BLACK.filled())
            });

        // One colour per policy, in order of first appearance.
        let mut policies: Vec<&str> = Vec::new();
        for e in pts {
            if !policies.contains(&e.label.as_str()) {
                policies.push(&e.label);
            }
        }
        let colour = |e: &FrontierEntry| {
            let i = policies.iter().position(|p| *p == e.label).unwrap_or(0);
            PALETTE[i % PALETTE.len()]
        };
        for (i, p) in policies.iter().enumerate() {
            let c = PALETTE[i % PALETTE.len()];
            let mine: Vec<&&FrontierEntry> = pts.iter().filter(|e| e.label == *p).collect();
            chart
                .draw_series(mine.iter().map(|e| {
                    let style = if e.pareto {
                        c.filled()
                    } else {
                        c.stroke_width(2)
                    };
                    Circle::new(xy(e), 6, style)
                }))?
                .label(p.to_string())
                .legend(move |(x, y)| Circle::new((x + 4, y), 5, c.filled()));
        }

        // Labels beside the points, moved down or up when they would overlap another.
        let mut placed: Vec<(i32, i32, i32, i32)> = Vec::new();
        let mut order: Vec<&&FrontierEntry> = pts.iter().collect();
        order.sort_by(|a, b| xy(b).1.total_cmp(&xy(a).1));
        for e in order {
            let text = format!("{} nsr {}", e.label, e.nsr);
            let (px, py) = chart.backend_coord(&xy(e));
            let w = (text.chars().count() as f64 * 6.6) as i32 + 4;
            let h = 16;
            let overlaps = |x: i32, y: i32, placed: &[(i32, i32, i32, i32)]| {
                placed
                    .iter()
                    .any(|&(a, b, c, d)| x < c && x + w > a && y < d && y + h > b)
            };
            let x = px + 10;
            let mut y = py - h / 2;
            for k in 1..40 {
                if !overlaps(x, y, &placed) {
                    break;
                }
                let step = (k + 1) / 2 * (h + 1);
                y = py - h / 2 + if k % 2 == 1 { step } else { -step };
            }
            placed.push((x, y, x + w, y + h));
            if (y + h / 2 - py).abs() > h / 2 {
                root.draw(&PathElement::new(
                    vec![(px + 6, py), (x - 1, y + h / 2)],
                    colour(e).mix(0.6).stroke_width(1),
                ))?;
            }
            root.draw(&Rectangle::new(
                [(x - 2, y), (x + w, y + h)],
                WHITE.mix(0.8).filled(),
            ))?;
            root.draw(&Text::new(
                text,
                (x, y + 1),
                (FONT, 13).into_font().color(&colour(e)),
            ))?;
        }

        // The legend in the corner with the fewest points.
        let corners = [
            (SeriesLabelPosition::UpperRight, (0.6, 1.0), (0.6, 1.0)),
            (SeriesLabelPosition::UpperLeft, (0.0, 0.4), (0.6, 1.0)),
            (SeriesLabelPosition::LowerRight, (0.6, 1.0), (0.0, 0.4)),
            (SeriesLabelPosition::LowerLeft, (0.0, 0.4), (0.0, 0.4)),
        ];
        let norm = |(x, y): (f64, f64)| ((x - x0) / (x1 - x0), (y - y0) / (y1 - y0));
        let count = |(xa, xb): (f64, f64), (ya, yb): (f64, f64)| {
            pts.iter()
                .map(|e| norm(xy(e)))
                .filter(|&(x, y)| x >= xa && x <= xb && y >= ya && y <= yb)
                .count()
        };
        let pos = corners
            .iter()
            .min_by_key(|(_, xr, yr)| count(*xr, *yr))
            .map_or(SeriesLabelPosition::UpperRight, |c| c.0.clone());
        chart
            .configure_series_labels()
            .position(pos)
            .margin(10)
            .label_font((FONT, 14))
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(215, 215, 215))
            .draw()?;
        root.present()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pareto_set() {
        // (speedup, leakage): b is faster and less leaky than a; c is the fastest; d ties b; e has no leakage.
        let pts = [
            (1.5, Some(0.3)),
            (2.0, Some(0.2)),
            (3.0, Some(0.5)),
            (2.0, Some(0.2)),
            (4.0, None),
            (1.0, Some(0.05)),
            (2.0, Some(0.25)),
        ];
        assert_eq!(
            pareto(&pts),
            vec![false, true, true, true, false, true, false]
        );
        assert!(pareto(&[]).is_empty());
        assert_eq!(pareto(&[(f64::NAN, Some(0.1))]), vec![false]);
    }

    #[test]
    fn hiding_threshold() {
        assert_eq!(hides(Some(0.01), Some(0.05), Some(0.02)), Some(true));
        assert_eq!(hides(Some(0.02), Some(0.05), None), Some(true));
        assert_eq!(hides(Some(0.03), Some(0.05), Some(0.02)), Some(false));
        assert_eq!(hides(Some(0.01), Some(0.1), Some(0.02)), Some(false));
        assert_eq!(hides(Some(0.01), Some(0.05), Some(0.1)), Some(false));
        assert_eq!(hides(Some(0.01), None, Some(0.02)), None);
    }

    fn row(model: &str, mode: &str, rank: &str, trusted_s: f64) -> Value {
        serde_json::json!({"model": model, "phase": "infer", "mode": mode, "rank": rank, "batch": 8,
            "input_size": 32, "trusted_s": trusted_s, "median_s": trusted_s * 1.5, "trusted_threads": 1,
            "accelerator_threads": 1})
    }

    #[test]
    fn speeds_from_bench_rows() {
        let policies = policies(&["asym1".parse().unwrap(), "fixed:2".parse().unwrap()]).unwrap();
        let rows = vec![
            row("vgg-small", "trusted-only", "", 2.0),
            row("vgg-small", "split", "asym1", 0.5),
            row("vgg-small", "split", "fixed:2", 1.0),
            row("vgg16-cifar", "split", "asym1", 9.0),
        ];
        let s = speeds_from_rows(&rows, "vgg-small", 32, &policies, "b.json").unwrap();
        assert_eq!(s.len(), 2);
        assert!((s[0].trusted_speedup - 4.0).abs() < 1e-12);
        assert!((s[1].trusted_speedup - 2.0).abs() < 1e-12);
        assert_eq!(s[0].wall_speedup, Some(4.0));
        // A policy without a row, another size, or no trusted-only row: a clear error.
        let err = speeds_from_rows(&rows[..2], "vgg-small", 32, &policies, "b.json").unwrap_err();
        assert!(err.to_string().contains("'fixed:2'"), "{err}");
        let err = speeds_from_rows(&rows, "vgg-small", 64, &policies, "b.json").unwrap_err();
        assert!(err.to_string().contains("at 64 px"), "{err}");
        let err = speeds_from_rows(&rows[1..], "vgg-small", 32, &policies, "b.json").unwrap_err();
        assert!(err.to_string().contains("trusted-only"), "{err}");
    }

    #[test]
    fn same_policies() {
        let p = |s: &str| s.parse::<RankArg>().unwrap();
        assert!(same_policy(&p("asym1"), &p("energy:0.97")));
        assert!(!same_policy(&p("asym1"), &p("asym2")));
        assert!(!same_policy(&p("fixed:2"), &p("fixed:3")));
    }

    #[test]
    fn default_policy_labelled_once() {
        let default: RankArg = DEFAULT_RANK.parse().unwrap();
        let ranks: Vec<RankArg> = vec![
            "fixed:3".parse().unwrap(),
            default.clone(),
            "fixed:3".parse().unwrap(),
        ];
        let p = policies(&ranks).unwrap();
        assert_eq!(p.len(), 2);
        assert!(!p[0].default && p[1].default);
        assert_eq!(p[1].label, format!("default ({})", default.text));
    }
}
