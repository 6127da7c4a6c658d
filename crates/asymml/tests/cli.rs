//! End-to-end tests of the `asymml` command: training, resume, eval, infer, and clear errors (exit code 2,
//! never a panic) on bad input.

use std::path::{Path, PathBuf};
use std::process::Output;

mod common;
use common::{asymml, stderr, stdout};

/// Asserts a clean failure: exit code 2, an error line containing `needle`, no panic.
fn fails_with(o: &Output, needle: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(2), "expected exit 2, stderr: {err}");
    assert!(!err.contains("panicked"), "panicked: {err}");
    assert!(err.contains(needle), "stderr lacks '{needle}': {err}");
}

fn json_lines(s: &str) -> Vec<serde_json::Value> {
    s.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l}: {e}")))
        .collect()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A quick training run on 512 embedded images.
fn quick_train(out: &Path, epochs: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "train",
        "--epochs",
        epochs,
        "--batch-size",
        "64",
        "--out",
        p(out),
        "--json",
    ];
    args.extend_from_slice(extra);
    asymml(&args)
}

#[test]
fn train_resume_eval_infer() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let o = quick_train(&run, "1", &["--limit-train", "512"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines = json_lines(&stdout(&o));
    assert_eq!(lines.len(), 1);
    for k in [
        "epoch",
        "train_loss",
        "train_acc",
        "test_loss",
        "test_acc",
        "seconds",
    ] {
        assert!(lines[0][k].is_number(), "missing {k}: {}", lines[0]);
    }
    for f in [
        "metrics.jsonl",
        "checkpoint.safetensors",
        "model.safetensors",
        "curves.png",
    ] {
        assert!(run.join(f).is_file(), "{f} not written");
    }

    // Resume to 2 epochs: one more line, epoch 2, metrics.jsonl holds both.
    let o = asymml(&["train", "--resume", p(&run), "--epochs", "2", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines = json_lines(&stdout(&o));
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["epoch"], 2);
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(json_lines(&metrics).len(), 2);
    let last_acc = lines[0]["test_acc"].as_f64().unwrap();

    // Resuming a finished run asks for more epochs.
    fails_with(
        &asymml(&["train", "--resume", p(&run), "--epochs", "2"]),
        "already holds 2 epoch",
    );

    // eval on the same test split reproduces the training run's last test accuracy.
    let weights = run.join("model.safetensors");
    let o = asymml(&["eval", "--weights", p(&weights), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let e = &json_lines(&stdout(&o))[0];
    assert_eq!(e["samples"], 2000);
    assert!(
        (e["test_acc"].as_f64().unwrap() - last_acc).abs() < 1e-9,
        "{e} vs {last_acc}"
    );

    // infer on PNG files: one JSON object per image, probabilities summing to 1.
    let imgs = dir.path().join("imgs");
    std::fs::create_dir(&imgs).unwrap();
    let (_, test) = asymml_cli::data::embedded_fashion_mnist().unwrap();
    for i in 0..3 {
        let img = image::GrayImage::from_raw(28, 28, test.image(i).to_vec()).unwrap();
        img.save(imgs.join(format!("img{i}.png"))).unwrap();
    }
    let o = asymml(&[
        "infer",
        "--weights",
        p(&weights),
        "--images",
        p(&imgs),
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows = json_lines(&stdout(&o));
    assert_eq!(rows.len(), 3);
    for r in &rows {
        let probs: Vec<f64> = r["probs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(probs.len(), 10);
        assert!((probs.iter().sum::<f64>() - 1.0).abs() < 1e-4);
        let class = r["class"].as_u64().unwrap() as usize;
        assert!(probs.iter().all(|&q| q <= probs[class]));
        assert!(r["file"].as_str().unwrap().ends_with(".png"));
        assert!(r["label"].is_string());
    }

    // Weights that do not fit the model: a clear error naming a tensor.
    fails_with(
        &asymml(&[
            "eval",
            "--weights",
            p(&weights),
            "--model",
            "resnet18",
            "--json",
        ]),
        "contradicts the weights",
    );
    fails_with(
        &asymml(&[
            "infer",
            "--weights",
            p(&weights),
            "--images",
            p(&imgs),
            "--model",
            "vgg-small-imagenet",
        ]),
        "error:",
    );
}

#[test]
fn weights_of_another_model_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("r");
    let o = quick_train(&run, "1", &["--limit-train", "128"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // A vgg-small file loaded as the initial weights of a resnet18: names and shapes differ.
    let o = asymml(&[
        "train",
        "--model",
        "resnet18",
        "--limit-train",
        "64",
        "--epochs",
        "1",
        "--out",
        p(&dir.path().join("x")),
        "--weights",
        p(&run.join("model.safetensors")),
    ]);
    fails_with(&o, "do not match model resnet18-cifar");
    // Not a safetensors file at all.
    let bogus = dir.path().join("bogus.safetensors");
    std::fs::write(&bogus, b"hello").unwrap();
    fails_with(
        &asymml(&["eval", "--weights", p(&bogus)]),
        "not a safetensors file",
    );
    fails_with(
        &asymml(&[
            "eval",
            "--weights",
            p(&dir.path().join("missing.safetensors")),
        ]),
        "missing.safetensors",
    );
}

#[test]
fn bad_data_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Truncated IDX and wrong magic.
    let idx = d.join("idx");
    std::fs::create_dir(&idx).unwrap();
    let mut images = vec![0, 0, 8, 3, 0, 0, 0, 10, 0, 0, 0, 28, 0, 0, 0, 28];
    images.extend(vec![0u8; 100]);
    std::fs::write(idx.join("train-images-idx3-ubyte"), &images).unwrap();
    std::fs::write(
        idx.join("train-labels-idx1-ubyte"),
        [0, 0, 8, 1, 0, 0, 0, 10, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0],
    )
    .unwrap();
    std::fs::write(idx.join("t10k-images-idx3-ubyte"), &images).unwrap();
    std::fs::write(
        idx.join("t10k-labels-idx1-ubyte"),
        [0, 0, 8, 1, 0, 0, 0, 10, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0],
    )
    .unwrap();
    fails_with(
        &asymml(&["train", "--dataset", "mnist", "--data-dir", p(&idx)]),
        "truncated",
    );
    std::fs::write(
        idx.join("train-images-idx3-ubyte"),
        [0, 0, 8, 1, 0, 0, 0, 1, 0],
    )
    .unwrap();
    fails_with(
        &asymml(&["train", "--dataset", "mnist", "--data-dir", p(&idx)]),
        "magic",
    );
    // A truncated CIFAR batch.
    let cifar = d.join("cifar");
    std::fs::create_dir(&cifar).unwrap();
    std::fs::write(cifar.join("data_batch_1.bin"), vec![1u8; 3073 + 100]).unwrap();
    std::fs::write(cifar.join("test_batch.bin"), vec![1u8; 3073]).unwrap();
    fails_with(
        &asymml(&["train", "--dataset", "cifar10", "--data-dir", p(&cifar)]),
        "data_batch_1.bin",
    );
    // Missing and empty folders, an unreadable image.
    fails_with(
        &asymml(&[
            "train",
            "--dataset",
            "folder",
            "--data-dir",
            p(&d.join("nope")),
        ]),
        "nope",
    );
    let empty = d.join("empty");
    std::fs::create_dir(&empty).unwrap();
    fails_with(
        &asymml(&["train", "--dataset", "folder", "--data-dir", p(&empty)]),
        "empty",
    );
    let bad = d.join("bad/cat");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(bad.join("a.png"), b"not a png").unwrap();
    std::fs::write(bad.join("b.png"), b"not a png").unwrap();
    fails_with(
        &asymml(&[
            "train",
            "--dataset",
            "folder",
            "--data-dir",
            p(&d.join("bad")),
        ]),
        "cannot decode image",
    );
    fails_with(&asymml(&["train", "--dataset", "mnist"]), "--data-dir");
    fails_with(&asymml(&["train", "--dataset", "imagenet"]), "imagenet");
}

#[test]
fn bad_flags_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o");
    let o = out.to_str().unwrap();
    // Model / input-size mismatch: VGG16 pools five times, 28 px is too small.
    fails_with(
        &asymml(&["train", "--model", "vgg16", "--out", o]),
        "at least 32 px",
    );
    fails_with(
        &asymml(&["train", "--model", "vgg7", "--out", o]),
        "unknown model",
    );
    fails_with(
        &asymml(&["train", "--optimizer", "rmsprop", "--out", o]),
        "invalid value 'rmsprop' for '--optimizer",
    );
    fails_with(
        &asymml(&["train", "--schedule", "linear", "--out", o]),
        "for '--schedule <SCHEDULE>': unknown schedule 'linear'",
    );
    fails_with(
        &asymml(&["train", "--mode", "split-ish", "--out", o]),
        "unknown mode",
    );
    fails_with(
        &asymml(&["train", "--batch-size", "0", "--out", o]),
        "--batch-size",
    );
    fails_with(
        &asymml(&["train", "--augment", "rotate", "--out", o]),
        "invalid value 'rotate' for '--augment",
    );
    fails_with(
        &asymml(&["train", "--accelerator", "gpu", "--out", o]),
        "\"gpu\": expected inproc, process, tcp://HOST:PORT or unix:PATH",
    );
    fails_with(
        &asymml(&["train", "--rank", "schedule,asym1", "--out", o]),
        "--rank: give one rank policy",
    );
    fails_with(
        &asymml(&["train", "--svd", "block", "--svd-iters", "2", "--out", o]),
        "--svd-iters counts the rounds of --svd light",
    );
    fails_with(
        &asymml(&["train", "--svd", "lite", "--out", o]),
        "unknown method",
    );
    fails_with(&asymml(&["eval"]), "--weights");
}

#[test]
fn non_finite_loss_stops_with_epoch_and_step() {
    let dir = tempfile::tempdir().unwrap();
    let out: PathBuf = dir.path().join("nan");
    for mode in ["trusted-only", "split"] {
        let o = asymml(&[
            "train",
            "--mode",
            mode,
            "--limit-train",
            "256",
            "--lr",
            "1e30",
            "--schedule",
            "constant",
            "--out",
            p(&out),
        ]);
        // trusted-only: the loss itself; split: the integrity check refuses first (its sums of squares are
        // non-finite), or the accelerator's reply (non-finite values).
        fails_with(&o, "non-finite");
        assert!(stderr(&o).contains("epoch 1, step"), "{}", stderr(&o));
    }
}

/// A failure that names CUDA: exit code 2, no panic, and without the `cuda` feature the reason that says so.
fn fails_naming_cuda(o: &Output) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(2), "expected exit 2, stderr: {err}");
    assert!(!err.contains("panicked"), "panicked: {err}");
    assert!(
        err.contains("CUDA") || err.contains("cuda"),
        "no CUDA in: {err}"
    );
    if !cfg!(feature = "cuda") {
        assert!(err.contains("without the `cuda` feature"), "{err}");
    }
}

/// `--accelerator-device cuda:0` in a build without the `cuda` feature, or on a machine without a usable GPU
/// (this one), is a clean error naming CUDA; on a GPU machine with a `cuda` build the same commands succeed
/// (and `verify` then checks the GPU's split step against the trusted-only one). Passes in both builds.
#[test]
fn accelerator_device_cuda_or_a_clear_error() {
    let vgg = [
        "verify",
        "--model",
        "vgg-small",
        "--channels",
        "1",
        "--input-size",
        "28",
        "--batch",
        "2",
    ];
    // The CPU device named explicitly.
    let o = asymml(&[&vgg[..], &["--accelerator-device", "cpu"]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("OK"), "{}", stdout(&o));

    let o = asymml(&[&vgg[..], &["--accelerator-device", "cuda:0"]].concat());
    let gpu = o.status.success();
    if gpu {
        if !cfg!(feature = "cuda") {
            panic!("cuda:0 worked without the cuda feature");
        }
        assert!(stdout(&o).contains("OK"), "{}", stdout(&o));
    } else {
        fails_naming_cuda(&o);
    }

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    for accel in ["inproc", "process"] {
        let o = quick_train(
            &out,
            "1",
            &[
                "--limit-train",
                "64",
                "--accelerator",
                accel,
                "--accelerator-device",
                "cuda:0",
            ],
        );
        if gpu {
            assert!(o.status.success(), "{accel}: {}", stderr(&o));
        } else {
            fails_naming_cuda(&o);
        }
    }
    if !gpu {
        // The server refuses to start (rather than failing on each connection).
        let o = asymml(&[
            "accelerator",
            "--listen",
            "127.0.0.1:0",
            "--once",
            "--accelerator-device",
            "cuda:0",
        ]);
        fails_naming_cuda(&o);
    }
    // Whatever the build: a device that does not exist, and a name that is not a device.
    fails_naming_cuda(&asymml(
        &[&vgg[..], &["--accelerator-device", "cuda:4096"]].concat(),
    ));
    fails_with(
        &asymml(&[&vgg[..], &["--accelerator-device", "gpu0"]].concat()),
        "unknown accelerator device 'gpu0' (use cpu, cuda or cuda:N",
    );
    // A remote accelerator picks its own device.
    fails_with(
        &asymml(
            &[
                &vgg[..],
                &[
                    "--accelerator",
                    "tcp://127.0.0.1:9",
                    "--accelerator-device",
                    "cuda:0",
                ],
            ]
            .concat(),
        ),
        "a remote accelerator chooses its own",
    );
}

/// The bytes of a PNG whose header claims `w`×`h` RGB pixels, followed by a bogus IDAT chunk.
fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend((data.len() as u32).to_be_bytes());
        out.extend(kind);
        out.extend(data);
        let mut crc = flate2::Crc::new();
        crc.update(kind);
        crc.update(data);
        out.extend(crc.sum().to_be_bytes());
    }
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]); // 8-bit RGB, deflate, adaptive filtering, no interlace
    chunk(&mut png, b"IHDR", &ihdr);
    chunk(&mut png, b"IDAT", &[0x78, 0x9c, 0xde, 0xad]);
    chunk(&mut png, b"IEND", &[]);
    png
}

/// Absurd numbers are refused where the flags are read, naming the flag: exit 2, no panic, no allocation.
#[test]
fn absurd_numbers_are_refused_at_the_edge() {
    let dir = tempfile::tempdir().unwrap();
    let o = dir.path().join("o");
    let o = p(&o);
    for (args, needle) in [
        (
            &["--input-size", "0"][..],
            "for '--input-size <INPUT_SIZE>'",
        ),
        (&["--input-size", "100000"], "from 1 to 4096"),
        (&["--threads", "100000"], "for '--threads <THREADS>'"),
        (&["--accelerator-threads", "0"], "--accelerator-threads"),
        (&["--momentum", "nan"], "for '--momentum <MOMENTUM>'"),
        (&["--momentum", "1"], "--momentum"),
        (&["--lr", "0"], "--lr"),
        (&["--lr", "inf"], "--lr"),
        (&["--weight-decay=-1"], "--weight-decay"),
        (&["--epochs", "0"], "--epochs"),
        (&["--batch-size", "10000000"], "--batch-size"),
        (&["--accelerator-timeout", "0"], "--accelerator-timeout"),
        (&["--accelerator-timeout", "nan"], "--accelerator-timeout"),
    ] {
        let o = asymml(&[&["train", "--out", o][..], args].concat());
        fails_with(&o, needle);
    }
    for (args, needle) in [
        (&["bench", "--steps", "0"][..], "--steps"),
        (&["bench", "--warmup", "100000000"], "--warmup"),
        (&["verify", "--channels", "1000"], "--channels"),
        (&["privacy", "--samples", "0"], "--samples"),
        (&["privacy", "--public", "100000000"], "--public"),
    ] {
        fails_with(&asymml(args), needle);
    }
    // A size the model cannot take, and one whose data would not fit in memory: clear errors, no resizing.
    fails_with(
        &asymml(&["train", "--input-size", "1", "--out", o]),
        "needs an input size of at least 8 px",
    );
    fails_with(
        &asymml(&["train", "--input-size", "4096", "--out", o]),
        "above the limit of 16 GiB",
    );
    fails_with(
        &asymml(&[
            "verify",
            "--model",
            "vgg11",
            "--input-size",
            "4096",
            "--batch",
            "64",
        ]),
        "above the limit of 8 GiB",
    );
    assert!(!dir.path().join("o").exists(), "a refused run wrote output");
}

/// A PNG header claiming 100000×100000 pixels and a gzipped IDX that inflates far beyond its header's
/// promise are refused before they cost memory.
#[test]
fn image_and_gzip_bombs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let bomb = png_claiming(100_000, 100_000);
    let images = d.join("images");
    std::fs::create_dir(&images).unwrap();
    std::fs::write(images.join("big.png"), &bomb).unwrap();
    fails_with(
        &asymml(&["privacy", "--images", p(&images), "--samples", "1"]),
        "big.png",
    );
    fails_with(
        &asymml(&[
            "privacy",
            "--images",
            p(&images),
            "--input-size",
            "32",
            "--samples",
            "1",
        ]),
        "at most 16384×16384 px",
    );
    let folder = d.join("folder");
    for class in ["a", "b"] {
        std::fs::create_dir_all(folder.join(class)).unwrap();
        std::fs::write(folder.join(class).join("x.png"), &bomb).unwrap();
    }
    fails_with(
        &asymml(&[
            "train",
            "--dataset",
            "folder",
            "--data-dir",
            p(&folder),
            "--input-size",
            "32",
            "--out",
            p(&d.join("o")),
        ]),
        "at most 16384×16384 px",
    );

    // 10 images of 28×28 promised, 64 MiB of zeros inflated.
    let idx = d.join("idx");
    std::fs::create_dir(&idx).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let header = [0, 0, 8, 3, 0, 0, 0, 10, 0, 0, 0, 28, 0, 0, 0, 28];
    std::io::Write::write_all(&mut gz, &header).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..64 {
        std::io::Write::write_all(&mut gz, &zeros).unwrap();
    }
    std::fs::write(idx.join("train-images-idx3-ubyte.gz"), gz.finish().unwrap()).unwrap();
    let labels = [0, 0, 8, 1, 0, 0, 0, 10, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0];
    for f in ["train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"] {
        std::fs::write(idx.join(f), labels).unwrap();
    }
    std::fs::write(idx.join("t10k-images-idx3-ubyte"), header).unwrap();
    fails_with(
        &asymml(&["train", "--dataset", "mnist", "--data-dir", p(&idx)]),
        "inflates to more than the 7856 bytes its IDX header promises",
    );
}

/// An accelerator that accepts the connection and never answers: the command stops with "timed out" after
/// --accelerator-timeout, and the checkpoint of the run it resumes is left as it was.
#[test]
fn a_silent_accelerator_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let o = quick_train(&run, "1", &["--limit-train", "64"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let checkpoint = std::fs::read(run.join("checkpoint.safetensors")).unwrap();

    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("tcp://{}", silent.local_addr().unwrap());
    // Holds every connection open without reading or answering.
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in silent.incoming() {
            held.push(s);
        }
    });
    let t0 = std::time::Instant::now();
    let o = asymml(&[
        "train",
        "--resume",
        p(&run),
        "--epochs",
        "2",
        "--accelerator",
        &addr,
        "--insecure-plaintext-tcp",
        "--accelerator-timeout",
        "1",
    ]);
    fails_with(&o, "timed out");
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(20),
        "took {:?}",
        t0.elapsed()
    );
    assert_eq!(
        std::fs::read(run.join("checkpoint.safetensors")).unwrap(),
        checkpoint,
        "the checkpoint changed"
    );
}

#[test]
fn short_help_is_short_and_long_help_keeps_the_details() {
    for cmd in [
        "train",
        "eval",
        "infer",
        "bench",
        "verify",
        "privacy",
        "accelerator",
        "keygen",
    ] {
        let short = asymml(&[cmd, "-h"]);
        let long = asymml(&[cmd, "--help"]);
        assert!(short.status.success() && long.status.success(), "{cmd}");
        let (short, long) = (stdout(&short), stdout(&long));
        // `-h`: one line a flag, a sentence or two each.
        for line in short.lines() {
            assert!(
                line.chars().count() <= 320,
                "{cmd} -h: a line of {} characters: {line}",
                line.chars().count()
            );
        }
        assert!(long.len() >= short.len(), "{cmd}");
    }
    // The details are in --help.
    let long = stdout(&asymml(&["train", "--help"]));
    assert!(long.contains("tried again on two steps at steps 64, 128, 256"));
    assert!(long.contains("image-like maps, which every other policy leaks"));
}
