//! Helpers shared by the integration tests: PyTorch fixtures, tolerance checks, random tensors and a
//! finite-difference gradient checker.
//!
//! Set `ASYMML_TEST_REPORT=1` to print the relative error of every comparison (silent otherwise).

#![allow(dead_code)]

use asymml_core::layers::Param;
use asymml_core::rng::Rng;
use asymml_core::weights::view_f32;
use asymml_core::Tensor;
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock};

/// Relative tolerance of the comparisons with PyTorch.
pub const TOL: f64 = 1e-4;

/// Every tensor of one fixture file, decoded; `bytes` keeps the raw file for `weights::load_bytes`.
pub struct Fixture {
    pub file: String,
    pub bytes: Vec<u8>,
    floats: BTreeMap<String, Tensor>,
    ints: BTreeMap<String, Vec<i64>>,
}

impl Fixture {
    fn load(file: &str) -> Fixture {
        let path = format!("{}/tests/fixtures/{file}", env!("CARGO_MANIFEST_DIR"));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
        let mut floats = BTreeMap::new();
        let mut ints = BTreeMap::new();
        {
            let st = SafeTensors::deserialize(&bytes)
                .unwrap_or_else(|e| panic!("{file}: not a safetensors file: {e}"));
            for (name, view) in st.tensors() {
                match view.dtype() {
                    Dtype::F32 => {
                        let data = view_f32(&name, &view).unwrap();
                        floats.insert(
                            name,
                            Tensor::from_vec(view.shape(), data).expect("fixture shape"),
                        );
                    }
                    Dtype::I64 => {
                        let v = view
                            .data()
                            .chunks_exact(8)
                            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                            .collect();
                        ints.insert(name, v);
                    }
                    other => panic!("{file}: {name} has unexpected dtype {other:?}"),
                }
            }
        }
        Fixture {
            file: file.to_string(),
            bytes,
            floats,
            ints,
        }
    }

    /// The f32 tensor `name` (panics naming the file if absent).
    pub fn t(&self, name: &str) -> &Tensor {
        self.floats
            .get(name)
            .unwrap_or_else(|| panic!("{}: no f32 tensor {name}", self.file))
    }

    /// True when the file holds a tensor `name` (any dtype).
    pub fn has(&self, name: &str) -> bool {
        self.floats.contains_key(name) || self.ints.contains_key(name)
    }

    /// The int64 tensor `name`, flattened.
    pub fn ints(&self, name: &str) -> &[i64] {
        self.ints
            .get(name)
            .unwrap_or_else(|| panic!("{}: no int64 tensor {name}", self.file))
    }

    /// Class labels stored as int64.
    pub fn labels(&self, name: &str) -> Vec<usize> {
        self.ints(name).iter().map(|&v| v as usize).collect()
    }

    /// Names (of any dtype) that start with `prefix`, with the prefix removed, sorted.
    pub fn names_under(&self, prefix: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .floats
            .keys()
            .chain(self.ints.keys())
            .filter_map(|n| n.strip_prefix(prefix).map(str::to_string))
            .collect();
        v.sort();
        v
    }
}

/// The fixture `file` of `tests/fixtures/`, read once per test binary.
pub fn fixture(file: &str) -> Arc<Fixture> {
    static CACHE: OnceLock<Mutex<HashMap<String, Arc<Fixture>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut map = cache.lock().unwrap_or_else(|e| e.into_inner());
    map.entry(file.to_string())
        .or_insert_with(|| Arc::new(Fixture::load(file)))
        .clone()
}

/// Prints `line` when `ASYMML_TEST_REPORT` is set.
pub fn report(line: impl FnOnce() -> String) {
    if std::env::var_os("ASYMML_TEST_REPORT").is_some() {
        eprintln!("{}", line());
    }
}

/// (max |a − b|, max(max |b|, `floor`), their ratio), in f64; NaN anywhere gives an infinite ratio.
pub fn rel_err(got: &[f32], want: &[f32], floor: f64) -> (f64, f64, f64) {
    let mut diff = 0f64;
    let mut scale = floor;
    let mut nan = false;
    for (&a, &b) in got.iter().zip(want) {
        nan |= a.is_nan() || b.is_nan();
        diff = diff.max((a as f64 - b as f64).abs());
        scale = scale.max((b as f64).abs());
    }
    let rel = if nan { f64::INFINITY } else { diff / scale };
    (diff, scale, rel)
}

/// Asserts `max|got − want| / max(max|want|, floor) ≤ TOL` (and equal lengths).
pub fn assert_close_floor(name: &str, got: &[f32], want: &[f32], floor: f64) {
    assert_eq!(
        got.len(),
        want.len(),
        "{name}: {} values, expected {}",
        got.len(),
        want.len()
    );
    let (diff, scale, rel) = rel_err(got, want, floor);
    report(|| format!("{name}: rel {rel:.2e}"));
    assert!(
        rel <= TOL,
        "{name}: max abs diff {diff:.3e}, scale {scale:.3e}, relative {rel:.3e} > {TOL:e}"
    );
}

/// Asserts `max|got − want| / max(max|want|, 1e-6) ≤ TOL` (and equal lengths).
pub fn assert_close_slice(name: &str, got: &[f32], want: &[f32]) {
    assert_close_floor(name, got, want, 1e-6);
}

/// [`assert_close_slice`] after checking that the shapes are equal.
pub fn assert_close(name: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.shape, want.shape, "{name}: shape");
    assert_close_slice(name, &got.data, &want.data);
}

/// A tensor of standard normal values times `scale`.
pub fn randn(rng: &mut Rng, shape: &[usize], scale: f32) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(shape, (0..n).map(|_| rng.normal() * scale).collect()).unwrap()
}

/// A tensor whose every H×W plane is a random permutation of evenly spaced values `(i − n/2 + ½)·step`:
/// no two values in a window are closer than `step` and none is closer than `step/2` to zero, so a
/// finite-difference step below `step/2` moves no max-pool argmax and crosses no ReLU kink.
pub fn spaced(rng: &mut Rng, shape: &[usize], step: f32) -> Tensor {
    let plane = shape[shape.len() - 2..].iter().product::<usize>();
    let n: usize = shape.iter().product();
    let mut data = Vec::with_capacity(n);
    for _ in 0..n / plane {
        let mut v: Vec<f32> = (0..plane)
            .map(|i| (i as f32 - plane as f32 / 2.0 + 0.5) * step)
            .collect();
        rng.shuffle(&mut v);
        data.extend(v);
    }
    Tensor::from_vec(shape, data).unwrap()
}

/// Σ a·b in f64.
pub fn dot(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.shape, b.shape, "dot: shapes differ");
    a.data
        .iter()
        .zip(&b.data)
        .map(|(&x, &y)| x as f64 * y as f64)
        .sum()
}

/// A differentiable operation for [`gradcheck`]: a layer (or block, or network) with its parameters.
pub trait Op {
    /// x → y.
    fn forward(&mut self, x: &Tensor) -> Tensor;
    /// Called right after `forward(x)`: dy → dx, accumulating every parameter gradient.
    fn backward(&mut self, x: &Tensor, dy: &Tensor) -> Tensor;
    /// Calls `f` on every parameter, in a fixed order.
    fn params(&mut self, _f: &mut dyn FnMut(&str, &mut Param)) {}
}

/// Finite-difference settings: step `eps`; an element passes when
/// `|numeric − analytic| ≤ rtol·|analytic| + atol·max(max|analytic|, 1)` over its tensor.
#[derive(Clone, Copy, Debug)]
pub struct Fd {
    pub eps: f32,
    pub rtol: f64,
    pub atol: f64,
    /// At most this many elements per tensor are checked (a random subset of larger tensors).
    pub max_elems: usize,
    /// For blocks and networks, whose inner ReLU and max-pool kinks cannot be kept away from the point
    /// (a max-pool near-tie 1e-5 away spoils the central difference at any usable step): accept an
    /// element whose one-sided difference, (L(+eps) − L)/eps or (L − L(−eps))/eps, matches, and up to
    /// 10% (at least one) elements per tensor that match none (kinks on both sides). A wrong gradient
    /// (a missing residual path, a mis-wired block) is off on most elements.
    pub kinks: bool,
}

impl Default for Fd {
    fn default() -> Self {
        Fd {
            eps: 1e-2,
            rtol: 2e-2,
            atol: 2e-3,
            max_elems: 400,
            kinks: false,
        }
    }
}

enum Target {
    Input,
    Param(usize),
}

/// L(x) = Σ forward(x)·r after adding `delta` to element `i` of the target (restored afterwards).
fn loss_at(op: &mut dyn Op, x: &Tensor, r: &Tensor, target: &Target, i: usize, delta: f32) -> f64 {
    match *target {
        Target::Input => {
            let mut xp = x.clone();
            xp.data[i] += delta;
            dot(&op.forward(&xp), r)
        }
        Target::Param(j) => {
            let mut orig = 0.0;
            let mut k = 0;
            op.params(&mut |_, p| {
                if k == j {
                    orig = p.value.data[i];
                    p.value.data[i] = orig + delta;
                }
                k += 1;
            });
            let l = dot(&op.forward(x), r);
            let mut k = 0;
            op.params(&mut |_, p| {
                if k == j {
                    p.value.data[i] = orig;
                }
                k += 1;
            });
            l
        }
    }
}

/// Checks ∇x and every ∇param of `op` at `x` against central differences of L = Σ y·r (r random normal,
/// seeded by `seed`). Returns the largest `|numeric − analytic| / max(max|analytic|, 1)` seen.
pub fn gradcheck(what: &str, op: &mut dyn Op, x: &Tensor, fd: Fd, seed: u64) -> f64 {
    let mut rng = Rng::new(seed);
    let y = op.forward(x);
    let r = randn(&mut rng, &y.shape, 1.0);
    let l0 = dot(&y, &r);
    op.params(&mut |_, p| p.zero_grad());
    let dx = op.backward(x, &r);
    assert_eq!(dx.shape, x.shape, "{what}: dx shape");
    let mut tensors = vec![("x".to_string(), Target::Input, dx)];
    let mut j = 0;
    op.params(&mut |name, p| {
        tensors.push((name.to_string(), Target::Param(j), p.grad.clone()));
        j += 1;
    });
    let mut worst = 0f64;
    for (name, target, grad) in &tensors {
        let scale = grad.data.iter().fold(1f64, |m, &g| m.max((g as f64).abs()));
        let mut idx: Vec<usize> = (0..grad.len()).collect();
        if idx.len() > fd.max_elems {
            rng.shuffle(&mut idx);
            idx.truncate(fd.max_elems);
        }
        let mut bad = Vec::new();
        for &i in &idx {
            let lp = loss_at(op, x, &r, target, i, fd.eps);
            let lm = loss_at(op, x, &r, target, i, -fd.eps);
            let e = fd.eps as f64;
            let ana = grad.data[i] as f64;
            let num = (lp - lm) / (2.0 * e);
            let mut err = (num - ana).abs();
            if fd.kinks {
                err = err.min(((lp - l0) / e - ana).abs());
                err = err.min(((l0 - lm) / e - ana).abs());
            }
            worst = worst.max(err / scale);
            let within = err <= fd.rtol * ana.abs() + fd.atol * scale; // false on NaN
            if !within {
                let one_sided = if fd.kinks {
                    format!(" (one-sided {:.5}, {:.5})", (lp - l0) / e, (l0 - lm) / e)
                } else {
                    String::new()
                };
                bad.push(format!(
                    "[{i}] numeric {num:.5}{one_sided} analytic {ana:.5}"
                ));
            }
        }
        let allowed = if fd.kinks { (idx.len() / 10).max(1) } else { 0 };
        assert!(
            bad.len() <= allowed,
            "{what}: ∇{name} ({} of {} checked elements off, {allowed} allowed, scale {scale:.3}): {}",
            bad.len(),
            idx.len(),
            bad.iter().take(6).cloned().collect::<Vec<_>>().join(", ")
        );
    }
    report(|| format!("{what}: worst fd error {worst:.2e}"));
    worst
}
