//! `asymml privacy` end to end: on the 20 real CIFAR-10 images of ../shared/data (the test fails, saying so,
//! when they are missing) and on the embedded Fashion-MNIST sample.

use std::path::{Path, PathBuf};
use std::process::Output;

mod common;
use common::asymml;

fn cifar_images() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/images/cifar10");
    assert!(
        dir.is_dir(),
        "this test needs the 20 CIFAR-10 images of ../shared/data/images/cifar10 (missing: {})",
        dir.display()
    );
    dir
}

fn report(o: &Output) -> serde_json::Value {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "asymml privacy failed: {err}");
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("bad JSON ({e}): {err}"))
}

fn find<'a>(r: &'a serde_json::Value, stream: &str, rank: &str, nsr: f64) -> &'a serde_json::Value {
    r["settings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| {
            s["stream"] == stream
                && s["layer"] == 0
                && s["rank_policy"] == rank
                && (s["nsr"].as_f64().unwrap() - nsr).abs() < 1e-6
        })
        .unwrap_or_else(|| panic!("no {stream} {rank} nsr {nsr} entry"))
}

#[test]
fn cifar_images_first_conv_leakage_attacks_and_plots() {
    let out = tempfile::tempdir().unwrap();
    let images = cifar_images();
    let o = asymml(&[
        "privacy",
        "--images",
        images.to_str().unwrap(),
        "--ranks",
        "schedule,fixed:3",
        "--nsr",
        "0,0.2",
        "--layers",
        "0",
        "--attack-layers",
        "0",
        "--decoders",
        "ridge",
        "--kernel-sizes",
        "1,3,5",
        "--mi-points",
        "1024",
        "--json",
        "--out",
        out.path().to_str().unwrap(),
    ]);
    let r = report(&o);
    assert_eq!(r["images"], 20);
    assert_eq!(r["attack_private_images"], 10);
    assert_eq!(r["public_images"], 10);
    // Low-rank structure of the RGB images: 3 channels, r = 1 keeps most but not all of the energy.
    let l0 = &r["layers"][0];
    assert_eq!(l0["in_ch"], 3);
    assert_eq!(l0["ranks"]["schedule"], 1);
    assert_eq!(l0["ranks"]["fixed:3"], 3);
    let e1 = l0["energy_curve"][0].as_f64().unwrap();
    assert!(e1 > 0.8 && e1 < 1.0, "energy kept by r = 1: {e1}");
    // Kernel-size study: 1×1 patches have one channel (μ = 0); entropy grows with k.
    let ks: Vec<f64> = r["kernel_study"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["entropy"].as_f64().unwrap())
        .collect();
    assert_eq!(ks[0], 0.0);
    assert!(ks[1] > 0.5 && ks[2] > ks[1], "{ks:?}");

    // X_U at r = 1 leaks some information; noise reduces it; at full rank nothing is sent.
    let s0 = find(&r, "x_u", "schedule", 0.0);
    let s2 = find(&r, "x_u", "schedule", 0.2);
    let full = find(&r, "x_u", "fixed:3", 0.0);
    let (m0, m2) = (
        s0["rel_mi"].as_f64().unwrap(),
        s2["rel_mi"].as_f64().unwrap(),
    );
    assert!(m0 > 0.01 && m0 < 0.3, "rel_mi at r = 1: {m0}");
    assert!(m2 < m0, "noise did not lower the leakage: {m2} vs {m0}");
    assert!(full["rel_mi"].as_f64().unwrap().abs() < 0.005, "{full}");
    assert_eq!(full["energy_kept_light"].as_f64().unwrap(), 1.0);
    let light = s0["energy_kept_light"].as_f64().unwrap();
    assert!(light > 0.5 && light <= s0["energy_kept"].as_f64().unwrap() + 1e-9);
    // ∇Y of the first conv: far below 2 % of I(X;X).
    let dy = find(&r, "dy", "schedule", 0.0);
    assert!(dy["rel_mi"].as_f64().unwrap() < 0.02, "{dy}");

    // Attacks: a ridge decoder inverts X itself (the accelerator without the split) but not X_U.
    let base = r["baselines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["input"] == "x")
        .unwrap();
    let clear = base["attacks"][0]["psnr_db"].as_f64().unwrap();
    let on_xu = s0["psnr_db"].as_f64().unwrap();
    assert!(clear > 35.0, "ridge on X: {clear} dB");
    assert!(
        on_xu < clear - 15.0,
        "ridge on X_U: {on_xu} dB vs {clear} dB"
    );
    let ssim = s0["ssim"].as_f64().unwrap();
    assert!((-1.0..1.0).contains(&ssim));
    // The structural measures: X_U at r = 1 shows the image's edges far above chance; at full rank the
    // accelerator sees nothing, and the SSIM gain over the mean image is reported beside the attack.
    let (edge, chance) = (
        s0["edge_ssim"].as_f64().unwrap(),
        s0["edge_ssim_chance"].as_f64().unwrap(),
    );
    assert!(
        edge > 0.3 && edge > chance + 0.15,
        "edge ssim {edge}, chance {chance}"
    );
    assert!(s0["edge_ssim_max"].as_f64().unwrap() >= edge);
    let full_edge = full["edge_ssim"].as_f64().unwrap();
    assert!(full_edge < 0.15, "edge ssim with nothing sent: {full_edge}");
    let gain = s0["ssim_gain"].as_f64().unwrap();
    assert!((-1.0..=1.0).contains(&gain), "{gain}");

    // fixed:3 keeps all 3 channels of conv 0: nothing is sent, so nothing is attacked and there is no gain.
    assert!(!out.path().join("attack_conv0_fixed_3_nsr0.2.png").exists());
    for f in [
        "privacy.json",
        "spectra.png",
        "energy.png",
        "kernel_entropy.png",
        "leakage.png",
        "attack_conv0_schedule_nsr0.png",
        "edges_conv0_schedule_nsr0.png",
    ] {
        let p = out.path().join(f);
        assert!(
            p.metadata().map(|m| m.len() > 100).unwrap_or(false),
            "{f} missing"
        );
    }
}

#[test]
fn fashion_mnist_tradeoff_and_deeper_layers() {
    let o = asymml(&[
        "privacy",
        "--samples",
        "4",
        "--public",
        "64",
        "--ranks",
        "schedule",
        "--nsr",
        "0,0.1",
        "--layers",
        "all",
        "--attack-layers",
        "1",
        "--decoders",
        "ridge,conv",
        "--decoder-steps",
        "5",
        "--kernel-sizes",
        "3",
        "--mi-points",
        "512",
        "--tradeoff",
        "--tradeoff-train",
        "128",
        "--json",
    ]);
    let r = report(&o);
    let layers = r["layers"].as_array().unwrap();
    assert!(layers.len() >= 3);
    // One grey channel: r = 1 keeps everything at the first conv, so nothing is sent there.
    assert_eq!(layers[0]["in_ch"], 1);
    let s = find(&r, "x_u", "schedule", 0.0);
    assert_eq!(s["energy_kept_light"].as_f64().unwrap(), 1.0);
    assert!(r["notes"][0]
        .as_str()
        .unwrap()
        .contains("one input channel"));
    // Every measured layer has an entry, the attacked one carries both decoders' results.
    let settings = r["settings"].as_array().unwrap();
    for l in 0..layers.len() {
        assert!(settings
            .iter()
            .any(|s| s["layer"] == l && s["stream"] == "x_u"));
    }
    let attacked = settings
        .iter()
        .find(|s| s["layer"] == 1 && s["stream"] == "x_u" && s["nsr"] == 0.0)
        .unwrap();
    assert_eq!(attacked["attacks"].as_array().unwrap().len(), 2);
    assert!(attacked["psnr_db"].as_f64().unwrap() > 0.0);
    // The trade-off: one run per nsr with an accuracy and the first conv's leakage.
    let t = r["tradeoff"].as_array().unwrap();
    assert_eq!(t.len(), 2);
    for e in t {
        let acc = e["test_acc"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc));
        assert_eq!(e["train_images"], 128);
        assert!(e["rel_mi"].is_number());
        // Grey images: nothing leaves at the first conv, the largest leakage is deeper.
        assert!(e["max_rel_mi"].as_f64().unwrap() >= e["rel_mi"].as_f64().unwrap());
        assert!(e["max_rel_mi_layer"].as_u64().unwrap() >= 1);
    }
}

#[test]
fn bad_privacy_flags_fail_cleanly() {
    for (args, needle) in [
        (vec!["--nsr", "-1"], "--nsr"),
        (vec!["--layers", "99"], "does not exist"),
        (vec!["--ranks", "bogus"], "--ranks"),
        (vec!["--decoders", "gan"], "--decoders"),
        (vec!["--attack-layers", "x"], "--attack-layers"),
        (vec!["--dataset", "bogus"], "--dataset"),
        (vec!["--tradeoff-rank", "fixed:0"], "--tradeoff-rank"),
        (vec!["--kernel-sizes", "4"], "odd"),
        (vec!["--images", "/nonexistent/images"], "nonexistent"),
        (vec!["--target", "psnr=3"], "--target"),
        (vec!["--target", "edge-ssim"], "--target"),
        (
            vec!["--ranks", "table:/nonexistent/table.json"],
            "rank table",
        ),
        (vec!["--ranks", "table:"], "table:FILE"),
    ] {
        let mut all = vec!["privacy", "--samples", "2"];
        all.extend(args);
        let o = asymml(&all);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{all:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(
            err.contains(needle),
            "{all:?}: stderr lacks {needle}: {err}"
        );
    }
}

/// `--calibrate` writes a rank table that `privacy` and `verify` accept as `--rank table:FILE`; a table that
/// does not fit the model is refused with the conv names.
#[test]
fn calibrated_rank_table_end_to_end() {
    let out = tempfile::tempdir().unwrap();
    let images = cifar_images();
    let table = out.path().join("table.json");
    let o = asymml(&[
        "privacy",
        "--images",
        images.to_str().unwrap(),
        "--samples",
        "8",
        "--calibrate",
        "--target",
        "edge-ssim=0.3,rel-mi=0.02",
        "--layers",
        "0,1",
        "--decoders",
        "none",
        "--nsr",
        "0",
        "--mi-points",
        "512",
        "--table-out",
        table.to_str().unwrap(),
        "--json",
    ]);
    let r = report(&o);
    let layers = r["layers"].as_array().unwrap();
    // The first conv: r = 1 and 2 of 3 leave the colour-difference picture, so the calibration probes both
    // and chooses the trusted route (null) or a passing rank; every probe below the choice failed.
    for l in &layers[..2] {
        assert_eq!(l["calibrated"], true);
        let probes = l["probes"].as_array().unwrap();
        assert!(!probes.is_empty(), "{l}");
        let chosen = l["rank"].as_u64();
        for p in probes {
            let r = p["rank"].as_u64().unwrap();
            let pass = p["pass"].as_bool().unwrap();
            let under =
                p["edge_excess"].as_f64().unwrap() < 0.3 && p["rel_mi"].as_f64().unwrap() < 0.02;
            assert_eq!(pass, under, "{p}");
            match chosen {
                Some(c) if r < c => assert!(!pass, "{l}"),
                Some(c) if r == c => assert!(pass, "{l}"),
                None => assert!(!pass, "{l}"),
                _ => {}
            }
        }
    }
    assert!(layers[2..]
        .iter()
        .all(|l| l["calibrated"] == false && l["rank"].as_u64().unwrap() >= 1));
    let t: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&table).unwrap()).unwrap();
    assert_eq!(t["layers"].as_array().unwrap().len(), layers.len());
    let spec = format!("table:{}", table.display());

    // privacy measures the table's setting.
    let o = asymml(&[
        "privacy",
        "--images",
        images.to_str().unwrap(),
        "--samples",
        "4",
        "--ranks",
        &spec,
        "--nsr",
        "0",
        "--layers",
        "1",
        "--decoders",
        "none",
        "--mi-points",
        "256",
        "--kernel-sizes",
        "3",
        "--json",
    ]);
    let r = report(&o);
    assert!(r["settings"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["rank_policy"] == spec.as_str()));

    // verify accepts it for the same model (vgg-small, 3 channels, 32 px).
    let o = asymml(&[
        "verify",
        "--model",
        "vgg-small",
        "--input-size",
        "32",
        "--batch",
        "2",
        "--rank",
        &spec,
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !err.contains("rank table"),
        "verify refused the table: {err}"
    );

    // A table missing a conv is refused, naming it.
    let mut bad = t.clone();
    let missing = bad["layers"][1]["conv"].as_str().unwrap().to_string();
    bad["layers"].as_array_mut().unwrap().remove(1);
    let bad_path = out.path().join("bad.json");
    std::fs::write(&bad_path, bad.to_string()).unwrap();
    let bad_spec = format!("table:{}", bad_path.display());
    for args in [
        vec![
            "privacy",
            "--images",
            images.to_str().unwrap(),
            "--samples",
            "2",
            "--ranks",
            &bad_spec,
        ],
        vec![
            "verify",
            "--model",
            "vgg-small",
            "--input-size",
            "32",
            "--batch",
            "2",
            "--rank",
            &bad_spec,
        ],
    ] {
        let o = asymml(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success(),
            "{args:?} accepted a table without {missing}"
        );
        assert!(
            err.contains("rank table") && err.contains(&missing),
            "{args:?}: {err}"
        );
    }
}
