//! Finite-difference gradient checks of every layer, of ResNet's BasicBlock and of small whole networks:
//! ∇x and every ∇param against central differences of L = Σ y·r (r fixed, random), in f32.

mod common;

use asymml_core::layers::{
    AdaptiveAvgPool2d, AvgPool2d, BatchNorm2d, Conv2d, Conv2dConfig, Dropout, Linear, MaxPool2d,
    Param, Relu, SoftmaxCrossEntropy,
};
use asymml_core::models::{BasicBlock, LocalExec, ModelSpec, Net};
use asymml_core::rng::Rng;
use asymml_core::Tensor;
use common::{gradcheck, randn, spaced, Fd, Op};

impl Op for Conv2d {
    fn forward(&mut self, x: &Tensor) -> Tensor {
        let mut y = Tensor::default();
        Conv2d::forward(self, x, &mut y).unwrap();
        y
    }
    fn backward(&mut self, x: &Tensor, dy: &Tensor) -> Tensor {
        let mut dx = Tensor::default();
        Conv2d::backward(self, x, dy, Some(&mut dx)).unwrap();
        dx
    }
    fn params(&mut self, f: &mut dyn FnMut(&str, &mut Param)) {
        f("weight", &mut self.weight);
        if let Some(b) = self.bias.as_mut() {
            f("bias", b);
        }
    }
}

/// Pools: `forward(x, &mut y) -> Result`, `backward(x_shape, dy, &mut dx)`, no parameters.
macro_rules! pool_op {
    ($($t:ty),*) => {$(
        impl Op for $t {
            fn forward(&mut self, x: &Tensor) -> Tensor {
                let mut y = Tensor::default();
                <$t>::forward(self, x, &mut y).unwrap();
                y
            }
            fn backward(&mut self, x: &Tensor, dy: &Tensor) -> Tensor {
                let mut dx = Tensor::default();
                <$t>::backward(self, &x.shape, dy, &mut dx);
                dx
            }
        }
    )*};
}
pool_op!(MaxPool2d, AvgPool2d, AdaptiveAvgPool2d);

/// ReLU keeps its output for backward.
struct ReluOp(Relu, Tensor);

impl Op for ReluOp {
    fn forward(&mut self, x: &Tensor) -> Tensor {
        self.0.forward(x, &mut self.1);
        self.1.clone()
    }
    fn backward(&mut self, _x: &Tensor, dy: &Tensor) -> Tensor {
        let mut dx = Tensor::default();
        self.0.backward(&self.1, dy, &mut dx);
        dx
    }
}

impl Op for Linear {
    fn forward(&mut self, x: &Tensor) -> Tensor {
        let mut y = Tensor::default();
        Linear::forward(self, x, &mut y).unwrap();
        y
    }
    fn backward(&mut self, x: &Tensor, dy: &Tensor) -> Tensor {
        let mut dx = Tensor::default();
        Linear::backward(self, x, dy, Some(&mut dx)).unwrap();
        dx
    }
    fn params(&mut self, f: &mut dyn FnMut(&str, &mut Param)) {
        f("weight", &mut self.weight);
        f("bias", &mut self.bias);
    }
}

struct BnOp {
    bn: BatchNorm2d,
    train: bool,
}

impl Op for BnOp {
    fn forward(&mut self, x: &Tensor) -> Tensor {
        let mut y = Tensor::default();
        self.bn.forward(x, &mut y, self.train).unwrap();
        y
    }
    fn backward(&mut self, x: &Tensor, dy: &Tensor) -> Tensor {
        let mut dx = Tensor::default();
        self.bn.backward(x, dy, &mut dx).unwrap();
        dx
    }
    fn params(&mut self, f: &mut dyn FnMut(&str, &mut Param)) {
        f("weight", &mut self.bn.weight);
        f("bias", &mut self.bn.bias);
    }
}

/// Logits → [loss]; the upstream gradient is the scalar dy[0].
struct CeOp {
    ce: SoftmaxCrossEntropy,
    labels: Vec<usize>,
}

impl Op for CeOp {
    fn forward(&mut self, x: &Tensor) -> Tensor {
        let loss = self.ce.forward(x, &self.labels).unwrap();
        Tensor::from_vec(&[1], vec![loss]).unwrap()
    }
    fn backward(&mut self, _x: &Tensor, dy: &Tensor) -> Tensor {
        let mut dx = Tensor::default();
        self.ce.backward(&mut dx);
        dx.data.iter_mut().for_each(|v| *v *= dy.data[0]);
        dx
    }
}

/// Dropout with the same mask on every forward (each forward draws from a copy of `rng`).
struct DropoutOp {
    d: Dropout,
    train: bool,
    rng: Rng,
}

impl Op for DropoutOp {
    fn forward(&mut self, x: &Tensor) -> Tensor {
        let mut y = Tensor::default();
        self.d.forward(x, &mut y, self.train, &mut self.rng.clone());
        y
    }
    fn backward(&mut self, _x: &Tensor, dy: &Tensor) -> Tensor {
        let mut dx = Tensor::default();
        self.d.backward(dy, &mut dx);
        dx
    }
}

/// A BasicBlock, in training mode (batch statistics), with its forward output kept for backward.
struct BlockOp(Box<BasicBlock>, Tensor);

impl Op for BlockOp {
    fn forward(&mut self, x: &Tensor) -> Tensor {
        self.0
            .forward(x, &mut self.1, true, &mut LocalExec)
            .unwrap();
        self.1.clone()
    }
    fn backward(&mut self, x: &Tensor, dy: &Tensor) -> Tensor {
        let mut dx = Tensor::default();
        self.0
            .backward(x, &self.1, dy, &mut dx, &mut LocalExec)
            .unwrap();
        dx
    }
    fn params(&mut self, f: &mut dyn FnMut(&str, &mut Param)) {
        self.0.visit_params("block", &mut |n, p, _| f(n, p));
    }
}

/// A whole network: x → logits.
struct NetOp {
    net: Net,
    train: bool,
}

impl Op for NetOp {
    fn forward(&mut self, x: &Tensor) -> Tensor {
        self.net
            .forward(x, self.train, &mut LocalExec)
            .unwrap()
            .clone()
    }
    fn backward(&mut self, _x: &Tensor, dy: &Tensor) -> Tensor {
        self.net
            .backward_from(dy.clone(), &mut LocalExec, true)
            .unwrap();
        self.net.input_grad.clone()
    }
    fn params(&mut self, f: &mut dyn FnMut(&str, &mut Param)) {
        self.net.visit_params(f);
    }
}

/// Sets every parameter of `op` to `scale`·N(0, 1) values.
fn randomize(op: &mut dyn Op, rng: &mut Rng, scale: f32) {
    op.params(&mut |_, p| {
        let v = randn(rng, &p.value.shape, scale);
        p.value = v;
    });
}

#[test]
fn conv_all_geometries() {
    let mut rng = Rng::new(1);
    for k in [1, 3] {
        for stride in [1, 2] {
            for pad in [0, 1] {
                for bias in [false, true] {
                    let mut conv = Conv2d::new(
                        3,
                        4,
                        k,
                        Conv2dConfig {
                            stride,
                            padding: pad,
                            bias,
                        },
                        &mut rng,
                    );
                    randomize(&mut conv, &mut rng, 0.5);
                    let x = randn(&mut rng, &[2, 3, 5, 6], 1.0);
                    let what = format!("conv k{k} s{stride} p{pad} bias {bias}");
                    gradcheck(&what, &mut conv, &x, Fd::default(), 10);
                }
            }
        }
    }
}

#[test]
fn conv_uneven_batch_and_large_kernel() {
    let mut rng = Rng::new(2);
    let mut conv = Conv2d::new(
        2,
        3,
        5,
        Conv2dConfig {
            stride: 2,
            padding: 2,
            bias: true,
        },
        &mut rng,
    );
    randomize(&mut conv, &mut rng, 0.3);
    let x = randn(&mut rng, &[3, 2, 7, 7], 1.0);
    gradcheck("conv k5 s2 p2, batch 3", &mut conv, &x, Fd::default(), 11);
}

#[test]
fn maxpool() {
    let mut rng = Rng::new(3);
    for (k, s, p) in [(2, 2, 0), (3, 2, 1), (3, 1, 1), (2, 1, 0)] {
        let x = spaced(&mut rng, &[2, 2, 6, 7], 0.05);
        let mut pool = MaxPool2d::new(k, s, p, false);
        gradcheck(
            &format!("maxpool k{k} s{s} p{p}"),
            &mut pool,
            &x,
            Fd::default(),
            12,
        );
    }
}

#[test]
fn relu_maxpool_fused() {
    let mut rng = Rng::new(4);
    for (k, s, p) in [(2, 2, 0), (3, 2, 1)] {
        // Half the values negative: some windows are all ≤ 0 and pass no gradient.
        let x = spaced(&mut rng, &[2, 2, 6, 6], 0.05);
        let mut pool = MaxPool2d::new(k, s, p, true);
        let y = Op::forward(&mut pool, &x);
        assert!(
            y.data.contains(&0.0),
            "no all-negative window: test inputs too benign"
        );
        gradcheck(
            &format!("relu+maxpool k{k} s{s} p{p}"),
            &mut pool,
            &x,
            Fd::default(),
            13,
        );
    }
}

#[test]
fn relu() {
    let mut rng = Rng::new(5);
    let x = spaced(&mut rng, &[2, 3, 4, 5], 0.1);
    gradcheck(
        "relu",
        &mut ReluOp(Relu, Tensor::default()),
        &x,
        Fd::default(),
        14,
    );
}

#[test]
fn avgpool_with_and_without_padding() {
    let mut rng = Rng::new(6);
    for (k, stride, pad) in [(2, 2, 0), (3, 1, 0), (3, 2, 1), (2, 2, 1)] {
        let x = randn(&mut rng, &[2, 2, 7, 6], 1.0);
        let mut pool = AvgPool2d { k, stride, pad };
        let what = format!("avgpool k{k} s{stride} p{pad}");
        gradcheck(&what, &mut pool, &x, Fd::default(), 15);
    }
}

#[test]
fn adaptive_avgpool() {
    let mut rng = Rng::new(7);
    for (h, w, out) in [(5, 5, 1), (5, 7, 3), (10, 9, 7), (3, 2, 7)] {
        let x = randn(&mut rng, &[2, 2, h, w], 1.0);
        let mut pool = AdaptiveAvgPool2d { out };
        gradcheck(
            &format!("adaptive {h}×{w} → {out}"),
            &mut pool,
            &x,
            Fd::default(),
            16,
        );
    }
}

fn bn_op(rng: &mut Rng, channels: usize, train: bool) -> BnOp {
    let mut bn = BatchNorm2d::new(channels);
    let mut around = |base: f32, s: f32| {
        let mut t = randn(rng, &[channels], s);
        t.data.iter_mut().for_each(|v| *v += base);
        t
    };
    bn.weight.value = around(1.0, 0.2);
    bn.bias.value = around(0.0, 0.2);
    bn.running_mean = around(0.0, 0.3);
    bn.running_var = around(1.0, 0.1);
    BnOp { bn, train }
}

#[test]
fn batchnorm_train() {
    let mut rng = Rng::new(8);
    let mut op = bn_op(&mut rng, 3, true);
    let mut x = randn(&mut rng, &[3, 3, 4, 3], 1.0);
    x.data.iter_mut().for_each(|v| *v += 0.5);
    gradcheck("batchnorm train", &mut op, &x, Fd::default(), 17);
}

#[test]
fn batchnorm_eval() {
    let mut rng = Rng::new(9);
    let mut op = bn_op(&mut rng, 3, false);
    let x = randn(&mut rng, &[2, 3, 4, 4], 1.0);
    gradcheck("batchnorm eval", &mut op, &x, Fd::default(), 18);
}

#[test]
fn linear() {
    let mut rng = Rng::new(10);
    let mut lin = Linear::new(6, 4, &mut rng);
    randomize(&mut lin, &mut rng, 0.5);
    let x = randn(&mut rng, &[3, 6], 1.0);
    gradcheck("linear", &mut lin, &x, Fd::default(), 19);
}

#[test]
fn softmax_cross_entropy() {
    let mut rng = Rng::new(11);
    let x = randn(&mut rng, &[4, 5], 1.5);
    let mut op = CeOp {
        ce: SoftmaxCrossEntropy::default(),
        labels: vec![0, 3, 4, 3],
    };
    gradcheck("softmax cross-entropy", &mut op, &x, Fd::default(), 20);
}

#[test]
fn dropout_eval_and_train_with_a_fixed_mask() {
    let mut rng = Rng::new(12);
    let x = randn(&mut rng, &[2, 3, 4, 4], 1.0);
    for train in [false, true] {
        let mut op = DropoutOp {
            d: Dropout::new(0.5),
            train,
            rng: Rng::new(77),
        };
        let y = op.forward(&x);
        let dropped = y.data.iter().filter(|&&v| v == 0.0).count();
        if train {
            assert!(
                dropped > 0 && dropped < x.len(),
                "mask drops {dropped} of {}",
                x.len()
            );
        } else {
            assert_eq!(y, x, "dropout in evaluation is the identity");
        }
        gradcheck(
            &format!("dropout train={train}"),
            &mut op,
            &x,
            Fd::default(),
            21,
        );
    }
}

/// Blocks and networks: ReLU and max-pool kinks inside cannot be kept away from the point, so a smaller
/// step (fewer kinks crossed; f32 round-off still well below the tolerance), one-sided differences and a
/// few outliers are accepted (see `Fd::kinks`). Checked over 40 seeds of each case without a failure.
fn composite() -> Fd {
    Fd {
        eps: 3e-4,
        atol: 5e-3,
        max_elems: 16,
        kinks: true,
        ..Fd::default()
    }
}

#[test]
fn basic_block_identity_and_downsample() {
    let mut rng = Rng::new(13);
    for (cin, cout, stride) in [(4, 4, 1), (3, 5, 2)] {
        let mut op = BlockOp(
            Box::new(BasicBlock::new(cin, cout, stride, &mut rng)),
            Tensor::default(),
        );
        let x = randn(&mut rng, &[2, cin, 6, 6], 1.0);
        let what = format!("BasicBlock {cin}→{cout} stride {stride}");
        gradcheck(&what, &mut op, &x, composite(), 22);
    }
}

#[test]
fn small_resnet_through_its_blocks() {
    // Evaluation mode: with batch statistics, a network this small is too kinky for f32 differences
    // (the blocks are checked in training mode above).
    let mut spec = ModelSpec::parse("resnet18-cifar", 3, 5, 8).unwrap();
    spec.width = 4;
    let mut op = NetOp {
        net: spec.build(3).unwrap(),
        train: false,
    };
    let x = randn(&mut Rng::new(14), &[2, 3, 8, 8], 1.0);
    gradcheck("resnet18-cifar width 4", &mut op, &x, composite(), 23);
}

#[test]
fn small_vgg_in_train_mode() {
    let mut op = NetOp {
        net: ModelSpec::parse("vgg-small", 1, 4, 8)
            .unwrap()
            .build(4)
            .unwrap(),
        train: true,
    };
    let x = randn(&mut Rng::new(15), &[2, 1, 8, 8], 1.0);
    gradcheck("vgg-small train", &mut op, &x, composite(), 24);
}

/// A conv whose ∇x is 5% too large.
struct Skewed(Conv2d);

impl Op for Skewed {
    fn forward(&mut self, x: &Tensor) -> Tensor {
        Op::forward(&mut self.0, x)
    }
    fn backward(&mut self, x: &Tensor, dy: &Tensor) -> Tensor {
        let mut dx = Op::backward(&mut self.0, x, dy);
        dx.data.iter_mut().for_each(|v| *v *= 1.05);
        dx
    }
    fn params(&mut self, f: &mut dyn FnMut(&str, &mut Param)) {
        self.0.params(f);
    }
}

#[test]
fn the_checker_catches_a_five_percent_error() {
    let mut rng = Rng::new(16);
    let mut op = Skewed(Conv2d::new(
        3,
        4,
        3,
        Conv2dConfig {
            stride: 1,
            padding: 1,
            bias: true,
        },
        &mut rng,
    ));
    let x = randn(&mut rng, &[2, 3, 5, 5], 1.0);
    for fd in [Fd::default(), composite()] {
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            gradcheck("skewed conv", &mut op, &x, fd, 25)
        }));
        assert!(caught.is_err(), "a 5% error in ∇x passed with {fd:?}");
    }
}
