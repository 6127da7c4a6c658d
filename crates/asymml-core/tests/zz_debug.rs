//! Finite-difference gradient checks of every layer, of ResNet's BasicBlock and of small whole networks:
//! ∇x and every ∇param against central differences of L = Σ y·r (r fixed, random), in f32.

mod common;

use asymml_core::layers::{
    AdaptiveAvgPool2d, AvgPool2d, BatchNorm2d, Conv2d, Dropout, Linear, MaxPool2d, Param, Relu,
    SoftmaxCrossEntropy,
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
        self.0.visit_params("block", f);
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

/// Blocks and networks: ReLU and max-pool kinks inside cannot be kept away from the point, so a smaller
/// step (fewer kinks crossed) and one-sided differences are accepted too (see `Fd::kinks`).
fn composite() -> Fd {
    Fd {
        eps: 3e-4,
        atol: 5e-3,
        max_elems: 40,
        kinks: true,
        ..Fd::default()
    }
}



#[test]
fn sweep() {
    for (width, input, batch, train) in [(2usize, 16usize, 2usize, false), (4, 8, 4, true), (4, 8, 4, false), (2, 12, 2, true), (8, 8, 2, false)] {
        let mut fails = 0;
        let t = std::time::Instant::now();
        for seed in 0..40u64 {
            let r = std::panic::catch_unwind(|| {
                let mut spec = ModelSpec::parse("resnet18-cifar", 3, 5, input).unwrap();
                spec.width = width;
                let mut op = NetOp { net: spec.build(seed).unwrap(), train };
                let x = randn(&mut Rng::new(seed), &[batch, 3, input, input], 1.0);
                gradcheck("resnet", &mut op, &x, composite(), seed);
            });
            if r.is_err() { fails += 1; }
        }
        eprintln!("CONFIG w{width} in{input} b{batch} train {train}: FAILS {fails} of 40, {:?}", t.elapsed());
    }
}
