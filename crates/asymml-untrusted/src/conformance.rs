//! A conformance check of a conv backend against another (the CPU backend as the reference): the same
//! registration, forwards (a shared one included), backwards (∇X and ∇W_U) and weight replacements by the
//! trusted runtime (`set_weights`, which the next forward must use), compared value by value; plus the
//! requests every backend must refuse with an error. The CUDA backend's tests run it on a GPU; here it also
//! runs CPU against CPU.

use crate::backend::{BackendError, ConvBackend, ConvLayer};
use asymml_core::rng::Rng;
use asymml_core::Tensor;

fn random(shape: &[usize], rng: &mut Rng) -> Tensor {
    let n = shape.iter().product();
    Tensor {
        shape: shape.to_vec(),
        data: (0..n).map(|_| rng.normal()).collect(),
    }
}

/// max |a − b| / max(max |a|, 1e-6), or an error naming `what` when above `tol` or when the shapes differ.
fn compare(what: &str, a: &Tensor, b: &Tensor, tol: f64) -> Result<f64, String> {
    if a.shape != b.shape || a.data.len() != b.data.len() {
        return Err(format!("{what}: shapes {:?} and {:?}", a.shape, b.shape));
    }
    let scale = a.data.iter().fold(1e-6f32, |m, v| m.max(v.abs())) as f64;
    let diff = a
        .data
        .iter()
        .zip(&b.data)
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs() as f64));
    let rel = diff / scale;
    if rel.is_finite() && rel <= tol {
        Ok(rel)
    } else {
        Err(format!("{what}: relative difference {rel:.3e} > {tol:.0e}"))
    }
}

fn pair(
    what: &str,
    a: (Tensor, Option<Tensor>),
    b: (Tensor, Option<Tensor>),
    tol: f64,
) -> Result<f64, String> {
    let mut worst = compare(&format!("{what} weight"), &a.0, &b.0, tol)?;
    match (a.1, b.1) {
        (Some(x), Some(y)) => worst = worst.max(compare(&format!("{what} bias"), &x, &y, tol)?),
        (None, None) => {}
        _ => return Err(format!("{what}: one backend has a bias, the other not")),
    }
    Ok(worst)
}

fn e(what: &str) -> impl Fn(BackendError) -> String + '_ {
    move |err| format!("{what}: {err}")
}

/// The model of the check: a 3×3 conv with bias, a strided 3×3 conv without, and a strided 1×1 "shortcut"
/// with bias that reads the second conv's residual.
fn layers() -> Vec<ConvLayer> {
    vec![
        ConvLayer {
            in_ch: 3,
            out_ch: 8,
            k: 3,
            stride: 1,
            pad: 1,
            bias: true,
        },
        ConvLayer {
            in_ch: 8,
            out_ch: 16,
            k: 3,
            stride: 2,
            pad: 1,
            bias: false,
        },
        ConvLayer {
            in_ch: 8,
            out_ch: 16,
            k: 1,
            stride: 2,
            pad: 0,
            bias: true,
        },
    ]
}

/// The weights after a step of the trusted runtime's optimizer (plain SGD with learning rate `lr` on the
/// weight's ∇W_U; the bias moved by `lr` times a random ∇b, which the trusted side computes itself).
fn stepped(
    old: &[(Tensor, Option<Tensor>)],
    dws: &[Tensor],
    lr: f32,
    rng: &mut Rng,
) -> Vec<(Tensor, Option<Tensor>)> {
    old.iter()
        .zip(dws)
        .map(|((w, b), dw)| {
            let mut w = w.clone();
            w.data
                .iter_mut()
                .zip(&dw.data)
                .for_each(|(v, g)| *v -= lr * g);
            let b = b.as_ref().map(|b| {
                let mut b = b.clone();
                b.data.iter_mut().for_each(|v| *v -= lr * rng.normal());
                b
            });
            (w, b)
        })
        .collect()
}

/// Runs two training steps on both backends and compares everything they return; `tol` bounds the
/// convolutions' relative difference. Between the steps the reference is registered anew with the stepped
/// weights and the tested backend gets them through `set_weights` (so the second step's outputs agree only if
/// the tested backend's forward and backward use them); at the end both take the next weights through
/// `set_weights`, which must then be what `weights` returns, exactly, and what the next forward uses.
/// Returns the largest difference seen.
pub(crate) fn check_against<'a>(
    reference: &'a mut dyn ConvBackend,
    tested: &'a mut dyn ConvBackend,
    tol: f64,
) -> Result<f64, String> {
    let mut rng = Rng::new(7);
    let ls = layers();
    let mut weights: Vec<(Tensor, Option<Tensor>)> = ls
        .iter()
        .map(|l| {
            let w = random(&l.weight_shape(), &mut rng);
            let b = l.bias.then(|| random(&[l.out_ch], &mut rng));
            (w, b)
        })
        .collect();
    reference
        .register(&ls, weights.clone())
        .map_err(e("register (reference)"))?;
    tested
        .register(&ls, weights.clone())
        .map_err(e("register"))?;
    if tested.num_layers() != 3 || tested.layer(1) != Some(ls[1]) {
        return Err("the registered layers differ".into());
    }
    let mut worst = 0.0f64;
    // Forwards on batch 2, then 3 (a second shape plan), then 2 again after the last weight replacement.
    for step in 0..3 {
        let b = if step == 1 { 3 } else { 2 };
        let x0 = random(&[b, 3, 9, 9], &mut rng);
        let x1 = random(&[b, 8, 9, 9], &mut rng);
        let mut ys = Vec::new();
        for (k, be) in [&mut *reference, &mut *tested].into_iter().enumerate() {
            let y0 = be.forward(0, x0.clone(), true).map_err(e("forward 0"))?;
            let y1 = if k == 1 && step == 1 {
                // In two parts (a micro-batched forward), then the whole batch's residual cached for the
                // shortcut conv and the backward.
                let per = x1.len() / b;
                let (mut y, mut shape) = (Vec::new(), Vec::new());
                for (a, z) in [(0, 1), (1, b)] {
                    let part =
                        Tensor::from_vec(&[z - a, 8, 9, 9], x1.data[a * per..z * per].to_vec())
                            .map_err(|e| e.to_string())?;
                    let yp = be.forward(1, part, true).map_err(e("forward 1 (part)"))?;
                    shape.clone_from(&yp.shape);
                    y.extend(yp.data);
                }
                be.set_cached(1, x1.clone()).map_err(e("set_cached"))?;
                shape[0] = b;
                Tensor::from_vec(&shape, y).map_err(|e| e.to_string())?
            } else {
                be.forward(1, x1.clone(), true).map_err(e("forward 1"))?
            };
            let y2 = be.forward_shared(2, 1, true).map_err(e("forward 2"))?;
            ys.push([y0, y1, y2]);
        }
        for (i, (a, t)) in ys[0].iter().zip(&ys[1]).enumerate() {
            worst = worst.max(compare(&format!("step {step}: Y of conv {i}"), a, t, tol)?);
        }
        if step == 2 {
            break;
        }
        let dys: Vec<Tensor> = ys[0].iter().map(|y| random(&y.shape, &mut rng)).collect();
        let mut grads = Vec::new();
        for be in [&mut *reference, &mut *tested] {
            let (dx0, dw0) = be.backward(0, &dys[0], false).map_err(e("backward 0"))?;
            let (dx1, dw1) = be.backward(1, &dys[1], true).map_err(e("backward 1"))?;
            let (dx2, dw2) = be.backward(2, &dys[2], true).map_err(e("backward 2"))?;
            if dx0.is_some() {
                return Err("backward without need_dx returned ∇X".into());
            }
            grads.push(([dx1, dx2], [dw0, dw1, dw2]));
        }
        let (tested_grads, reference_grads) = (grads.pop(), grads.pop());
        let (Some((ref_dx, ref_dw)), Some((dx, dw))) = (reference_grads, tested_grads) else {
            return Err("backward results missing".into());
        };
        for (i, (a, t)) in ref_dx.iter().zip(&dx).enumerate() {
            match (a, t) {
                (Some(a), Some(t)) => {
                    worst = worst.max(compare(
                        &format!("step {step}: ∇X of conv {}", i + 1),
                        a,
                        t,
                        tol,
                    )?)
                }
                _ => return Err(format!("step {step}: ∇X of conv {} missing", i + 1)),
            }
        }
        for (l, (a, t)) in ref_dw.iter().zip(&dw).enumerate() {
            if a.shape != ls[l].weight_shape() {
                return Err(format!(
                    "step {step}: ∇W_U of conv {l} has shape {:?}, expected {:?}",
                    a.shape,
                    ls[l].weight_shape()
                ));
            }
            worst = worst.max(compare(
                &format!("step {step}: ∇W_U of conv {l}"),
                a,
                t,
                tol,
            )?);
        }
        let next = stepped(&weights, &ref_dw, 0.01, &mut rng);
        if next.iter().zip(&weights).any(|(n, o)| n.0.data == o.0.data) {
            return Err(format!("step {step}: ∇W_U changed no weight of a conv"));
        }
        weights = next;
        if step == 0 {
            // The reference through the registration path, the tested backend through `set_weights`.
            reference
                .register(&ls, weights.clone())
                .map_err(e("register (reference, stepped)"))?;
            for (l, (w, b)) in weights.iter().enumerate() {
                tested
                    .set_weights(l as u32, w.clone(), b.clone())
                    .map_err(e("set_weights"))?;
            }
        } else {
            for be in [&mut *reference, &mut *tested] {
                for (l, (w, b)) in weights.iter().enumerate() {
                    be.set_weights(l as u32, w.clone(), b.clone())
                        .map_err(e("set_weights"))?;
                }
            }
        }
        for be in [&mut *reference, &mut *tested] {
            for (l, set) in weights.iter().enumerate() {
                let got = be.weights(l as u32).map_err(e("weights"))?;
                pair(
                    &format!("step {step}: conv {l} after set_weights"),
                    set.clone(),
                    got,
                    0.0,
                )?;
            }
        }
    }
    Ok(worst)
}

/// Requests a fresh backend must answer with an error (and stay usable after, its weights unchanged).
pub(crate) fn check_refusals(be: &mut dyn ConvBackend) -> Result<(), String> {
    let mut rng = Rng::new(3);
    let ls = layers();
    let good: Vec<(Tensor, Option<Tensor>)> = ls
        .iter()
        .map(|l| {
            (
                random(&l.weight_shape(), &mut rng),
                l.bias.then(|| random(&[l.out_ch], &mut rng)),
            )
        })
        .collect();
    let refused = |r: Result<(), BackendError>, what: &str| match r {
        Err(_) => Ok(()),
        Ok(()) => Err(format!("{what} was accepted")),
    };
    refused(
        be.set_weights(0, good[0].0.clone(), good[0].1.clone()),
        "set_weights before any registration",
    )?;
    let mut bad = good.clone();
    bad[1].0 = random(&[16, 8, 3, 1], &mut rng);
    refused(be.register(&ls, bad), "a weight of the wrong shape")?;
    let mut bad = good.clone();
    bad[1].1 = Some(random(&[16], &mut rng));
    refused(be.register(&ls, bad), "a bias for a layer without")?;
    refused(be.register(&ls, good[..2].to_vec()), "too few weight sets")?;
    be.register(&ls, good.clone()).map_err(e("register"))?;
    refused(
        be.backward(0, &random(&[2, 8, 9, 9], &mut rng), true)
            .map(|_| ()),
        "backward before forward",
    )?;
    refused(
        be.forward(0, random(&[2, 4, 9, 9], &mut rng), true)
            .map(|_| ()),
        "an input with the wrong channels",
    )?;
    refused(
        be.forward(0, random(&[2, 3, 9], &mut rng), true)
            .map(|_| ()),
        "a 3-d input",
    )?;
    refused(
        be.forward(2, random(&[1, 8, 0, 0], &mut rng), true)
            .map(|_| ()),
        "an empty input",
    )?;
    refused(
        be.forward(1, random(&[0, 8, 4, 4], &mut rng), true)
            .map(|_| ()),
        "an empty batch",
    )?;
    refused(
        be.forward(7, random(&[2, 3, 9, 9], &mut rng), true)
            .map(|_| ()),
        "an unknown layer",
    )?;
    refused(
        be.forward_shared(0, 2, true).map(|_| ()),
        "a shared forward from a layer without residual",
    )?;
    be.forward(0, random(&[2, 3, 9, 9], &mut rng), true)
        .map_err(e("forward"))?;
    refused(
        be.backward(0, &random(&[2, 8, 9, 8], &mut rng), true)
            .map(|_| ()),
        "∇Y of the wrong shape",
    )?;
    let w0 = random(&ls[0].weight_shape(), &mut rng);
    let b0 = random(&[8], &mut rng);
    refused(
        be.set_weights(1, random(&[16, 8, 3, 1], &mut rng), None),
        "set_weights with a weight of the wrong shape",
    )?;
    refused(
        be.set_weights(1, good[1].0.clone(), Some(random(&[16], &mut rng))),
        "set_weights with a bias for a layer without",
    )?;
    refused(
        be.set_weights(0, w0.clone(), None),
        "set_weights without the layer's bias",
    )?;
    refused(
        be.set_weights(0, w0.clone(), Some(random(&[3], &mut rng))),
        "set_weights with a bias of the wrong shape",
    )?;
    refused(
        be.set_weights(7, w0.clone(), Some(b0.clone())),
        "set_weights of an unknown layer",
    )?;
    for (l, set) in good.iter().enumerate() {
        let got = be.weights(l as u32).map_err(e("weights"))?;
        pair(
            &format!("conv {l} after refused requests"),
            set.clone(),
            got,
            0.0,
        )?;
    }
    // Still usable, and a good replacement takes effect.
    be.backward(0, &random(&[2, 8, 9, 9], &mut rng), true)
        .map_err(e("backward after refusals"))?;
    let x = random(&[2, 3, 9, 9], &mut rng);
    let before = be.forward(0, x.clone(), true).map_err(e("forward"))?;
    be.set_weights(0, w0.clone(), Some(b0.clone()))
        .map_err(e("set_weights after refusals"))?;
    pair(
        "conv 0 after set_weights",
        (w0, Some(b0)),
        be.weights(0).map_err(e("weights"))?,
        0.0,
    )?;
    let after = be.forward(0, x, true).map_err(e("forward"))?;
    if before.shape != after.shape || before.data == after.data {
        return Err("the forward after set_weights did not change".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::CpuBackend;

    #[test]
    fn cpu_against_cpu() {
        let mut a = CpuBackend::new(1).unwrap();
        let mut b = CpuBackend::new(2).unwrap();
        let worst = check_against(&mut a, &mut b, 1e-5).unwrap();
        assert!(worst < 1e-5, "{worst}");
    }

    /// A backend that ignores `set_weights` (keeps the registered weights) must fail the check.
    struct IgnoresSetWeights(CpuBackend);

    impl ConvBackend for IgnoresSetWeights {
        fn describe(&self) -> String {
            "cpu ignoring set_weights".into()
        }

        fn register(
            &mut self,
            layers: &[ConvLayer],
            weights: Vec<(Tensor, Option<Tensor>)>,
        ) -> Result<(), BackendError> {
            self.0.register(layers, weights)
        }

        fn layer(&self, layer: u32) -> Option<ConvLayer> {
            self.0.layer(layer)
        }

        fn num_layers(&self) -> usize {
            self.0.num_layers()
        }

        fn forward(
            &mut self,
            layer: u32,
            x_u: Tensor,
            train: bool,
        ) -> Result<Tensor, BackendError> {
            self.0.forward(layer, x_u, train)
        }

        fn forward_shared(
            &mut self,
            layer: u32,
            from: u32,
            train: bool,
        ) -> Result<Tensor, BackendError> {
            self.0.forward_shared(layer, from, train)
        }

        fn set_cached(&mut self, layer: u32, x_u: Tensor) -> Result<(), BackendError> {
            self.0.set_cached(layer, x_u)
        }

        fn backward(
            &mut self,
            layer: u32,
            dy: &Tensor,
            need_dx: bool,
        ) -> Result<(Option<Tensor>, Tensor), BackendError> {
            self.0.backward(layer, dy, need_dx)
        }

        fn set_weights(
            &mut self,
            layer: u32,
            _w: Tensor,
            _b: Option<Tensor>,
        ) -> Result<(), BackendError> {
            self.0
                .layer(layer)
                .map(|_| ())
                .ok_or(BackendError::UnknownLayer(layer))
        }

        fn weights(&mut self, layer: u32) -> Result<(Tensor, Option<Tensor>), BackendError> {
            self.0.weights(layer)
        }
    }

    #[test]
    fn a_backend_ignoring_set_weights_fails() {
        let mut a = CpuBackend::new(1).unwrap();
        let mut b = IgnoresSetWeights(CpuBackend::new(1).unwrap());
        let err = check_against(&mut a, &mut b, 1e-5).unwrap_err();
        assert!(err.contains("after set_weights"), "{err}");
    }

    #[test]
    fn cpu_refusals() {
        check_refusals(&mut CpuBackend::new(1).unwrap()).unwrap();
    }
}
