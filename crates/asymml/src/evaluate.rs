//! `asymml eval` and `asymml infer`.

use crate::cli::{CommonArgs, EvalArgs, InferArgs};
use crate::common::{self, WeightInfo};
use crate::data::{self, normalize_into, DatasetKind};
use anyhow::{bail, Context, Result};
use asymml_core::layers::loss::argmax;
use asymml_core::models::ModelSpec;
use asymml_core::optim::{LrSchedule, OptimizerKind};
use asymml_core::Tensor;
use asymml_trusted::{Mode, Session, TrainConfig};
use std::io::Write;

/// A session for inference only (the optimizer is never used).
fn eval_session(
    net: asymml_core::models::Net,
    mode: Mode,
    split: &crate::cli::SplitArgs,
    threads: usize,
    seed: u64,
) -> Result<(Session, Option<crate::accelerator::AcceleratorHandle>)> {
    let config = TrainConfig {
        optimizer: OptimizerKind::Sgd {
            momentum: 0.0,
            nesterov: false,
        },
        lr: 0.0,
        weight_decay: 0.0,
        schedule: LrSchedule::Constant,
    };
    common::make_session(net, config, mode, split, threads, seed)
}

/// The model spec for a weight file: its metadata, else the flags. A flag that contradicts the metadata is
/// an error rather than a silent choice.
pub fn resolve_spec(
    info: &WeightInfo,
    model: Option<&str>,
    in_ch: Option<usize>,
    classes: Option<usize>,
    size: Option<usize>,
) -> Result<ModelSpec> {
    if let Some(spec) = &info.spec {
        if let Some(m) = model {
            let want =
                ModelSpec::parse(m, spec.in_ch, spec.classes, size.unwrap_or(spec.input_size))?;
            if want.arch != spec.arch || want.style != spec.style {
                bail!(
                    "--model {m} contradicts the weights, which hold a {}",
                    spec.name()
                );
            }
        }
        if let Some(s) = size.filter(|&s| s != spec.input_size) {
            bail!(
                "--input-size {s} contradicts the weights, trained at {} px",
                spec.input_size
            );
        }
        return Ok(spec.clone());
    }
    let (Some(m), Some(c), Some(k), Some(s)) = (model, in_ch, classes, size) else {
        bail!(
            "the weights carry no asymml metadata (e.g. a torchvision state dict): give --model, and the input \
             channels, classes and input size"
        );
    };
    Ok(ModelSpec::parse(m, c, k, s)?)
}

/// Runs `asymml eval`.
pub fn run_eval(a: EvalArgs) -> Result<()> {
    let CommonArgs {
        model,
        dataset,
        data_dir,
        input_size,
        batch_size,
        threads,
        seed,
        weights,
        mode,
        split,
        json,
    } = a.common;
    common::init_threads(threads)?;
    let mode: Mode = mode.parse()?;
    let Some(wpath) = weights else {
        bail!("eval needs --weights FILE.safetensors (e.g. runs/vgg-small/model.safetensors)");
    };
    if batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let (bytes, info) = common::weight_info(&wpath)?;
    let kind: DatasetKind = dataset.parse()?;
    let folder_size = input_size
        .or(info.spec.as_ref().map(|s| s.input_size))
        .unwrap_or(224);
    let folder_ch = info.spec.as_ref().map_or(3, |s| s.in_ch);
    let (_, test) = data::load(kind, data_dir.as_deref(), folder_ch, folder_size, seed)?;
    let size = input_size
        .or(info.spec.as_ref().map(|s| s.input_size))
        .unwrap_or(test.h);
    let spec = resolve_spec(
        &info,
        model.as_deref(),
        Some(test.c),
        Some(test.num_classes),
        Some(size),
    )?;
    let test = common::fit_to(test, spec.input_size);
    common::check_fit(&spec, &test, "test")?;
    let mut net = spec.build(0)?;
    common::load_weights(&mut net, &bytes, &wpath)?;
    let threads = rayon::current_num_threads();
    let (mut session, _accel) = eval_session(net, mode, &split, threads, seed)?;
    let pb = common::progress(test.len() as u64, "eval", json);
    let (loss, acc) = common::evaluate(&mut session, &test, batch_size, &pb)?;
    pb.finish_and_clear();
    if json {
        println!(
            "{}",
            serde_json::json!({"test_loss": loss, "test_acc": acc, "samples": test.len()})
        );
    } else {
        println!(
            "{} on {} ({} test images): loss {:.4}, accuracy {:.2}%",
            spec.name(),
            kind,
            test.len(),
            loss,
            acc * 100.0
        );
    }
    Ok(())
}

/// Runs `asymml infer`.
pub fn run_infer(a: InferArgs) -> Result<()> {
    common::init_threads(a.threads)?;
    let mode: Mode = a.mode.parse()?;
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let (bytes, info) = common::weight_info(&a.weights)?;
    let spec = resolve_spec(
        &info,
        a.model.as_deref(),
        a.channels,
        a.classes,
        a.input_size,
    )?;
    let mut net = spec.build(0)?;
    common::load_weights(&mut net, &bytes, &a.weights)?;
    let (mean, std) = match (&info.mean, &info.std) {
        (Some(m), Some(s)) if m.len() == spec.in_ch && s.len() == spec.in_ch => {
            (m.clone(), s.clone())
        }
        _ if spec.in_ch == 3 => (vec![0.485, 0.456, 0.406], vec![0.229, 0.224, 0.225]),
        _ => (vec![0.5; spec.in_ch], vec![0.25; spec.in_ch]),
    };
    if spec.in_ch != 1 && spec.in_ch != 3 {
        bail!(
            "infer reads grey (1) or RGB (3) images; the model takes {} channels",
            spec.in_ch
        );
    }
    let names = info.class_names.clone().filter(|n| n.len() == spec.classes);
    let files = data::list_images(&a.images)?;
    let threads = rayon::current_num_threads();
    let (mut session, _accel) = eval_session(net, mode, &a.split, threads, 0)?;
    let (c, s) = (spec.in_ch, spec.input_size);
    let per = c * s * s;
    let pb = common::progress(files.len() as u64, "infer", a.json);
    let mut out = std::io::stdout().lock();
    for chunk in files.chunks(a.batch_size) {
        let mut x = Tensor::zeros(&[chunk.len(), c, s, s]);
        for (f, dst) in chunk.iter().zip(x.data.chunks_mut(per)) {
            let img = data::load_image(f, c, s)?;
            normalize_into(&img, &mean, &std, dst);
        }
        let probs = session.predict(&x).context("inference failed")?;
        for (f, p) in chunk.iter().zip(probs.data.chunks(spec.classes)) {
            let class = argmax(p);
            let label = names.as_ref().map(|n| n[class].clone());
            if a.json {
                let probs: Vec<f64> = p.iter().map(|&v| (v as f64 * 1e6).round() / 1e6).collect();
                let obj = serde_json::json!({
                    "file": f.display().to_string(), "class": class, "label": label, "probs": probs
                });
                writeln!(out, "{obj}")?;
            } else {
                writeln!(
                    out,
                    "{}\t{}{}\t{:.2}%",
                    f.display(),
                    class,
                    label.map(|l| format!(" ({l})")).unwrap_or_default(),
                    p[class] * 100.0
                )?;
            }
        }
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
    Ok(())
}
