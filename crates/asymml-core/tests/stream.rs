//! Streamed inference forwards (`ConvExec::stream_parts`): every part goes through the network on its own,
//! the convs begun part after part and finished one stage later. Checked against the whole-batch forward,
//! in the order the executor sees the calls, and where a network or a phase cannot be streamed.

use asymml_core::layers::Conv2d;
use asymml_core::models::{ConvExec, LocalExec, ModelSpec, Net, StreamPart};
use asymml_core::rng::Rng;
use asymml_core::{CoreError, Tensor};
use std::ops::Range;

/// What the executor was asked, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Call {
    Whole(usize),
    Begin(usize, usize),
    Finish(usize, usize),
}

/// Computes every conv locally — at `finish`, so that a conv's output is there only once it is finished —
/// and records the calls.
struct Recorder {
    parts: Vec<Range<usize>>,
    calls: Vec<Call>,
}

impl Recorder {
    fn new(parts: Vec<Range<usize>>) -> Self {
        Recorder {
            parts,
            calls: Vec::new(),
        }
    }
}

impl ConvExec for Recorder {
    fn conv_forward(
        &mut self,
        conv: &mut Conv2d,
        x: &Tensor,
        y: &mut Tensor,
        _train: bool,
    ) -> Result<(), CoreError> {
        self.calls.push(Call::Whole(conv.id));
        conv.forward(x, y)
    }

    fn conv_backward(
        &mut self,
        conv: &mut Conv2d,
        x: &Tensor,
        dy: &Tensor,
        dx: Option<&mut Tensor>,
    ) -> Result<(), CoreError> {
        conv.backward(x, dy, dx)
    }

    fn stream_parts(&self, _b: usize) -> Vec<Range<usize>> {
        self.parts.clone()
    }

    fn conv_forward_begin(
        &mut self,
        conv: &mut Conv2d,
        x: &Tensor,
        y: &mut Tensor,
        part: &StreamPart,
    ) -> Result<(), CoreError> {
        assert_eq!(x.shape[0], part.samples.len(), "the part's own input");
        self.calls.push(Call::Begin(conv.id, part.index));
        // Garbage until finished: a node that read it early would show.
        y.resize(&conv.out_shape(&x.shape)?);
        y.data.fill(f32::NAN);
        Ok(())
    }

    fn conv_forward_finish(
        &mut self,
        conv: &mut Conv2d,
        x: &Tensor,
        y: &mut Tensor,
        part: &StreamPart,
    ) -> Result<(), CoreError> {
        self.calls.push(Call::Finish(conv.id, part.index));
        conv.forward(x, y)
    }
}

fn net_and_batch(name: &str, b: usize) -> (Net, Tensor) {
    let size = if name.starts_with("vgg") { 32 } else { 16 };
    let mut spec = ModelSpec::parse(name, 3, 10, size).unwrap();
    spec.width = 8;
    let mut net = spec.build(7).unwrap();
    // Trained-looking BatchNorm statistics, so that the evaluation forward is not the identity there.
    let mut rng = Rng::new(5);
    net.visit_state(&mut |name, s| {
        if let asymml_core::models::StateMut::Tensor(t) = s {
            if name.ends_with("running_mean") {
                t.data.iter_mut().for_each(|v| *v = 0.2 * rng.normal());
            } else if name.ends_with("running_var") {
                t.data.iter_mut().for_each(|v| *v = 0.5 + rng.uniform());
            }
        }
    });
    let n = b * 3 * size * size;
    let x = Tensor::from_vec(&[b, 3, size, size], (0..n).map(|_| rng.normal()).collect()).unwrap();
    (net, x)
}

fn close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let scale = a.iter().fold(1e-30f32, |m, v| m.max(v.abs()));
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-5 * scale,
            "{what}[{i}]: {x} vs {y} (scale {scale})"
        );
    }
}

#[test]
fn a_streamed_forward_equals_the_whole_batch_forward_and_interleaves_the_parts() {
    let (mut net, x) = net_and_batch("vgg11", 5);
    let want = net.forward(&x, false, &mut LocalExec).unwrap().clone();
    let convs = net.convs_mut().len();
    for parts in [vec![0..2, 2..3, 3..5], vec![0..1, 1..5], vec![0..4, 4..5]] {
        let mut rec = Recorder::new(parts.clone());
        let got = net.forward(&x, false, &mut rec).unwrap().clone();
        assert_eq!(got.shape, want.shape);
        close(&want.data, &got.data, &format!("logits, parts {parts:?}"));
        // Stage s of part p finishes conv s − 1 of p and begins conv s; the stages go part by part.
        let m = parts.len();
        let mut expect = Vec::new();
        for s in 0..=convs {
            for p in 0..m {
                if s > 0 {
                    expect.push(Call::Finish(s - 1, p));
                }
                if s < convs {
                    expect.push(Call::Begin(s, p));
                }
            }
        }
        assert_eq!(rec.calls, expect, "parts {parts:?}");
        // A backward has nothing to run on after a streamed forward.
        let err = net
            .backward_from(got.clone(), &mut LocalExec, false)
            .unwrap_err();
        assert!(err.to_string().contains("in parts"), "{err}");
    }
    // The same net forward as a whole batch again (the parts' buffers go), and then in parts again.
    let again = net.forward(&x, false, &mut LocalExec).unwrap().clone();
    close(&want.data, &again.data, "whole batch after streaming");
}

#[test]
fn training_forwards_residual_blocks_and_bad_parts_are_not_streamed() {
    // Training: BatchNorm needs the whole batch's statistics, so every conv runs whole.
    let (mut net, x) = net_and_batch("vgg11", 4);
    let mut rec = Recorder::new(vec![0..2, 2..4]);
    net.forward(&x, true, &mut rec).unwrap();
    assert!(rec.calls.iter().all(|c| matches!(c, Call::Whole(_))));
    // A training forward and its backward still work after a streamed one.
    let mut rec = Recorder::new(vec![0..2, 2..4]);
    net.forward(&x, false, &mut rec).unwrap();
    assert!(rec.calls.iter().any(|c| matches!(c, Call::Begin(..))));
    let logits = net.forward(&x, true, &mut LocalExec).unwrap().clone();
    net.backward_from(logits, &mut LocalExec, false).unwrap();

    // ResNet: the convs run inside the blocks, whole.
    let (mut net, x) = net_and_batch("resnet18", 4);
    let want = net.forward(&x, false, &mut LocalExec).unwrap().clone();
    let mut rec = Recorder::new(vec![0..2, 2..4]);
    let got = net.forward(&x, false, &mut rec).unwrap().clone();
    assert!(rec.calls.iter().all(|c| matches!(c, Call::Whole(_))));
    close(&want.data, &got.data, "resnet18 logits");

    // Parts that do not cover the batch in order are an error, not a wrong answer.
    let (mut net, x) = net_and_batch("vgg11", 4);
    for parts in [
        vec![0..2, 3..4],
        vec![0..2, 2..3],
        vec![1..2, 2..4],
        vec![0..0, 0..4],
    ] {
        let mut rec = Recorder::new(parts.clone());
        let err = net.forward(&x, false, &mut rec).unwrap_err();
        assert!(err.to_string().contains("do not cover"), "{parts:?}: {err}");
    }
}
