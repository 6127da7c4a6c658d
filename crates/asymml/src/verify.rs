//! `asymml verify`: one training step in split mode and in trusted-only mode from the same weights and
//! data, compared tensor by tensor, then an inference forward of both updated nets.

use crate::accelerator::AcceleratorHandle;
use crate::cli::VerifyArgs;
use crate::setup::SplitSetup;
use crate::threads;
use crate::values::check_batch_bytes;
use anyhow::{bail, Result};
use asymml_core::models::{LocalExec, ModelSpec, Net, StateMut};
use asymml_core::optim::{Optimizer, OptimizerKind};
use asymml_core::rng::Rng;
use asymml_core::Tensor;
use asymml_protocol::Transport;
use asymml_trusted::split::SplitExec;

const LR: f32 = 0.1;
const WD: f32 = 5e-4;
const KIND: OptimizerKind = OptimizerKind::Sgd {
    momentum: 0.9,
    nesterov: true,
};

/// A named tensor's values: a gradient, a parameter or a running statistic.
type Named = (String, Vec<f32>);

/// max |a − b| / scale, scale = max(max |a|, floor).
fn rel_err(a: &[f32], b: &[f32], floor: f32) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    let scale = a.iter().fold(floor, |m, v| m.max(v.abs())) as f64;
    let diff = a
        .iter()
        .zip(b)
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs() as f64));
    if scale > 0.0 {
        diff / scale
    } else {
        diff
    }
}

fn state(net: &mut Net) -> Vec<Named> {
    let mut out = Vec::new();
    net.visit_state(&mut |name, s| {
        if let StateMut::Tensor(t) = s {
            out.push((name, t.data.clone()));
        }
    });
    out
}

/// (name, gradient) of every parameter of the trusted-only net.
fn grads(net: &mut Net) -> Vec<Named> {
    let mut out = Vec::new();
    net.visit_params(&mut |n, p| out.push((n.to_string(), p.grad.data.clone())));
    out
}

fn sgd_update(net: &mut Net, opt: &mut Optimizer) {
    opt.begin_step();
    let mut i = 0;
    net.visit_params(&mut |_, p| {
        opt.update(i, p, LR);
        i += 1;
    });
}

/// The two runs of one step: the reference (trusted-only) net, the split net with its accelerator, and the
/// batch they train on.
struct Case {
    spec: ModelSpec,
    net_ref: Net,
    net_split: Net,
    exec: SplitExec<Box<dyn Transport + Send>>,
    x: Tensor,
    labels: Vec<usize>,
    _handle: AcceleratorHandle,
}

/// What a forward pass gives: the loss and the logits.
struct Forward {
    loss: f32,
    logits: Tensor,
}

impl Case {
    /// Both nets from the same seed, a random batch, and the accelerator — first, so that one that cannot
    /// start (a missing GPU) fails before any work.
    fn prepare(a: &VerifyArgs, threads: usize) -> Result<Self> {
        if a.batch < 2 {
            bail!("--batch must be at least 2 (BatchNorm needs batch statistics)");
        }
        let spec = a.model.spec(a.channels, a.classes, a.input_size)?;
        check_batch_bytes(a.batch, a.channels, spec.width, a.input_size)?;
        let split = SplitSetup::from_args(&a.split, threads, a.seed)?;
        let net_ref = spec.build(a.seed)?;
        let mut net_split = spec.build(a.seed)?;
        let mut rng = Rng::new(a.seed ^ 0xDA7A);
        let n = a.batch * a.channels * a.input_size * a.input_size;
        let x = Tensor::from_vec(
            &[a.batch, a.channels, a.input_size, a.input_size],
            (0..n).map(|_| rng.normal()).collect(),
        )?;
        let labels: Vec<usize> = (0..a.batch).map(|_| rng.below(a.classes)).collect();
        crate::setup::check_table(&split.config, &mut net_split)?;
        let (transport, handle) = split.start()?;
        let exec = SplitExec::connect(transport, &mut net_split, split.config)?;
        Ok(Case {
            spec,
            net_ref,
            net_split,
            exec,
            x,
            labels,
            _handle: handle,
        })
    }

    /// Forward reference: trusted-only.
    fn forward_reference(&mut self) -> Result<Forward> {
        self.net_ref.zero_grad();
        let (loss, _) = self
            .net_ref
            .forward_loss(&self.x, &self.labels, true, &mut LocalExec)?;
        Ok(Forward {
            loss,
            logits: self.net_ref.logits().clone(),
        })
    }

    /// Split: forward and backward; the conv gradients are the merged ∇W_T + ∇W_U the split runtime
    /// accumulated into the trusted parameters (after checking ∇W_U).
    fn split_step(&mut self) -> Result<(Forward, Vec<Named>)> {
        let net = &mut self.net_split;
        net.zero_grad();
        let (loss, _) = net.forward_loss(&self.x, &self.labels, true, &mut self.exec)?;
        let logits = net.logits().clone();
        net.backward(&mut self.exec, false)?;
        Ok((Forward { loss, logits }, grads(net)))
    }

    /// Backward reference: trusted-only backward on the split run's own activations. ReLU and max-pool make
    /// the gradient discontinuous in the forward values: an f32 rounding difference (1e-7) in a forward pass
    /// flips a few on/off decisions and moves deep gradients by up to 10 % (measured here by perturbing the
    /// input by 3e-7 in a trusted-only run), so gradients are compared on the same activation pattern.
    fn backward_reference(&mut self) -> Result<Vec<Named>> {
        self.net_split.zero_grad();
        self.net_split.backward(&mut LocalExec, false)?;
        Ok(grads(&mut self.net_split))
    }

    /// The same backward reference computed another way: every conv by im2col + GEMM instead of Winograd,
    /// which rounds differently. Where the two references differ, float32 alone leaves that much doubt — a
    /// gradient that is a small sum of many large terms (a first conv's bias gradient sums ∇Y over the whole
    /// batch and map) is one — so a correct accelerator that sums in another order (a GPU) can differ by as
    /// much there; an accelerator exactly as accurate as float64 did (3.9e-4 at VGG16's first bias, 32 px).
    fn backward_reference_gemm(&mut self) -> Result<Vec<Named>> {
        let mut was = Vec::new();
        self.net_split
            .visit_convs(&mut |_, c| was.push(std::mem::replace(&mut c.winograd, false)));
        let g = self.backward_reference();
        let mut i = 0;
        self.net_split.visit_convs(&mut |_, c| {
            c.winograd = was[i];
            i += 1;
        });
        g
    }

    /// The updates: the trusted-only optimizer applied to the reference gradients from the initial weights
    /// (the reference net still holds them: it only ran a forward), and the split update — trusted parameters
    /// here (conv weights included: the trusted runtime owns them) from the split gradients, then sent to
    /// the accelerator. Returns the split's ranks.
    fn update(mut self, grads_ref: &[Named], grads_split: &[Named]) -> Result<Updated> {
        set_grads(&mut self.net_ref, grads_ref);
        sgd_update(&mut self.net_ref, &mut Optimizer::new(KIND, WD));
        set_grads(&mut self.net_split, grads_split);
        sgd_update(&mut self.net_split, &mut Optimizer::new(KIND, WD));
        asymml_core::models::ConvExec::after_update(&mut self.exec, &mut self.net_split)?;
        let ranks = self.exec.ranks();
        Ok(Updated {
            net_ref: self.net_ref,
            net_split: self.net_split,
            ranks,
            exec: self.exec,
            x: self.x,
            _handle: self._handle,
        })
    }
}

/// Both nets after the update, the rank the split kept at each conv, and what the inference forward
/// runs on.
struct Updated {
    net_ref: Net,
    net_split: Net,
    ranks: Vec<(String, usize)>,
    exec: SplitExec<Box<dyn Transport + Send>>,
    x: Tensor,
    /// The accelerator (a child process ends with it).
    _handle: AcceleratorHandle,
}

impl Updated {
    /// An inference forward of the batch by both updated nets (BatchNorm's running statistics, the new
    /// weights — sent to the accelerator by the update —, and with `--micro-batches` the parts streamed
    /// through the network): the relative error of the split's logits ("infer.logits"). Then the
    /// accelerator is told to stop.
    fn infer(&mut self) -> Result<(String, f64)> {
        let want = self
            .net_ref
            .forward(&self.x, false, &mut LocalExec)?
            .clone();
        let got = self.net_split.forward(&self.x, false, &mut self.exec);
        let err = rel_err(&want.data, &got?.data, 0.0);
        Ok(("infer.logits".into(), err))
    }
}

fn set_grads(net: &mut Net, grads: &[Named]) {
    let mut i = 0;
    net.visit_params(&mut |_, p| {
        p.grad.data.copy_from_slice(&grads[i].1);
        i += 1;
    });
}

/// The largest magnitude over every tensor of a list.
fn max_abs(tensors: &[Named]) -> f32 {
    tensors
        .iter()
        .flat_map(|(_, v)| v.iter())
        .fold(0.0f32, |m, v| m.max(v.abs()))
}

/// Relative errors of the split run against the reference: logits, loss, every gradient, every updated
/// parameter and BatchNorm running statistic. Gradients (weights) are measured against the tensor's largest
/// magnitude floored at 1e-3 × the largest gradient (weight) of the model, so that tensors whose exact
/// gradient is zero (a conv bias followed by BatchNorm) are judged against the scale of the step, not of
/// round-off.
fn compare(
    fwd: (&Forward, &Forward),
    grads: (&[Named], &[Named]),
    nets: (&mut Net, &mut Net),
) -> Vec<(String, f64)> {
    let mut results: Vec<(String, f64)> = vec![
        (
            "logits".into(),
            rel_err(&fwd.0.logits.data, &fwd.1.logits.data, 0.0),
        ),
        ("loss".into(), rel_err(&[fwd.0.loss], &[fwd.1.loss], 0.0)),
    ];
    results.extend(grad_errors(grads.0, grads.1));
    let (sa, sb) = (state(nets.0), state(nets.1));
    let wmax = max_abs(&sa);
    for ((n, wa), (_, wb)) in sa.iter().zip(&sb) {
        results.push((format!("updated.{n}"), rel_err(wa, wb, 1e-3 * wmax)));
    }
    results
}

/// Each gradient's relative error ("grad.NAME"), against the larger of its largest magnitude and 1e-3 × the
/// largest gradient of `reference`.
fn grad_errors(reference: &[Named], other: &[Named]) -> Vec<(String, f64)> {
    let gmax = max_abs(reference);
    reference
        .iter()
        .zip(other)
        .map(|((n, ga), (_, gb))| (format!("grad.{n}"), rel_err(ga, gb, 1e-3 * gmax)))
        .collect()
}

/// The tolerance of every compared tensor: 1e-4 relative.
const TOL: f64 = 1e-4;
/// A gradient may differ by up to this many times float32's own spread there (see
/// [`Case::backward_reference_gemm`]) where that is above 1e-4.
const SPREAD_FACTOR: f64 = 2.0;

/// One compared tensor: its relative error, the float32 spread of its reference (gradients only) and the
/// error allowed.
#[derive(Clone, Debug)]
struct Judged {
    name: String,
    err: f64,
    spread: Option<f64>,
    tol: f64,
}

impl Judged {
    /// Within its tolerance (a NaN never is).
    fn passes(&self) -> bool {
        self.err <= self.tol
    }
}

/// Each result with its tolerance: 1e-4, or for a gradient `SPREAD_FACTOR` × its spread where larger.
fn judge(results: &[(String, f64)], spread: &[(String, f64)]) -> Vec<Judged> {
    results
        .iter()
        .map(|(name, err)| {
            let sp = spread.iter().find(|(n, _)| n == name).map(|(_, v)| *v);
            Judged {
                name: name.clone(),
                err: *err,
                spread: sp,
                tol: sp.map_or(TOL, |v| (SPREAD_FACTOR * v).max(TOL)),
            }
        })
        .collect()
}

/// The tensor to report: the one furthest over its tolerance where any is over, else the one of the largest
/// error; a NaN counts as the worst.
fn worst(judged: &[Judged]) -> Option<&Judged> {
    let over = judged.iter().any(|j| !j.passes());
    let key = |j: &Judged| if over { j.err / j.tol } else { j.err };
    judged.iter().fold(None, |w: Option<&Judged>, j| match w {
        Some(w) if w.err.is_nan() => Some(w),
        Some(w) if !j.err.is_nan() && key(j) <= key(w) => Some(w),
        _ => Some(j),
    })
}

/// Runs `asymml verify`; returns whether the split matched within 1e-4.
pub fn run(a: VerifyArgs) -> Result<bool> {
    let threads = threads::init(a.threads)?;
    threads::in_pool(threads, || verify(a, threads))
}

/// `asymml verify` on a worker of the pool of `threads` ([`threads::in_pool`]).
fn verify(a: VerifyArgs, threads: usize) -> Result<bool> {
    let mut case = Case::prepare(&a, threads)?;
    let spec = case.spec.clone();
    let fwd_ref = case.forward_reference()?;
    let (fwd_split, grads_split) = case.split_step()?;
    let grads_gemm = case.backward_reference_gemm()?;
    let grads_ref = case.backward_reference()?;
    let spread = grad_errors(&grads_ref, &grads_gemm);
    let mut updated = case.update(&grads_ref, &grads_split)?;
    let mut results = compare(
        (&fwd_ref, &fwd_split),
        (&grads_ref, &grads_split),
        (&mut updated.net_ref, &mut updated.net_split),
    );
    results.push(updated.infer()?);
    let Updated {
        exec,
        ranks,
        _handle,
        ..
    } = updated;
    exec.shutdown()?;
    drop(_handle);
    if std::env::var_os("ASYMML_VERIFY_DEBUG").is_some() {
        for (n, v) in &spread {
            if *v > 1e-5 {
                eprintln!("spread {v:.3e} {n}");
            }
        }
        let mut sorted = results.clone();
        sorted.sort_by(|a, b| b.1.total_cmp(&a.1));
        for (n, v) in sorted.iter().take(12) {
            eprintln!("{v:.3e} {n}");
        }
    }
    Ok(report(&a, &spec.name(), &ranks, &judge(&results, &spread)))
}

/// Prints the worst tensor (JSON or a line of text); returns whether every tensor is within its tolerance.
fn report(a: &VerifyArgs, model: &str, ranks: &[(String, usize)], judged: &[Judged]) -> bool {
    let ok = judged.iter().all(Judged::passes);
    let w = worst(judged).cloned().unwrap_or(Judged {
        name: String::new(),
        err: 0.0,
        spread: None,
        tol: TOL,
    });
    let rank = &a.split.rank[0];
    if a.json {
        println!(
            "{}",
            serde_json::json!({"model": model, "rank": rank.text, "max_rel_err": w.err, "worst": w.name,
                "tolerance": w.tol, "float32_spread": w.spread, "ok": ok})
        );
    } else {
        let rs: Vec<String> = ranks.iter().map(|(_, r)| r.to_string()).collect();
        let allowed = if w.tol > TOL {
            format!(
                " (float32's own spread there: {:.1e}, so ≤ {:.1e} allowed)",
                w.spread.unwrap_or(0.0),
                w.tol
            )
        } else {
            String::new()
        };
        println!(
            "{} batch {} rank {} (per conv: {}): max relative error {:.3e} at {}{allowed} — {}",
            model,
            a.batch,
            rank,
            rs.join(","),
            w.err,
            w.name,
            if ok { "OK" } else { "FAILED" }
        );
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn results(v: &[(&str, f64)]) -> Vec<(String, f64)> {
        v.iter().map(|(n, e)| (n.to_string(), *e)).collect()
    }

    #[test]
    fn a_gradient_may_differ_by_twice_float32s_spread_and_the_rest_by_1e_4() {
        let spread = results(&[("grad.a.bias", 3.9e-4), ("grad.b.weight", 1e-6)]);
        let r = results(&[
            ("logits", 5e-6),
            ("grad.a.bias", 3e-4),
            ("grad.b.weight", 8e-5),
        ]);
        let j = judge(&r, &spread);
        assert!((j[1].tol - 7.8e-4).abs() < 1e-12 && j[1].passes());
        assert_eq!(j[2].tol, TOL);
        assert_eq!(j[0].spread, None);
        assert!(j.iter().all(Judged::passes));
        // Nothing over: the largest error is reported.
        assert_eq!(worst(&j).unwrap().name, "grad.a.bias");

        // Over its tolerance: a smaller error where the spread allows less is the one reported.
        let r = results(&[("grad.a.bias", 3e-4), ("grad.b.weight", 1.5e-4)]);
        let j = judge(&r, &spread);
        assert!(!j.iter().all(Judged::passes));
        assert_eq!(worst(&j).unwrap().name, "grad.b.weight");
        // Twice the spread is the limit, and a NaN is always the worst and always over.
        let r = results(&[("grad.a.bias", 8e-4), ("logits", f64::NAN)]);
        let j = judge(&r, &spread);
        assert!(!j[0].passes());
        assert_eq!(worst(&j).unwrap().name, "logits");
        assert!(!j[1].passes());
    }
}
