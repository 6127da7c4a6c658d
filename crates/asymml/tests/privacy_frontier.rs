//! `asymml privacy --frontier` end to end on the embedded Fashion-MNIST sample with vgg-small: one frontier
//! entry per rank policy (the default policy included) and noise level, finite speedups timed by the bench
//! module, frontier.png; and the speedups read from a bench.json instead, with a clear error for a missing row.

use std::path::Path;

mod common;
use common::asymml;

/// Tiny privacy settings: 4 private and 8 public images, two convs measured, the second attacked by ridge.
const TINY: &[&str] = &[
    "privacy",
    "--samples",
    "4",
    "--public",
    "8",
    "--nsr",
    "0,0.5",
    "--layers",
    "0,1",
    "--attack-layers",
    "1",
    "--decoders",
    "ridge",
    "--kernel-sizes",
    "1",
    "--mi-points",
    "256",
    "--frontier",
    "--json",
];

fn run_json(extra: &[&str]) -> serde_json::Value {
    let args: Vec<&str> = TINY.iter().chain(extra).copied().collect();
    let o = asymml(&args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success(),
        "asymml privacy --frontier failed: {err}"
    );
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("bad JSON ({e}): {err}"))
}

fn is_png(path: &Path) -> bool {
    std::fs::read(path).is_ok_and(|b| b.starts_with(b"\x89PNG\r\n\x1a\n"))
}

#[test]
fn frontier_timed_on_fashion_mnist() {
    let out = tempfile::tempdir().unwrap();
    let r = run_json(&[
        "--ranks",
        "fixed:2,fixed:3",
        "--frontier-steps",
        "1",
        "--batch-size",
        "4",
        "--out",
        out.path().to_str().unwrap(),
    ]);
    let f = r["frontier"].as_array().expect("a frontier array");
    // The two policies given and the default policy (unless it is one of them), each at both noise levels.
    let mut policies: Vec<&str> = f.iter().map(|e| e["policy"].as_str().unwrap()).collect();
    policies.dedup();
    assert!(policies.contains(&"fixed:2") && policies.contains(&"fixed:3"));
    assert!(policies.len() == 2 || policies.len() == 3, "{policies:?}");
    assert_eq!(f.len(), policies.len() * 2);
    let defaults: Vec<&serde_json::Value> = f.iter().filter(|e| e["default"] == true).collect();
    assert_eq!(defaults.len(), 2, "the default policy at both nsr");
    assert!(defaults[0]["label"]
        .as_str()
        .unwrap()
        .starts_with("default ("));
    for p in &policies {
        let mut nsr: Vec<f64> = f
            .iter()
            .filter(|e| e["policy"] == *p)
            .map(|e| e["nsr"].as_f64().unwrap())
            .collect();
        nsr.sort_by(f64::total_cmp);
        assert_eq!(nsr, vec![0.0, 0.5], "{p}");
    }
    for e in f {
        let s = e["trusted_speedup"].as_f64().unwrap();
        assert!(s.is_finite() && s > 0.0, "{e}");
        assert_eq!(e["bench_source"], "timed");
        assert_eq!(e["bench_batch"], 4);
        assert_eq!(e["bench_trusted_threads"], 1);
        assert_eq!(e["layers"], serde_json::json!([0, 1]));
        // The leakage is the report's own: the worst over convs 0 and 1 of this policy and nsr.
        let worst_edge = r["settings"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| {
                s["stream"] == "x_u" && s["rank_policy"] == e["policy"] && s["nsr"] == e["nsr"]
            })
            .filter_map(|s| s["edge_excess"].as_f64())
            .fold(f64::NEG_INFINITY, f64::max);
        assert_eq!(e["max_edge_excess"].as_f64().unwrap(), worst_edge, "{e}");
        let leak = e["leakage"].as_f64().unwrap();
        assert!(leak >= worst_edge, "{e}");
        // A policy that keeps every measured conv trusted (the default guard on this 28 px model) sends
        // nothing to attack: its gain is 0 and it has no attack scores.
        assert!(e["max_ssim_gain"].is_f64(), "{e}");
        assert!(
            e["attack_ssim"].is_f64() || e["max_ssim_gain"].as_f64() == Some(0.0),
            "{e}"
        );
        assert!(e["hides"].is_boolean(), "{e}");
        assert!(e["accuracy_cost"].is_null(), "no --tradeoff: {e}");
    }
    assert!(f.iter().any(|e| e["pareto"] == true));
    assert!(is_png(&out.path().join("frontier.png")));
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("privacy.json")).unwrap()).unwrap();
    assert_eq!(saved["frontier"].as_array().unwrap().len(), f.len());
}

#[test]
fn frontier_from_a_bench_file() {
    let dir = tempfile::tempdir().unwrap();
    let row = |mode: &str, rank: &str, t: f64| {
        serde_json::json!({"model": "vgg-small", "phase": "infer", "mode": mode, "rank": rank, "batch": 8,
            "input_size": 28, "median_s": t, "trusted_s": t, "trusted_threads": 1, "accelerator_threads": 1})
    };
    let file = dir.path().join("bench.json");
    let write = |rows: Vec<serde_json::Value>| {
        std::fs::write(&file, serde_json::json!({ "results": rows }).to_string()).unwrap();
    };
    let run = |ranks: &str| {
        let args = ["--ranks", ranks, "--frontier-bench", file.to_str().unwrap()];
        asymml(&TINY.iter().chain(&args).copied().collect::<Vec<_>>())
    };
    // Without a row for the default policy (which the frontier always includes): a clear error naming it,
    // before any measurement.
    write(vec![
        row("trusted-only", "", 1.0),
        row("split", "fixed:2", 0.4),
    ]);
    let o = run("fixed:2");
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success());
    let marker = "no inference row of vgg-small at 28 px in split mode with rank policy '";
    let at = err.find(marker).unwrap_or_else(|| panic!("{err}")) + marker.len();
    let default = err[at..].split('\'').next().unwrap().to_string();
    assert_ne!(default, "fixed:2", "{err}");
    // With it: the speedups are the file's (trusted-only's trusted time over the split's).
    write(vec![
        row("trusted-only", "", 1.0),
        row("split", "fixed:2", 0.4),
        row("split", &default, 0.5),
    ]);
    let o = run("fixed:2");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let f = r["frontier"].as_array().unwrap();
    assert_eq!(f.len(), 4, "two policies at two nsr");
    for e in f {
        let want = if e["policy"] == "fixed:2" { 2.5 } else { 2.0 };
        assert!(
            (e["trusted_speedup"].as_f64().unwrap() - want).abs() < 1e-9,
            "{e}"
        );
        assert_eq!(e["bench_source"], file.to_str().unwrap());
        assert!(e["bench_steps"].is_null());
    }
    assert!(f
        .iter()
        .any(|e| e["policy"] == default.as_str() && e["default"] == true));
}
