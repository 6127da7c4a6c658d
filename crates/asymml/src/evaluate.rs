//! `asymml eval` and `asymml infer`.

use crate::batch;
use crate::cli::{EvalArgs, InferArgs, RunArgs};
use crate::data::{self, normalize_into, Dataset};
use crate::setup::{self, SplitSetup};
use crate::values::check_batch_bytes;
use crate::weightfile::{self, resolve_spec, WeightInfo};
use crate::{progress, threads};
use anyhow::{bail, Context, Result};
use asymml_core::layers::loss::argmax;
use asymml_core::models::{ModelSpec, Net};
use asymml_core::Tensor;
use asymml_trusted::Session;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The network of `spec` with the weights read from `path`.
fn load_net(spec: &ModelSpec, bytes: &[u8], path: &Path) -> Result<Net> {
    let mut net = spec.build(0)?;
    weightfile::load_into(&mut net, bytes, path)?;
    Ok(net)
}

/// An inference session in `--mode`, reaching the accelerator in split and untrusted-only mode.
fn open_session(
    run: &RunArgs,
    net: Net,
    seed: u64,
) -> Result<(Session, Option<crate::accelerator::AcceleratorHandle>)> {
    let split = SplitSetup::from_args(&run.split, rayon::current_num_threads(), seed)?;
    setup::inference_session(net, run.mode, &split)
}

/// Runs `asymml eval`.
pub fn run_eval(a: EvalArgs) -> Result<()> {
    let threads = threads::init(a.common.run.threads)?;
    threads::in_pool(threads, || eval(a))
}

/// `asymml eval` on a worker of the pool ([`threads::in_pool`]).
fn eval(a: EvalArgs) -> Result<()> {
    let c = a.common;
    let Some(wpath) = &c.weights else {
        bail!("eval needs --weights FILE.safetensors (e.g. runs/vgg-small/model.safetensors)");
    };
    let (bytes, info) = weightfile::read(wpath)?;
    let (spec, test) = eval_data(&c.run, c.dataset, c.data_dir.as_deref(), c.seed, &info)?;
    check_batch_bytes(c.batch_size, spec.in_ch, spec.width, spec.input_size)?;
    let net = load_net(&spec, &bytes, wpath)?;
    let (mut session, _accel) = open_session(&c.run, net, c.seed)?;
    let pb = progress::bar(test.len() as u64, "eval", c.run.json);
    let (loss, acc) = batch::evaluate(&mut session, &test, c.batch_size, &pb)?;
    pb.finish_and_clear();
    if c.run.json {
        println!(
            "{}",
            serde_json::json!({"test_loss": loss, "test_acc": acc, "samples": test.len()})
        );
    } else {
        println!(
            "{} on {} ({} test images): loss {:.4}, accuracy {:.2}%",
            spec.name(),
            c.dataset,
            test.len(),
            loss,
            acc * 100.0
        );
    }
    Ok(())
}

/// The model of the weights and the test split it is evaluated on, at its input size.
fn eval_data(
    run: &RunArgs,
    kind: data::DatasetKind,
    data_dir: Option<&Path>,
    seed: u64,
    info: &WeightInfo,
) -> Result<(ModelSpec, Dataset)> {
    let recorded_size = run.input_size.or(info.spec.as_ref().map(|s| s.input_size));
    let folder_ch = info.spec.as_ref().map_or(3, |s| s.in_ch);
    let (_, test) = data::load(
        kind,
        data_dir,
        folder_ch,
        recorded_size.unwrap_or(224),
        seed,
    )?;
    let spec = resolve_spec(
        info,
        run.model.as_ref().map(|m| m.as_str()),
        Some(test.c),
        Some(test.num_classes),
        Some(recorded_size.unwrap_or(test.h)),
    )?;
    data::check_images_bytes(test.len(), test.c, spec.input_size)?;
    let test = batch::fit_to(test, spec.input_size);
    batch::check_fit(&spec, &test, "test")?;
    Ok((spec, test))
}

/// How `infer` reads images for a model: the files, their normalisation, and the class names.
struct ImageInput {
    files: Vec<PathBuf>,
    mean: Vec<f32>,
    std: Vec<f32>,
    names: Option<Vec<String>>,
}

impl ImageInput {
    fn new(a: &InferArgs, spec: &ModelSpec, info: &WeightInfo) -> Result<Self> {
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
        Ok(ImageInput {
            files: data::list_images(&a.images)?,
            mean,
            std,
            names: info.class_names.clone().filter(|n| n.len() == spec.classes),
        })
    }

    /// The images of `files`, normalised, as one batch.
    fn batch(&self, files: &[PathBuf], spec: &ModelSpec) -> Result<Tensor> {
        let (c, s) = (spec.in_ch, spec.input_size);
        let mut x = Tensor::zeros(&[files.len(), c, s, s]);
        for (f, dst) in files.iter().zip(x.data.chunks_mut(c * s * s)) {
            let img = data::load_image(f, c, s)?;
            normalize_into(&img, &self.mean, &self.std, dst);
        }
        Ok(x)
    }
}

/// Runs `asymml infer`.
pub fn run_infer(a: InferArgs) -> Result<()> {
    let threads = threads::init(a.run.threads)?;
    threads::in_pool(threads, || infer(a))
}

/// `asymml infer` on a worker of the pool ([`threads::in_pool`]).
fn infer(a: InferArgs) -> Result<()> {
    let (bytes, info) = weightfile::read(&a.weights)?;
    let spec = resolve_spec(
        &info,
        a.run.model.as_ref().map(|m| m.as_str()),
        a.channels,
        a.classes,
        a.run.input_size,
    )?;
    check_batch_bytes(a.batch_size, spec.in_ch, spec.width, spec.input_size)?;
    let net = load_net(&spec, &bytes, &a.weights)?;
    let input = ImageInput::new(&a, &spec, &info)?;
    let (mut session, _accel) = open_session(&a.run, net, 0)?;
    let pb = progress::bar(input.files.len() as u64, "infer", a.run.json);
    let mut out = std::io::stdout().lock();
    for chunk in input.files.chunks(a.batch_size) {
        let x = input.batch(chunk, &spec)?;
        let probs = session.predict(&x).context("inference failed")?;
        for (f, p) in chunk.iter().zip(probs.data.chunks(spec.classes)) {
            let class = argmax(p);
            let label = input.names.as_ref().map(|n| n[class].clone());
            if a.run.json {
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
