//! `vgg-small` trained for one epoch on the full Fashion-MNIST (60,000 images, ../shared/data) reaches ≥ 85 %
//! test accuracy in trusted-only mode and in split mode (with the paper's `schedule`, so the residuals really go
//! to the accelerator), for seeds 0, 1 and 2, and split's mean accuracy over the seeds is trusted-only's within
//! 0.3 %. Takes a few minutes on 2 cores, so it is ignored by default; `.ci/run` runs it explicitly.

use std::path::PathBuf;
use std::process::Command;

fn one_epoch(mode: &str, seed: u64) -> f64 {
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/fashion-mnist");
    assert!(
        data.join("train-images-idx3-ubyte.gz").is_file(),
        "the real Fashion-MNIST is missing: expected it at {} (../shared/data beside the repository)",
        data.display()
    );
    let out = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_asymml"))
        .args([
            "train",
            "--model",
            "vgg-small",
            "--dataset",
            "fashion-mnist",
            "--epochs",
            "1",
            "--json",
        ])
        .args(["--mode", mode])
        // The paper's schedule: under the default guard every conv of this 28 px model stays trusted, and
        // split would be trusted-only by another name. `--route split` keeps every conv split: with `auto`
        // the routes depend on timings, and each route's different rounding makes one epoch's accuracy
        // wander by a few tenths of a percent (measured: 89.42 % with `split`, 89.09 % with `auto`, against
        // 89.55 % trusted-only).
        .args(["--rank", "schedule", "--route", "split"])
        .args(["--seed", &seed.to_string()])
        .arg("--data-dir")
        .arg(&data)
        .arg("--out")
        .arg(out.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let acc = m["test_acc"].as_f64().unwrap();
    println!(
        "vgg-small, 1 epoch on Fashion-MNIST, {mode}, seed {seed}: test accuracy {:.2}% ({:.0} s)",
        acc * 100.0,
        m["seconds"]
    );
    acc
}

#[test]
#[ignore = "about 5 minutes; run with --ignored (.ci/run does)"]
fn vgg_small_one_epoch_full_fashion_mnist() {
    // Split is trusted-only's arithmetic up to float32 rounding, but one epoch is chaotic in that rounding: a
    // change of the order of 1e-7 in ∇W_T (V made again for the backward) moved seed 0's split accuracy from
    // 89.29 % to 89.15 % (trusted-only 89.55 %), while seeds 1 and 2 ended 0.14 % above and 0.05 % below
    // trusted-only. So the seeds' mean is compared.
    let (mut trusted, mut split) = (0.0, 0.0);
    for seed in 0..3 {
        let t = one_epoch("trusted-only", seed);
        assert!(
            t >= 0.85,
            "seed {seed}: trusted-only test accuracy {t} < 0.85"
        );
        let s = one_epoch("split", seed);
        assert!(s >= 0.85, "seed {seed}: split test accuracy {s} < 0.85");
        trusted += t / 3.0;
        split += s / 3.0;
    }
    println!(
        "mean over seeds 0–2: trusted-only {:.2}%, split {:.2}%",
        trusted * 100.0,
        split * 100.0
    );
    assert!(
        (split - trusted).abs() <= 0.003,
        "mean split {split} vs trusted-only {trusted}: more than 0.3 % apart"
    );
}
