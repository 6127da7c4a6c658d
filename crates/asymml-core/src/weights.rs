//! Weight files: safetensors with torchvision's parameter names. A state dict saved from torchvision loads
//! unchanged (strict: every name and shape must match), and ours loads in PyTorch with `load_state_dict`.

use crate::error::{CoreError, Result};
use crate::models::{Net, StateMut};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Raw little-endian bytes of an f32 slice.
fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// One named tensor to write: dtype, shape, bytes.
pub struct Entry {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl Entry {
    pub fn f32(shape: &[usize], data: &[f32]) -> Self {
        Entry {
            dtype: Dtype::F32,
            shape: shape.to_vec(),
            bytes: f32_bytes(data),
        }
    }
    pub fn i64_scalar(v: i64) -> Self {
        Entry {
            dtype: Dtype::I64,
            shape: vec![],
            bytes: v.to_le_bytes().to_vec(),
        }
    }
}

/// The state dict of `net` as named entries (f32 tensors, int64 `num_batches_tracked`).
pub fn state_entries(net: &mut Net) -> Vec<(String, Entry)> {
    let mut out = Vec::new();
    net.visit_state(&mut |name, s| {
        let e = match s {
            StateMut::Tensor(t) => Entry::f32(&t.shape, &t.data),
            StateMut::Counter(c) => Entry::i64_scalar(*c),
        };
        out.push((name, e));
    });
    out
}

/// Serialises entries and metadata into safetensors bytes.
pub fn serialize(
    entries: &[(String, Entry)],
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    let views: Vec<(String, TensorView)> = entries
        .iter()
        .map(|(n, e)| {
            TensorView::new(e.dtype, e.shape.clone(), &e.bytes)
                .map(|v| (n.clone(), v))
                .map_err(|err| CoreError::Weights(format!("{n}: {err}")))
        })
        .collect::<Result<_>>()?;
    let meta: HashMap<String, String> = metadata.clone().into_iter().collect();
    safetensors::serialize(views, Some(meta)).map_err(|e| CoreError::Weights(e.to_string()))
}

/// Writes `bytes` to `path` atomically: a temporary file in the same folder, then a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |source| CoreError::Io {
        path: path.display().to_string(),
        source,
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(e)
    })
}

/// Saves the model's state dict (plus `metadata`, e.g. the model spec and normalisation) to `path`.
pub fn save(net: &mut Net, path: &Path, metadata: &BTreeMap<String, String>) -> Result<()> {
    let entries = state_entries(net);
    let bytes = serialize(&entries, metadata)?;
    write_atomic(path, &bytes)
}

/// Reads a safetensors file fully.
pub fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| CoreError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// The metadata map of safetensors bytes (empty if none).
pub fn metadata(bytes: &[u8]) -> Result<BTreeMap<String, String>> {
    let (_, meta) = SafeTensors::read_metadata(bytes)
        .map_err(|e| CoreError::Weights(format!("not a safetensors file: {e}")))?;
    Ok(meta
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect())
}

/// Decodes a tensor view as f32 values (accepting F32, F64, F16 and BF16 files).
pub fn view_f32(name: &str, v: &TensorView) -> Result<Vec<f32>> {
    let d = v.data();
    Ok(match v.dtype() {
        Dtype::F32 => d
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F64 => d
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as f32)
            .collect(),
        Dtype::BF16 => d
            .chunks_exact(2)
            .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
            .collect(),
        Dtype::F16 => d
            .chunks_exact(2)
            .map(|b| f16_to_f32(u16::from_le_bytes([b[0], b[1]])))
            .collect(),
        other => {
            return Err(CoreError::Weights(format!(
                "{name}: unsupported dtype {other:?} (expected a float type)"
            )))
        }
    })
}

/// Decodes an integer scalar (I64, I32) view.
fn view_int(name: &str, v: &TensorView) -> Result<i64> {
    let d = v.data();
    match v.dtype() {
        Dtype::I64 if d.len() == 8 => Ok(i64::from_le_bytes(d.try_into().unwrap_or([0; 8]))),
        Dtype::I32 if d.len() == 4 => Ok(i32::from_le_bytes(d.try_into().unwrap_or([0; 4])) as i64),
        other => Err(CoreError::Weights(format!(
            "{name}: expected an integer scalar, got {other:?} {:?}",
            v.shape()
        ))),
    }
}

fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as i32;
    let man = (h & 0x3ff) as u32;
    let bits = if exp == 0 {
        if man == 0 {
            sign
        } else {
            // subnormal
            let v = man as f32 * (1.0 / (1u32 << 24) as f32);
            return if sign != 0 { -v } else { v };
        }
    } else if exp == 31 {
        sign | 0x7f80_0000 | (man << 13)
    } else {
        sign | (((exp - 15 + 127) as u32) << 23) | (man << 13)
    };
    f32::from_bits(bits)
}

/// Loads a state dict into `net` from safetensors bytes. `prefix` is prepended to every expected name
/// (e.g. `"model."` in checkpoints). Strict: a missing name, an unexpected name (under the prefix), a shape
/// that differs, or a non-finite value is an error naming the tensor. `num_batches_tracked` may be absent.
pub fn load_bytes(net: &mut Net, bytes: &[u8], prefix: &str) -> Result<()> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| CoreError::Weights(format!("not a safetensors file: {e}")))?;
    let expected = net.state_shapes();
    let names: std::collections::HashSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    let mut unexpected: Vec<String> = st
        .names()
        .into_iter()
        .filter_map(|n| n.strip_prefix(prefix))
        .filter(|n| !names.contains(n))
        .map(|s| s.to_string())
        .collect();
    unexpected.sort();
    let mut missing = Vec::new();
    let mut problems = Vec::new();
    for (name, shape) in &expected {
        let full = format!("{prefix}{name}");
        match st.tensor(&full) {
            Ok(v) => {
                let is_counter = name.ends_with("num_batches_tracked");
                if !is_counter && v.shape() != shape.as_slice() {
                    problems.push(format!(
                        "{name}: shape {:?} in the file, the model needs {shape:?}",
                        v.shape()
                    ));
                }
            }
            Err(_) if name.ends_with("num_batches_tracked") => {}
            Err(_) => missing.push(name.clone()),
        }
    }
    if !missing.is_empty() || !unexpected.is_empty() || !problems.is_empty() {
        let show = |v: &[String]| {
            let mut s = v.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
            if v.len() > 5 {
                s.push_str(&format!(", … ({} in all)", v.len()));
            }
            s
        };
        let mut msg = format!("the weights do not match model {}", net.spec.name());
        if !problems.is_empty() {
            msg.push_str(&format!("; wrong shapes: {}", show(&problems)));
        }
        if !missing.is_empty() {
            msg.push_str(&format!("; missing: {}", show(&missing)));
        }
        if !unexpected.is_empty() {
            msg.push_str(&format!("; not in the model: {}", show(&unexpected)));
        }
        return Err(CoreError::Weights(msg));
    }
    net.try_visit_state(&mut |name, s| {
        let full = format!("{prefix}{name}");
        let Ok(v) = st.tensor(&full) else {
            return Ok(());
        };
        match s {
            StateMut::Tensor(t) => {
                let vals = view_f32(&name, &v)?;
                if vals.iter().any(|x| !x.is_finite()) {
                    return Err(CoreError::Weights(format!(
                        "{name}: contains NaN or infinite values"
                    )));
                }
                t.data.copy_from_slice(&vals);
                Ok(())
            }
            StateMut::Counter(c) => view_int(&name, &v).map(|x| *c = x),
        }
    })
}

/// Loads weights from a file (see [`load_bytes`]).
pub fn load(net: &mut Net, path: &Path) -> Result<()> {
    let bytes = read_file(path)?;
    load_bytes(net, &bytes, "").map_err(|e| match e {
        CoreError::Weights(m) => CoreError::Weights(format!("{}: {m}", path.display())),
        other => other,
    })
}
