//! Training checkpoints: the model's state dict under `model.`, the optimizer's per-parameter state under
//! `optim.<slot>.<param>`, and the progress (epoch, step, generator state, config) in the metadata.
//! Written atomically (temporary file + rename), so an interrupted write never leaves a broken checkpoint.

use crate::session::{Session, SessionError, TrainConfig};
use asymml_core::tensor::Tensor;
use asymml_core::weights::{self, Entry};
use std::collections::BTreeMap;
use std::path::Path;

/// Progress saved with a checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct Progress {
    /// Epochs completed.
    pub epoch: usize,
    /// Optimizer steps taken.
    pub step: u64,
}

fn ck_err(path: &Path, m: impl std::fmt::Display) -> SessionError {
    SessionError::Checkpoint(format!("{}: {m}", path.display()))
}

/// Saves the session and its progress; `extra` metadata (model spec, normalisation, …) is stored too.
pub fn save(
    path: &Path,
    s: &mut Session,
    progress: &Progress,
    extra: &BTreeMap<String, String>,
) -> Result<(), SessionError> {
    let mut entries: Vec<(String, Entry)> = weights::state_entries(&mut s.net)
        .into_iter()
        .map(|(n, e)| (format!("model.{n}"), e))
        .collect();
    let slots = s.opt.slot_names();
    let mut names = Vec::new();
    s.net.visit_params(&mut |n, _| names.push(n.to_string()));
    for (i, name) in names.iter().enumerate() {
        if let Some(st) = s.opt.state.get(i) {
            for (slot, t) in slots.iter().zip(st) {
                entries.push((
                    format!("optim.{slot}.{name}"),
                    Entry::f32(&t.shape, &t.data),
                ));
            }
        }
    }
    let mut meta = extra.clone();
    meta.insert("asymml.checkpoint.epoch".into(), progress.epoch.to_string());
    meta.insert("asymml.checkpoint.step".into(), progress.step.to_string());
    meta.insert(
        "asymml.checkpoint.opt_steps".into(),
        s.opt.steps.to_string(),
    );
    meta.insert(
        "asymml.checkpoint.rng".into(),
        serde_json::to_string(&s.net.rng.state()).map_err(|e| ck_err(path, e))?,
    );
    meta.insert(
        "asymml.checkpoint.config".into(),
        serde_json::to_string(&s.config).map_err(|e| ck_err(path, e))?,
    );
    meta.insert("asymml.checkpoint.mode".into(), s.mode.to_string());
    let bytes = weights::serialize(&entries, &meta)?;
    weights::write_atomic(path, &bytes)?;
    Ok(())
}

/// The training configuration stored in a checkpoint.
pub fn read_config(
    meta: &BTreeMap<String, String>,
    path: &Path,
) -> Result<TrainConfig, SessionError> {
    let c = meta.get("asymml.checkpoint.config").ok_or_else(|| {
        ck_err(
            path,
            "not an asymml checkpoint (no training config in its metadata)",
        )
    })?;
    serde_json::from_str(c).map_err(|e| ck_err(path, format!("bad training config: {e}")))
}

/// Restores model weights, optimizer state and progress into `s` (whose net must have the same spec).
pub fn load(
    path: &Path,
    s: &mut Session,
) -> Result<(Progress, BTreeMap<String, String>), SessionError> {
    let bytes = weights::read_file(path)?;
    let meta = weights::metadata(&bytes)?;
    let num = |k: &str| -> Result<u64, SessionError> {
        meta.get(k)
            .ok_or_else(|| ck_err(path, format!("missing {k}")))?
            .parse::<u64>()
            .map_err(|e| ck_err(path, format!("{k}: {e}")))
    };
    let progress = Progress {
        epoch: num("asymml.checkpoint.epoch")? as usize,
        step: num("asymml.checkpoint.step")?,
    };
    let opt_steps = num("asymml.checkpoint.opt_steps")?;
    // In split mode the conv weights' optimizer state lives on the accelerator and is not in the checkpoint:
    // those parameters restart with a fresh state (momentum) on resume.
    let split = meta.get("asymml.checkpoint.mode").map(String::as_str) == Some("split");
    let rng: [u64; 4] = meta
        .get("asymml.checkpoint.rng")
        .and_then(|r| serde_json::from_str(r).ok())
        .ok_or_else(|| ck_err(path, "missing or bad generator state"))?;
    weights::load_bytes(&mut s.net, &bytes, "model.").map_err(|e| ck_err(path, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| ck_err(path, e))?;
    let slots = s.opt.slot_names();
    let mut shapes = Vec::new();
    s.net
        .visit_params(&mut |n, p| shapes.push((n.to_string(), p.value.shape.clone())));
    let mut state = Vec::with_capacity(shapes.len());
    for (name, shape) in &shapes {
        let mut per = Vec::new();
        for slot in slots {
            let key = format!("optim.{slot}.{name}");
            match st.tensor(&key) {
                Ok(v) if v.shape() == shape.as_slice() => {
                    per.push(Tensor {
                        shape: shape.clone(),
                        data: weights::view_f32(&key, &v)?,
                    });
                }
                Ok(v) => {
                    return Err(ck_err(
                        path,
                        format!("{key}: shape {:?}, expected {shape:?}", v.shape()),
                    ))
                }
                Err(_) if opt_steps == 0 || split => {}
                Err(_) => return Err(ck_err(path, format!("missing optimizer state {key}"))),
            }
        }
        if per.len() != slots.len() {
            per.clear();
        }
        state.push(per);
    }
    s.opt.state = if opt_steps == 0 { Vec::new() } else { state };
    s.opt.steps = opt_steps;
    s.step = progress.step;
    s.net.rng = asymml_core::rng::Rng::from_state(rng);
    Ok((progress, meta))
}
