//! What asymml writes into weight files besides the tensors (the model spec, the normalisation, the class
//! names, the dataset, the training settings), reading it back, and the model a weight file holds.

use crate::data::Dataset;
use anyhow::{bail, Context, Result};
use asymml_core::models::{ModelSpec, Net};
use asymml_core::weights;
use std::collections::BTreeMap;
use std::path::Path;

/// Metadata keys asymml writes into weight files.
pub(crate) const META_SPEC: &str = "asymml.spec";
pub(crate) const META_MEAN: &str = "asymml.mean";
pub(crate) const META_STD: &str = "asymml.std";
pub(crate) const META_CLASSES: &str = "asymml.class_names";
pub(crate) const META_DATASET: &str = "asymml.dataset";
pub(crate) const META_ARGS: &str = "asymml.train_args";

/// What a weight file says about the model it holds.
#[derive(Clone, Debug, Default)]
pub(crate) struct WeightInfo {
    pub(crate) spec: Option<ModelSpec>,
    pub(crate) mean: Option<Vec<f32>>,
    pub(crate) std: Option<Vec<f32>>,
    pub(crate) class_names: Option<Vec<String>>,
    pub(crate) meta: BTreeMap<String, String>,
}

/// Reads a weight file and its asymml metadata (a torchvision state dict has none: all fields `None`).
pub(crate) fn read(path: &Path) -> Result<(Vec<u8>, WeightInfo)> {
    let bytes = weights::read_file(path)?;
    let meta = weights::metadata(&bytes).with_context(|| format!("reading {}", path.display()))?;
    let info = WeightInfo {
        spec: from_meta(&meta, META_SPEC),
        mean: from_meta(&meta, META_MEAN),
        std: from_meta(&meta, META_STD),
        class_names: from_meta(&meta, META_CLASSES),
        meta: meta.clone(),
    };
    Ok((bytes, info))
}

/// A JSON value from weight-file metadata (`None` when absent or malformed).
fn from_meta<T: serde::de::DeserializeOwned>(
    meta: &BTreeMap<String, String>,
    key: &str,
) -> Option<T> {
    meta.get(key).and_then(|v| serde_json::from_str(v).ok())
}

/// Metadata describing a model trained on `data` (spec, normalisation, class names, dataset name).
pub(crate) fn metadata(
    spec: &ModelSpec,
    data: &Dataset,
    dataset: &str,
) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    m.insert(META_SPEC.into(), to_json(spec));
    m.insert(META_MEAN.into(), to_json(&data.mean));
    m.insert(META_STD.into(), to_json(&data.std));
    m.insert(META_CLASSES.into(), to_json(&data.class_names));
    m.insert(META_DATASET.into(), dataset.to_string());
    m
}

/// JSON text of a value (metadata values are JSON strings).
pub(crate) fn to_json<T: serde::Serialize + ?Sized>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// Loads weights into `net` from bytes read earlier, with the file named in errors.
pub(crate) fn load_into(net: &mut Net, bytes: &[u8], path: &Path) -> Result<()> {
    weights::load_bytes(net, bytes, "")
        .with_context(|| format!("loading weights from {}", path.display()))
}

/// The model spec for a weight file: its metadata, else the flags. A flag that contradicts the metadata is
/// an error rather than a silent choice.
pub(crate) fn resolve_spec(
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
