//! A conformance check of a conv backend against another (the CPU backend as the reference): the same
//! registration, forwards (a shared one included), backwards, trusted gradient parts and optimizer steps (SGD
//! with Nesterov momentum and weight decay; AdamW), compared value by value; plus the requests every backend
//! must refuse with an error. The CUDA backend's tests run it on a GPU; here it also runs CPU against CPU.

use crate::backend::{BackendError, ConvBackend, ConvLayer};
use asymml_core::optim::OptimizerKind;
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

/// Runs two training steps with `kind` on both backends and compares everything they return; `tol` bounds
/// the convolutions' relative difference. Returns the largest difference seen.
pub(crate) fn check_against<'a>(
    reference: &'a mut dyn ConvBackend,
    tested: &'a mut dyn ConvBackend,
    kind: OptimizerKind,
    tol: f64,
) -> Result<f64, String> {
    let mut rng = Rng::new(7);
    let ls = layers();
    let weights: Vec<(Tensor, Option<Tensor>)> = ls
        .iter()
        .map(|l| {
            let w = random(&l.weight_shape(), &mut rng);
            let b = l.bias.then(|| random(&[l.out_ch], &mut rng));
            (w, b)
        })
        .collect();
    reference
        .register(&ls, weights.clone(), kind, 5e-4)
        .map_err(e("register (reference)"))?;
    tested
        .register(&ls, weights, kind, 5e-4)
        .map_err(e("register"))?;
    if tested.num_layers() != 3 || tested.layer(1) != Some(ls[1]) {
        return Err("the registered layers differ".into());
    }
    let mut worst = 0.0f64;
    for step in 0..2 {
        // Batch 2 at the first step, 3 at the second (a second shape plan).
        let b = 2 + step;
        let x0 = random(&[b, 3, 9, 9], &mut rng);
        let x1 = random(&[b, 8, 9, 9], &mut rng);
        let mut ys = Vec::new();
        for be in [&mut *reference, &mut *tested] {
            let y0 = be.forward(0, x0.clone(), true).map_err(e("forward 0"))?;
            let y1 = be.forward(1, x1.clone(), true).map_err(e("forward 1"))?;
            let y2 = be.forward_shared(2, 1, true).map_err(e("forward 2"))?;
            ys.push([y0, y1, y2]);
        }
        for (i, (a, t)) in ys[0].iter().zip(&ys[1]).enumerate() {
            worst = worst.max(compare(&format!("step {step}: Y of conv {i}"), a, t, tol)?);
        }
        let dys: Vec<Tensor> = ys[0].iter().map(|y| random(&y.shape, &mut rng)).collect();
        let dw_t = random(&[16, 8, 3, 3], &mut rng);
        let mut dxs = Vec::new();
        for be in [&mut *reference, &mut *tested] {
            let dx0 = be.backward(0, &dys[0], false).map_err(e("backward 0"))?;
            let dx1 = be.backward(1, &dys[1], true).map_err(e("backward 1"))?;
            let dx2 = be.backward(2, &dys[2], true).map_err(e("backward 2"))?;
            if dx0.is_some() {
                return Err("backward without need_dx returned ∇X".into());
            }
            be.add_weight_grad(1, &dw_t).map_err(e("add_weight_grad"))?;
            dxs.push([dx1, dx2]);
        }
        for (i, (a, t)) in dxs[0].iter().zip(&dxs[1]).enumerate() {
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
        for l in 0..3 {
            let a = reference.grads(l).map_err(e("grads"))?;
            let t = tested.grads(l).map_err(e("grads"))?;
            worst = worst.max(pair(&format!("step {step}: ∇ of conv {l}"), a, t, tol)?);
        }
        let lr = 0.1;
        reference.step(lr).map_err(e("step"))?;
        tested.step(lr).map_err(e("step"))?;
        for l in 0..3 {
            let a = reference.weights(l).map_err(e("weights"))?;
            let t = tested.weights(l).map_err(e("weights"))?;
            worst = worst.max(pair(&format!("step {step}: updated conv {l}"), a, t, tol)?);
        }
    }
    Ok(worst)
}

/// Requests a backend must answer with an error (and stay usable after).
pub(crate) fn check_refusals(be: &mut dyn ConvBackend) -> Result<(), String> {
    let kind = OptimizerKind::Sgd {
        momentum: 0.9,
        nesterov: false,
    };
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
    let mut bad = good.clone();
    bad[1].0 = random(&[16, 8, 3, 1], &mut rng);
    refused(
        be.register(&ls, bad, kind, 0.0),
        "a weight of the wrong shape",
    )?;
    let mut bad = good.clone();
    bad[1].1 = Some(random(&[16], &mut rng));
    refused(
        be.register(&ls, bad, kind, 0.0),
        "a bias for a layer without",
    )?;
    refused(
        be.register(&ls, good[..2].to_vec(), kind, 0.0),
        "too few weight sets",
    )?;
    be.register(&ls, good, kind, 0.0).map_err(e("register"))?;
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
    refused(
        be.add_weight_grad(0, &random(&[8, 3, 3, 1], &mut rng)),
        "∇W_T of the wrong shape",
    )?;
    // Still usable.
    be.backward(0, &random(&[2, 8, 9, 9], &mut rng), true)
        .map_err(e("backward after refusals"))?;
    be.step(0.01).map_err(e("step after refusals"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::CpuBackend;

    #[test]
    fn cpu_against_cpu() {
        for kind in [
            OptimizerKind::Sgd {
                momentum: 0.9,
                nesterov: true,
            },
            OptimizerKind::AdamW {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
            },
        ] {
            let mut a = CpuBackend::new(1).unwrap();
            let mut b = CpuBackend::new(2).unwrap();
            let worst = check_against(&mut a, &mut b, kind, 1e-5).unwrap();
            assert!(worst < 1e-5, "{worst}");
        }
    }

    #[test]
    fn cpu_refusals() {
        check_refusals(&mut CpuBackend::new(1).unwrap()).unwrap();
    }
}
