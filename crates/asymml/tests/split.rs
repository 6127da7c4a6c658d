//! The split runtime against trusted-only: `asymml verify` (one SGD step, every policy, every transport),
//! and the split training loop end to end.

use std::path::Path;
use std::process::{Command, Output};

mod common;

fn asymml(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_asymml"))
        .args(args)
        .output()
        .expect("run asymml")
}

fn verify(model: &str, rank: &str, accel: &str) -> serde_json::Value {
    verify_with(model, rank, accel, &[])
}

/// Key pairs for a `tcp://` accelerator (`asymml keygen`) in a fresh folder; the folder lives as long as
/// the returned guard.
fn keygen() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let o = asymml(&["keygen", "--out", keys.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let keys = keys.to_str().unwrap().to_string();
    (dir, keys)
}

/// `asymml verify --json` with more flags: asserts exit code 0 and returns its JSON.
fn verify_with(model: &str, rank: &str, accel: &str, more: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "verify",
        "--model",
        model,
        "--batch",
        "4",
        "--rank",
        rank,
        "--accelerator",
        accel,
        "--json",
    ];
    args.extend_from_slice(more);
    let o = asymml(&args);
    let out = String::from_utf8_lossy(&o.stdout);
    let v: serde_json::Value = serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("{e}: {out} {}", String::from_utf8_lossy(&o.stderr)));
    assert_eq!(o.status.code(), Some(0), "{v}");
    v
}

#[test]
fn split_equals_trusted_only_for_every_policy() {
    for model in ["vgg16", "resnet18"] {
        for rank in POLICIES {
            let v = verify(model, rank, "inproc");
            let err = v["max_rel_err"].as_f64().unwrap();
            assert!(err <= 1e-4, "{model} {rank}: {v}");
        }
    }
}

const POLICIES: [&str; 5] = ["schedule", "asym1", "asym2", "entropy", "fixed:3"];

#[test]
fn split_equals_trusted_only_over_a_process_and_tcp() {
    for model in ["vgg16", "resnet18"] {
        for rank in POLICIES {
            let v = verify(model, rank, "process");
            assert!(
                v["max_rel_err"].as_f64().unwrap() <= 1e-4,
                "process {model} {rank}: {v}"
            );
        }
    }
    // A TCP accelerator served by `asymml accelerator` on a free loopback port (one model state per connection),
    // over mutual TLS.
    let (_dir, keys) = keygen();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = Command::new(env!("CARGO_BIN_EXE_asymml"))
        .args([
            "accelerator",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--accelerator-threads",
            "1",
            "--keys",
            &keys,
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    let addr = format!("tcp://127.0.0.1:{port}");
    for model in ["vgg16", "resnet18"] {
        for rank in POLICIES {
            let v = verify_with(model, rank, &addr, &["--keys", &keys]);
            assert!(
                v["max_rel_err"].as_f64().unwrap() <= 1e-4,
                "tcp {model} {rank}: {v}"
            );
        }
    }
    let _ = server.kill();
    let _ = server.wait();
}

#[test]
fn micro_batched_split_equals_trusted_only() {
    // In-process every part is sent at once; over a child process's Unix socket one part is outstanding at
    // a time. Batch 4 in 3 parts (2 + 1 + 1 samples); the energy policy chooses a rank per part.
    for (accel, model, rank, integrity) in [
        ("inproc", "vgg16", "schedule", "on"),
        ("inproc", "vgg16", "asym1", "off"),
        ("inproc", "resnet18", "asym1", "on"),
        ("inproc", "resnet18", "fixed:3", "off"),
        ("process", "vgg16", "asym1", "on"),
        ("process", "resnet18", "schedule", "on"),
    ] {
        let more = [
            "--micro-batches",
            "3",
            "--route",
            "split",
            "--integrity",
            integrity,
        ];
        let v = verify_with(model, rank, accel, &more);
        assert!(
            v["max_rel_err"].as_f64().unwrap() <= 1e-4,
            "{accel} {model} {rank} integrity {integrity}: {v}"
        );
    }
}

#[test]
fn pipelined_and_whole_backwards_equal_trusted_only() {
    // The pipelined backward (the default: ∇X first, ∇W_U taken at the next split conv) and the one-exchange
    // backward, in process and over a child process's Unix socket (where the order of the exchanges must not
    // leave both sides writing at once).
    for accel in ["inproc", "process"] {
        for model in ["vgg16", "resnet18"] {
            for more in [&[][..], &["--no-pipelined-backward"][..]] {
                let v = verify_with(model, "schedule", accel, more);
                assert!(
                    v["max_rel_err"].as_f64().unwrap() <= 1e-4,
                    "{accel} {model} {more:?}: {v}"
                );
            }
        }
    }
}

#[test]
fn shared_basis_split_equals_trusted_only() {
    for model in ["vgg16", "resnet18"] {
        for rank in ["schedule", "asym2", "fixed:3"] {
            let v = verify_with(model, rank, "inproc", &["--shared-basis"]);
            assert!(
                v["max_rel_err"].as_f64().unwrap() <= 1e-4,
                "{model} {rank}: {v}"
            );
        }
    }
}

#[test]
fn unreachable_accelerator_is_a_clear_error() {
    let o = asymml(&[
        "verify",
        "--model",
        "vgg16",
        "--batch",
        "4",
        "--accelerator",
        "tcp://127.0.0.1:1",
        "--insecure-plaintext-tcp",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("connecting to the accelerator"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let o = asymml(&["verify", "--rank", "energy:1.5"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn split_training_runs_and_records_its_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("s");
    let o = asymml(&[
        "train",
        "--mode",
        "split",
        "--limit-train",
        "256",
        "--epochs",
        "1",
        "--json",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        m["test_acc"].as_f64().unwrap() >= 0.2,
        "twice chance expected: {m}"
    );
    // Where the convs ran: the default model's convs, each split or trusted.
    let routes = &m["routes"];
    let (split, trusted) = (
        routes["split"].as_u64().unwrap(),
        routes["trusted"].as_u64().unwrap(),
    );
    assert!(split + trusted >= 2, "{m}");
    assert!(routes["all_trusted_by_check"].is_boolean(), "{m}");
    assert!(out.join("model.safetensors").is_file());
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn serve_accelerator(port: u16, keys: &str) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_asymml"))
        .args([
            "accelerator",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--accelerator-threads",
            "1",
            "--keys",
            keys,
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn killing_the_accelerator_mid_training_is_a_clear_error_and_resume_continues() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let (_dir, keys) = keygen();
    let port = free_port();
    let mut server = serve_accelerator(port, &keys);
    let addr = format!("tcp://127.0.0.1:{port}");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "train",
            "--accelerator",
            &addr,
            "--keys",
            &keys,
            "--epochs",
            "6",
            // A policy that splits, on the split route: under the default guard every conv of a 28 px model
            // runs trusted, and so may the auto route's choice; the accelerator is then not needed after the
            // connection, and a kill goes unnoticed.
            "--rank",
            "schedule",
            "--route",
            "split",
            "--json",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    // Wait for the server to listen.
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    // That probe connection is served and closed at once; now start training.
    let train = Command::new(env!("CARGO_BIN_EXE_asymml"))
        .args(args(&[
            "--limit-train",
            "1024",
            "--batch-size",
            "32",
            "--out",
            out.to_str().unwrap(),
        ]))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Kill the accelerator once the first epoch's checkpoint is written.
    let metrics = out.join("metrics.jsonl");
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |s| s.lines().count()) < 1 {
        assert!(t0.elapsed().as_secs() < 300, "no epoch finished");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    server.kill().unwrap();
    server.wait().unwrap();
    let o = train.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("accelerator") && err.contains("epoch"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let done = std::fs::read_to_string(&metrics).unwrap().lines().count();
    assert!((1..6).contains(&done), "{done} epochs before the kill");

    // A new accelerator; --resume continues from the last checkpoint to the end.
    let port = free_port();
    let mut server = serve_accelerator(port, &keys);
    let addr = format!("tcp://127.0.0.1:{port}");
    let mut ok = None;
    for _ in 0..100 {
        let o = asymml(&[
            "train",
            "--resume",
            out.to_str().unwrap(),
            "--epochs",
            "6",
            "--accelerator",
            &addr,
            "--keys",
            &keys,
            "--json",
        ]);
        if o.status.success() {
            ok = Some(o);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = server.kill();
    let _ = server.wait();
    let o = ok.expect("resume failed");
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines.first().unwrap()["epoch"].as_u64().unwrap() as usize,
        done + 1
    );
    assert_eq!(lines.last().unwrap()["epoch"], 6);
    assert_eq!(
        std::fs::read_to_string(&metrics).unwrap().lines().count(),
        6
    );
}

#[test]
fn bench_times_every_mode_and_policy_with_flops_bytes_memory_and_layers() {
    // ResNet in split mode exercises the shortcut conv's shared residual.
    let out = tempfile::tempdir().unwrap();
    let o = asymml(&[
        "bench",
        "--models",
        "resnet18-cifar",
        "--modes",
        "trusted-only,split,untrusted-only",
        "--rank",
        "schedule,asym2",
        "--route",
        "split",
        "--micro-batches",
        "2",
        "--batch-size",
        "2",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--trusted-threads",
        "1",
        "--accelerator-threads",
        "1",
        "--json",
        "--out",
        out.path().to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let rows = v["results"].as_array().unwrap();
    // 2 phases × (trusted-only, split schedule, split asym2, untrusted-only).
    assert_eq!(rows.len(), 8);
    let f = |r: &serde_json::Value, k: &str| r[k].as_f64().unwrap_or_else(|| panic!("{k}: {r}"));
    for r in rows {
        assert!(f(r, "median_s") > 0.0 && f(r, "min_s") <= f(r, "median_s"));
        assert!(f(r, "trusted_s") <= f(r, "median_s") + 1e-9);
        // The trusted time splits into conv work and the rest; every top-level node is timed.
        assert!((f(r, "conv_s") + f(r, "other_s") - f(r, "trusted_s")).abs() < 1e-9);
        assert!(f(r, "conv_s") >= 0.0 && f(r, "other_s") >= 0.0);
        let nodes = r["nodes"].as_array().unwrap();
        if r["mode"] != "untrusted-only" {
            assert_eq!(nodes[0]["name"], "conv1");
            assert!(nodes.iter().any(|n| n["kind"] == "block"));
            let node_sum: f64 = nodes
                .iter()
                .map(|n| f(n, "forward_s") + f(n, "backward_s"))
                .sum();
            assert!(node_sum > 0.0 && node_sum <= f(r, "median_s") + 1e-9, "{r}");
        } else {
            assert!(nodes.is_empty());
        }
        assert!(
            f(r, "trusted_peak_bytes") > 0.0,
            "the counting allocator is installed"
        );
        match r["mode"].as_str().unwrap() {
            "trusted-only" => {
                assert_eq!(r["micro_batches"], 1);
                assert_eq!(r["route"], "");
                assert_eq!(f(r, "bytes_to_untrusted"), 0.0);
                assert!(f(r, "trusted_flops") > 0.0 && f(r, "untrusted_flops") == 0.0);
                assert!(r["conv_gflops"].as_f64().unwrap() > 0.0);
            }
            "split" => {
                // Pipelined: one sample per part; the block SVD unless --svd says otherwise.
                assert_eq!(r["micro_batches"], 2);
                assert_eq!(r["svd"], "block");
                assert_eq!(r["route"], "split");
                assert!(f(r, "bytes_to_untrusted") > 0.0 && f(r, "bytes_from_untrusted") > 0.0);
                assert!(f(r, "untrusted_s") > 0.0);
                assert!(f(r, "overlap_s") >= 0.0);
                assert!(f(r, "accelerator_peak_bytes") > 0.0);
                // The frames, counted apart, hold at least one X_U.
                assert!(f(r, "frames_peak_bytes") > 0.0, "{r}");
                // Conv_T + SVD is cheaper than every conv; the accelerator does every conv's work.
                let bound = f(r, "flop_bound");
                assert!(bound > 1.0, "{r}");
                assert!(f(r, "time_bound") > 0.0);
                for l in r["layers"].as_array().unwrap() {
                    assert!(f(l, "decompose_s") + f(l, "merge_s") <= f(l, "trusted_s") + 1e-9);
                }
                assert!(f(r, "trusted_speedup") > 0.0 && f(r, "slowdown_vs_untrusted_only") > 0.0);
                let layers = r["layers"].as_array().unwrap();
                assert_eq!(layers.len(), 20, "resnet18 has 20 convs");
                let sum: f64 = layers.iter().map(|l| f(l, "trusted_flops")).sum();
                assert!((sum - f(r, "trusted_flops")).abs() <= 1e-6 * sum);
                assert!(layers.iter().all(|l| l["rank"].as_u64().unwrap() >= 1));
                let png = format!(
                    "layers_resnet18-cifar_{}_{}.png",
                    r["phase"].as_str().unwrap(),
                    r["rank"].as_str().unwrap()
                );
                assert!(out.path().join(&png).is_file(), "{png}");
            }
            "untrusted-only" => {
                assert!(f(r, "untrusted_flops") > 0.0 && f(r, "untrusted_s") > 0.0);
            }
            m => panic!("unexpected mode {m}"),
        }
    }
    assert!(out.path().join("bench.json").is_file());
}

#[test]
fn bench_lockstep_lets_the_accelerator_compute_only_while_the_trusted_runtime_waits() {
    // Streamed parts (several requests sent before a reply is read) and the pipelined backward (∇W_U asked
    // for before ∇X's reply is read, taken at the next conv) both go through the held frames.
    let o = asymml(&[
        "bench",
        "--models",
        "resnet18-cifar",
        "--modes",
        "split",
        "--rank",
        "schedule",
        "--route",
        "split",
        "--micro-batches",
        "2",
        "--batch-size",
        "2",
        "--steps",
        "2",
        "--warmup",
        "0",
        "--trusted-threads",
        "1",
        "--accelerator-threads",
        "1",
        "--lockstep",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let rows = v["results"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "infer and train");
    let f = |r: &serde_json::Value, k: &str| r[k].as_f64().unwrap_or_else(|| panic!("{k}: {r}"));
    for r in rows {
        assert_eq!(r["lockstep"], true);
        assert!(
            f(r, "bytes_to_untrusted") > 0.0 && f(r, "untrusted_s") > 0.0,
            "{r}"
        );
        // Each request reaches the accelerator only once the trusted runtime waits for its reply, so all of
        // the accelerator's compute time falls inside the trusted runtime's waits (in every step, so in
        // their medians too).
        assert!(f(r, "untrusted_s") <= f(r, "wait_s") + 1e-3, "{r}");
    }
}

#[test]
fn bench_interleave_times_every_run_and_reports_no_peaks() {
    // Both runs alive at once, their timed steps in turn, over two rounds; an untrusted-only run beside them.
    let o = asymml(&[
        "bench",
        "--models",
        "vgg11-cifar",
        "--modes",
        "trusted-only,split,untrusted-only",
        "--rank",
        "schedule",
        "--route",
        "split",
        "--batch-size",
        "2",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--repeat",
        "2",
        "--phase",
        "infer,train",
        "--trusted-threads",
        "1",
        "--accelerator-threads",
        "1",
        "--interleave",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let rows = v["results"].as_array().unwrap();
    assert_eq!(rows.len(), 6, "three runs, two phases");
    for r in rows {
        assert_eq!(r["interleaved"], true, "{r}");
        // Every session is alive at once: no peak is one run's own.
        for k in [
            "trusted_peak_bytes",
            "accelerator_peak_bytes",
            "frames_peak_bytes",
        ] {
            assert!(r[k].is_null(), "{k}: {r}");
        }
        assert!(r["median_s"].as_f64().unwrap() > 0.0, "{r}");
        if r["mode"] == "split" {
            // Its own accelerator answered it, and it is compared with the trusted-only run.
            assert!(r["bytes_to_untrusted"].as_f64().unwrap() > 0.0, "{r}");
            assert!(r["untrusted_s"].as_f64().unwrap() > 0.0, "{r}");
            assert!(r["trusted_speedup"].as_f64().unwrap() > 0.0, "{r}");
        }
    }
    // Without it, the peaks are measured.
    let o = asymml(&[
        "bench",
        "--models",
        "vgg11-cifar",
        "--modes",
        "trusted-only",
        "--batch-size",
        "2",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let r = &v["results"][0];
    assert_eq!(r["interleaved"], false, "{r}");
    assert!(r["trusted_peak_bytes"].as_u64().unwrap() > 0, "{r}");
}

#[test]
fn bench_on_real_images_picks_low_energy_ranks() {
    // The 20 real CIFAR-10 images of ../shared/data: asym2 keeps 80 % of the energy with few components,
    // where random noise needs most of them.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/images/cifar10");
    assert!(
        dir.is_dir(),
        "the real CIFAR-10 images are missing: expected them at {} (../shared/data beside the repository)",
        dir.display()
    );
    let ranks = |images: Option<&Path>| -> Vec<u64> {
        let mut args = vec![
            "bench",
            "--models",
            "vgg11-cifar",
            "--modes",
            "split",
            "--rank",
            "asym2",
            "--route",
            "split",
            "--phase",
            "infer",
            "--batch-size",
            "4",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--threads",
            "1",
            "--json",
        ];
        let d = images.map(|p| p.to_str().unwrap().to_string());
        if let Some(d) = &d {
            args.extend(["--images", d.as_str()]);
        }
        let o = asymml(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["results"][0]["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["rank"].as_u64().unwrap())
            .collect()
    };
    let (real, noise) = (ranks(Some(&dir)), ranks(None));
    assert_eq!(real.len(), 8, "vgg11 has 8 convs");
    // The first conv sees the 3-channel image itself: natural images keep 80 % in one or two components.
    assert!(real[0] <= 2, "{real:?}");
    // So do the maps of at least half the image's side. (Deeper, after random convs, ReLU and pooling, noise
    // too is mostly its non-negative mean, one component.)
    assert!(
        real[..2].iter().sum::<u64>() < noise[..2].iter().sum::<u64>(),
        "{real:?} vs {noise:?}"
    );
    // A path without images is an error, not a panic.
    let empty = tempfile::tempdir().unwrap();
    let o = asymml(&[
        "bench",
        "--models",
        "vgg11-cifar",
        "--modes",
        "split",
        "--steps",
        "1",
        "--images",
        empty.path().to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(!String::from_utf8_lossy(&o.stderr).contains("panicked"));
}

#[test]
fn untrusted_only_trains_exactly_like_trusted_only() {
    // The same network code runs on the accelerator; the loss stays trusted. Same seed → same metrics.
    let dir = tempfile::tempdir().unwrap();
    let run = |mode: &str| -> Vec<serde_json::Value> {
        let out = dir.path().join(mode);
        let o = asymml(&[
            "train",
            "--mode",
            mode,
            "--limit-train",
            "512",
            "--batch-size",
            "128",
            "--epochs",
            "2",
            "--json",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let (a, b) = (run("trusted-only"), run("untrusted-only"));
    for (x, y) in a.iter().zip(&b) {
        for k in ["train_loss", "train_acc", "test_loss", "test_acc"] {
            assert_eq!(x[k], y[k], "{k}: {x} vs {y}");
        }
    }
    // The weights it saved (fetched back from the accelerator) evaluate the same in trusted-only mode.
    let o = asymml(&[
        "eval",
        "--mode",
        "trusted-only",
        "--json",
        "--weights",
        dir.path()
            .join("untrusted-only/model.safetensors")
            .to_str()
            .unwrap(),
    ]);
    let e: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(e["test_acc"], b[1]["test_acc"]);
}

#[test]
fn the_guard_keeps_image_like_maps_trusted() {
    // vgg11 at 32 px: conv inputs of 32, 16, 8, 8, 4, 4, 2, 2 px. `guard:0.5` keeps the 32 and 16 px maps
    // trusted, `guard` (1/8) everything down to 4 px; the rest is split with asym1, and nothing of a
    // trusted conv's input leaves.
    let o = asymml(&[
        "bench",
        "--models",
        "vgg11-cifar",
        "--rank",
        "guard:0.5,guard",
        "--route",
        "split",
        "--modes",
        "split",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--batch-size",
        "2",
        "--phase",
        "infer",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    for (r, trusted) in results.iter().zip([2usize, 6]) {
        let layers = r["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 8, "{r}");
        for (i, l) in layers.iter().enumerate() {
            let route = l["trusted_route"].as_bool().unwrap();
            let sent = l["bytes_to_untrusted"].as_f64().unwrap();
            assert_eq!(route, i < trusted, "{} conv {i}: {l}", r["rank"]);
            assert_eq!(sent == 0.0, i < trusted, "{} conv {i}: {l}", r["rank"]);
        }
    }
    // Exact either way.
    for rank in ["guard", "guard:0.5"] {
        let v = verify("vgg16", rank, "inproc");
        assert!(v["max_rel_err"].as_f64().unwrap() <= 1e-4, "{rank}: {v}");
    }
}

#[test]
fn auto_route_takes_the_trusted_route_where_the_split_costs_more() {
    // fixed:60 keeps 60 of 64+ channels: on these 32 px maps Conv_T would rebuild X_T and convolve all of its
    // channels, more than the whole conv, so with `--route auto` every conv runs trusted from its first
    // decomposition on (the cost model's decision, not a timing: every conv, deterministically);
    // `--route split` keeps them split. (The choice from measured times is unit-tested in asymml-trusted with
    // given costs.) Every conv must get no reply exactly when it reports the trusted route.
    let run = |route: &str| {
        let o = asymml(&[
            "bench",
            "--models",
            "vgg11-cifar",
            "--rank",
            "fixed:60",
            "--modes",
            "split",
            "--route",
            route,
            "--steps",
            "1",
            "--warmup",
            "4",
            "--batch-size",
            "2",
            "--phase",
            "train",
            "--json",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let layers = v["results"][0]["layers"].as_array().unwrap().clone();
        // The check of the whole step, once per round with `auto` and `auto-wall` (its steps with every conv
        // trusted measured), none with `split`.
        let check = v["results"][0]["route_check"].as_array().unwrap();
        if route == "split" {
            assert!(check.is_empty(), "{route}: {check:?}");
        } else {
            assert_eq!(check.len(), 1, "{route}: {check:?}");
            assert!(
                check[0]["trusted_s"].as_f64().unwrap() > 0.0,
                "{route}: {check:?}"
            );
        }
        for l in &layers {
            // A trusted conv gets nothing back and sends nothing, not even its updated weights.
            let trusted = l["trusted_route"].as_bool().unwrap();
            let got = l["bytes_from_untrusted"].as_f64().unwrap();
            let sent = l["bytes_to_untrusted"].as_f64().unwrap();
            assert_eq!(trusted, got == 0.0, "{route}: {l}");
            assert_eq!(trusted, sent == 0.0, "{route}: {l}");
        }
        layers
            .iter()
            .map(|l| l["trusted_route"].as_bool().unwrap())
            .collect::<Vec<_>>()
    };
    // Conv 0 has 3 input channels: fixed:60 keeps them all (the policy's own trusted route).
    let auto = run("auto");
    let trusted = auto.iter().filter(|&&t| t).count();
    assert_eq!(trusted, auto.len(), "{auto:?}");
    let split = run("split");
    assert!(split[0] && split[1..].iter().all(|&t| !t), "{split:?}");
    // auto-wall: the same trials, each conv's cost counting its waits too; fixed:60 still keeps every conv.
    let wall = run("auto-wall");
    assert!(wall.iter().all(|&t| t), "{wall:?}");
    // Exact on every route.
    for route in ["auto", "auto-wall", "split"] {
        let v = verify_with("vgg11", "fixed:60", "inproc", &["--route", route]);
        assert!(v["max_rel_err"].as_f64().unwrap() <= 1e-4, "{route}: {v}");
    }
}

#[test]
fn a_shortcut_conv_follows_its_block_s_first_conv_onto_the_trusted_route() {
    // A rank table keeps layer2.0.conv1 trusted. With `auto_route` the shortcut conv beside it, which reads the
    // same block input, takes the trusted route too, from the first step on: alone it would pay a whole
    // decomposition of that input to save a 1 × 1 conv's work. Without `auto_route` it follows the policy and
    // splits. Deterministic: the first conv is trusted by the table, not by a timing. Exact either way.
    use asymml_core::decomp::{RankPolicy, RankTable, TableEntry, TableRank, TrustedRoute};
    use asymml_core::models::{LocalExec, ModelSpec};
    use asymml_protocol::{inproc_pair, Direction, Recording};
    use asymml_trusted::split::{SplitConfig, SplitExec};
    let build = || {
        let mut spec = ModelSpec::parse("resnet18", 3, 10, 16).unwrap();
        spec.width = 8;
        spec.build(5).unwrap()
    };
    let mut rng = asymml_core::rng::Rng::new(3);
    let x = asymml_core::Tensor::from_vec(
        &[4, 3, 16, 16],
        (0..4 * 3 * 256).map(|_| rng.normal()).collect(),
    )
    .unwrap();
    let labels = [1, 7, 3, 3];
    let mut twin = build();
    twin.zero_grad();
    let want = twin
        .forward_loss(&x, &labels, true, &mut LocalExec)
        .unwrap()
        .0;
    twin.backward(&mut LocalExec, false).unwrap();
    let grads = |net: &mut asymml_core::models::Net| {
        let mut g = Vec::new();
        net.visit_params(&mut |_, p| g.extend_from_slice(&p.grad.data));
        g
    };
    let want_grads = grads(&mut twin);
    let table = RankTable {
        model: "resnet18".into(),
        layers: vec![TableEntry {
            conv: "layer2.0.conv1".into(),
            rank: TableRank::Route(TrustedRoute::Trusted),
        }],
    };
    for auto_route in [true, false] {
        let mut net = build();
        let (client, server) = inproc_pair();
        let server =
            std::thread::spawn(move || asymml_untrusted::Service::new(1).unwrap().serve(server));
        let rec = Recording::new(client);
        let transcript = rec.transcript();
        let config = SplitConfig {
            policy: RankPolicy::Fixed(2),
            table: Some(std::sync::Arc::new(table.clone())),
            auto_route,
            ..Default::default()
        };
        let mut exec = SplitExec::connect(rec, &mut net, config).unwrap();
        let stats = exec.stats();
        net.zero_grad();
        let loss = net.forward_loss(&x, &labels, true, &mut exec).unwrap().0;
        net.backward(&mut exec, false).unwrap();
        exec.shutdown().unwrap();
        server.join().unwrap().unwrap();
        assert!(
            (loss - want).abs() <= 1e-4 * want.abs().max(1.0),
            "auto_route {auto_route}: loss {loss} against {want}"
        );
        let got = grads(&mut net);
        let scale = want_grads.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = got
            .iter()
            .zip(&want_grads)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            got.len() == want_grads.len() && err <= 1e-4 * scale,
            "auto_route {auto_route}: ∇ off by {err}"
        );
        let layers = stats.lock().unwrap().layers.clone();
        let id = |name: &str| layers.iter().position(|l| l.name == name).unwrap();
        let sent_for = |id: usize| {
            transcript
                .records()
                .iter()
                .filter(|r| r.direction == Direction::Sent && r.layer == Some(id as u32))
                .filter(|r| !r.tensors.iter().any(|t| t.field == "w"))
                .count()
        };
        let (first, shortcut) = (id("layer2.0.conv1"), id("layer2.0.downsample.0"));
        assert!(layers[first].trusted_route);
        assert_eq!(sent_for(first), 0);
        assert_eq!(
            layers[shortcut].trusted_route, auto_route,
            "auto_route {auto_route}"
        );
        assert_eq!(
            sent_for(shortcut) == 0,
            auto_route,
            "auto_route {auto_route}"
        );
        // layer3's first conv splits: its shortcut reuses that decomposition.
        assert!(!layers[id("layer3.0.downsample.0")].trusted_route);
    }
}

/// The trusted end of a connection whose `SetWeights` frames take `delay` each to go (a slow link for the
/// weight updates): a cost of the split that no conv's own time shows (the weights go after the update,
/// between steps), but the whole step's does.
fn slow_weights<T: asymml_protocol::Transport>(
    inner: T,
    delay: std::time::Duration,
) -> common::SendHook<T, impl FnMut(&mut Vec<u8>)> {
    common::SendHook {
        inner,
        hook: move |frame: &mut Vec<u8>| {
            let kind = asymml_protocol::decode_request(frame, asymml_protocol::MAX_MESSAGE)
                .map(|r| r.kind());
            if matches!(kind, Ok(asymml_protocol::MessageKind::SetWeights)) {
                std::thread::sleep(delay);
            }
        },
    }
}

/// VGG11 (32 px, random weights of seed 3) through a split runtime of `config` over an in-process accelerator:
/// `config.probe_steps() + 2` inference forwards of `x`, `after_step` after each; the step check's report.
fn route_check_of_forwards(
    config: asymml_trusted::split::SplitConfig,
    x: &asymml_core::Tensor,
    after_step: &dyn Fn(&mut asymml_trusted::split::SplitExec<asymml_protocol::InProcTransport>),
) -> asymml_trusted::split::RouteCheck {
    use asymml_core::models::ModelSpec;
    let mut net = ModelSpec::parse("vgg11", 3, 10, 32)
        .unwrap()
        .build(3)
        .unwrap();
    let (client, server) = asymml_protocol::inproc_pair();
    let server =
        std::thread::spawn(move || asymml_untrusted::Service::new(1).unwrap().serve(server));
    let steps = config.probe_steps() + 2;
    let mut exec = asymml_trusted::split::SplitExec::connect(client, &mut net, config).unwrap();
    let stats = exec.stats();
    for _ in 0..steps {
        net.forward(x, false, &mut exec).unwrap();
        after_step(&mut exec);
    }
    exec.shutdown().unwrap();
    server.join().unwrap().unwrap();
    let check = stats.lock().unwrap().route_check.clone();
    check
}

#[test]
fn the_whole_steps_clock_stops_at_the_steps_end() {
    // What runs between two steps (here a 400 ms pause; in `bench --interleave` another run's step) is not the
    // step's: `step_end` stops the clock of the whole step's check. Without it the clock runs on to the next
    // step's first conv, and the pause is counted. (A step here takes some 10–30 ms; the pause leaves room
    // for a busy machine.)
    use asymml_core::decomp::RankPolicy;
    use asymml_core::models::ConvExec;
    use asymml_trusted::split::{RouteCheck, SplitConfig};
    let pause = std::time::Duration::from_millis(400);
    let mut rng = asymml_core::rng::Rng::new(5);
    let x = asymml_core::Tensor::from_vec(
        &[2, 3, 32, 32],
        (0..2 * 3 * 1024).map(|_| rng.normal()).collect(),
    )
    .unwrap();
    let run = |tell_end: bool| -> RouteCheck {
        let config = SplitConfig {
            policy: RankPolicy::Fixed(2),
            auto_route: true,
            ..Default::default()
        };
        route_check_of_forwards(config, &x, &|exec| {
            if tell_end {
                exec.step_end();
            }
            std::thread::sleep(pause);
        })
    };
    let told = run(true);
    let costs = |c: &RouteCheck| {
        [c.settled_s, c.trusted_s]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
    };
    assert!(told.trusted_s.is_some(), "{told:?}");
    assert!(
        costs(&told).iter().all(|&t| t < pause.as_secs_f64()),
        "{told:?}"
    );
    let untold = run(false);
    assert!(untold.trusted_s.is_some(), "{untold:?}");
    assert!(
        costs(&untold).iter().all(|&t| t >= pause.as_secs_f64()),
        "{untold:?}"
    );
}

#[test]
fn auto_route_puts_every_conv_on_the_trusted_route_where_the_whole_split_step_costs_more() {
    // VGG11 at 64 px, batch 4; a rank table splits one conv (256 → 256 channels on 16 × 16 maps) at rank 2 and
    // keeps the others trusted. Its split costs the trusted runtime a fraction of the whole conv (some 4 ms of
    // 30 in the forward), so it settles on the split. But its updated weights take 300 ms to reach the
    // accelerator, outside any conv's time: the steps with the settled routes cost more than the steps in
    // which every conv runs trusted (whose weights stay here), and the check of the whole step puts every conv
    // on the trusted route.
    use asymml_core::decomp::{RankPolicy, RankTable, TableEntry, TableRank, TrustedRoute};
    use asymml_core::models::{ConvExec, LocalExec, ModelSpec};
    use asymml_protocol::inproc_pair;
    use asymml_trusted::split::{SplitConfig, SplitExec};
    let build = || {
        ModelSpec::parse("vgg11", 3, 10, 64)
            .unwrap()
            .build(5)
            .unwrap()
    };
    let mut names = Vec::new();
    build().visit_convs(&mut |name, c| names.push((name.to_string(), c.in_ch, c.out_ch)));
    let split = names
        .iter()
        .position(|n| n.1 == 256 && n.2 == 256)
        .expect("a 256 → 256 conv");
    let table = RankTable {
        model: "vgg11".into(),
        layers: names
            .iter()
            .enumerate()
            .map(|(i, n)| TableEntry {
                conv: n.0.clone(),
                rank: if i == split {
                    TableRank::Rank(2)
                } else {
                    TableRank::Route(TrustedRoute::Trusted)
                },
            })
            .collect(),
    };
    let mut rng = asymml_core::rng::Rng::new(11);
    let x = asymml_core::Tensor::from_vec(
        &[4, 3, 64, 64],
        (0..4 * 3 * 4096).map(|_| rng.normal()).collect(),
    )
    .unwrap();
    let labels = [4, 9, 0, 2];
    let want = build()
        .forward_loss(&x, &labels, true, &mut LocalExec)
        .unwrap()
        .0;
    let mut net = build();
    let (client, server) = inproc_pair();
    let server =
        std::thread::spawn(move || asymml_untrusted::Service::new(1).unwrap().serve(server));
    let config = SplitConfig {
        policy: RankPolicy::Fixed(2),
        table: Some(std::sync::Arc::new(table)),
        auto_route: true,
        ..Default::default()
    };
    let steps = config.probe_steps() + 3;
    let slow = slow_weights(client, std::time::Duration::from_millis(300));
    let mut exec = SplitExec::connect(slow, &mut net, config).unwrap();
    let stats = exec.stats();
    let mut losses = Vec::new();
    for _ in 0..steps {
        net.zero_grad();
        losses.push(net.forward_loss(&x, &labels, true, &mut exec).unwrap().0);
        net.backward(&mut exec, false).unwrap();
        // (No update: the weights stay those of the reference, and the split conv's go to the accelerator.)
        exec.after_update(&mut net).unwrap();
    }
    exec.shutdown().unwrap();
    server.join().unwrap().unwrap();
    let s = stats.lock().unwrap().clone();
    let check = &s.route_check;
    // Steps with the conv split were measured (it settled on the split), and cost more.
    let (settled, trusted) = (check.settled_s, check.trusted_s);
    assert!(
        settled.zip(trusted).is_some_and(|(s, t)| s > t),
        "{check:?}"
    );
    assert!(check.all_trusted, "{check:?}");
    assert!(
        s.layers.iter().all(|l| l.trusted_route),
        "the last step: {:?}",
        s.layers
            .iter()
            .map(|l| (&l.name, l.trusted_route))
            .collect::<Vec<_>>()
    );
    // Exact on every route, every step.
    for (i, loss) in losses.iter().enumerate() {
        assert!(
            (loss - want).abs() <= 1e-4 * want.abs().max(1.0),
            "step {i}: loss {loss} against {want}"
        );
    }
}

#[test]
fn auto_route_settles_and_checks_the_whole_step_with_every_basis() {
    // `--route auto` must settle every conv and check the whole step whatever the basis. With `--basis shared`
    // (the shared basis forced, not on trial beside the per-sample one) its steps were counted as such a
    // trial, which only `--basis auto` ends: no conv ever settled or took the trusted route, however much
    // cheaper it was there, and the whole step was never checked.
    use asymml_core::decomp::{RankPolicy, SvdMethod};
    use asymml_core::models::ConvExec;
    use asymml_trusted::split::{Basis, SplitConfig};
    let mut rng = asymml_core::rng::Rng::new(7);
    let x = asymml_core::Tensor::from_vec(
        &[4, 3, 32, 32],
        (0..4 * 3 * 1024).map(|_| rng.normal()).collect(),
    )
    .unwrap();
    let cases = [
        (Basis::PerSample, RankPolicy::Fixed(2)),
        (Basis::Shared, RankPolicy::Fixed(2)),
        (Basis::Shared, RankPolicy::ASYM2),
        (Basis::Auto, RankPolicy::ASYM2),
    ];
    for (basis, policy) in cases {
        let config = SplitConfig {
            policy,
            basis,
            svd: Some(SvdMethod::block()),
            auto_route: true,
            ..Default::default()
        };
        let check = route_check_of_forwards(config, &x, &|exec| exec.step_end());
        // Steps with every conv trusted are measured once every conv has settled (and only those where they
        // all settled there); before, nothing is.
        assert!(
            check.trusted_s.is_some(),
            "{basis:?} {policy:?}: the convs never settled, the whole step was never checked: {check:?}"
        );
    }
}
