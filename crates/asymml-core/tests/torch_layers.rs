//! Every layer against PyTorch: `tests/fixtures/layers.safetensors` (see tools/README.md).

mod common;

use asymml_core::layers::{
    AdaptiveAvgPool2d, AvgPool2d, BatchNorm2d, Conv2d, Conv2dConfig, Linear, MaxPool2d, Relu,
    SoftmaxCrossEntropy,
};
use asymml_core::rng::Rng;
use asymml_core::Tensor;
use common::{assert_close, assert_close_slice, fixture, Fixture};
use std::sync::Arc;

fn layers() -> Arc<Fixture> {
    fixture("layers.safetensors")
}

/// Runs `f` in a rayon pool of `threads` threads (the conv splits its batch by the pool size).
fn in_pool<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("thread pool")
        .install(f)
}

/// A conv case: weight (and bias) from the fixture; y, dx, ∇W, ∇b against PyTorch, under 1, 2 and 3
/// threads; a second backward accumulates the parameter gradients (PyTorch semantics).
fn conv_case(case: &str, stride: usize, pad: usize) {
    let f = layers();
    let t = |n: &str| f.t(&format!("{case}.{n}"));
    let w = t("weight");
    let (m, c, k) = (w.shape[0], w.shape[1], w.shape[2]);
    let has_bias = f.has(&format!("{case}.bias"));
    for threads in [1, 2, 3] {
        let name = |n: &str| format!("{case}.{n} ({threads} threads)");
        in_pool(threads, || {
            let mut conv = Conv2d::new(
                c,
                m,
                k,
                Conv2dConfig {
                    stride,
                    padding: pad,
                    bias: has_bias,
                },
                &mut Rng::new(0),
            );
            conv.weight.value = w.clone();
            if let Some(b) = conv.bias.as_mut() {
                b.value = t("bias").clone();
            }
            let mut y = Tensor::default();
            conv.forward(t("x"), &mut y).unwrap();
            assert_close(&name("y"), &y, t("y"));
            conv.weight.zero_grad();
            if let Some(b) = conv.bias.as_mut() {
                b.zero_grad();
            }
            let mut dx = Tensor::default();
            conv.backward(t("x"), t("dy"), Some(&mut dx)).unwrap();
            assert_close(&name("dx"), &dx, t("dx"));
            assert_close(&name("grad_weight"), &conv.weight.grad, t("grad_weight"));
            if let Some(b) = conv.bias.as_ref() {
                assert_close(&name("grad_bias"), &b.grad, t("grad_bias"));
            }
            // Without dx, the parameter gradients still accumulate: now twice PyTorch's.
            conv.backward(t("x"), t("dy"), None).unwrap();
            let twice = |g: &Tensor| Tensor {
                shape: g.shape.clone(),
                data: g.data.iter().map(|v| 2.0 * v).collect(),
            };
            assert_close(
                &name("2·grad_weight"),
                &conv.weight.grad,
                &twice(t("grad_weight")),
            );
            if let Some(b) = conv.bias.as_ref() {
                assert_close(&name("2·grad_bias"), &b.grad, &twice(t("grad_bias")));
            }
        });
    }
}

#[test]
fn conv_a_k3_s1_p1_bias() {
    conv_case("conv_a", 1, 1);
}

#[test]
fn conv_b_k3_s2_p1() {
    conv_case("conv_b", 2, 1);
}

#[test]
fn conv_c_k1_pointwise_bias() {
    conv_case("conv_c", 1, 0);
}

#[test]
fn conv_d_k7_s2_p3() {
    conv_case("conv_d", 2, 3);
}

#[test]
fn conv_e_k1_s2() {
    conv_case("conv_e", 2, 0);
}

#[test]
fn conv_f_k3_s1_p1_batch3() {
    conv_case("conv_f", 1, 1);
}

/// A parameter-free case: `run(x, dy)` returns (y, dx), compared with the fixture's.
fn unary_case(case: &str, run: impl FnOnce(&Tensor, &Tensor) -> (Tensor, Tensor)) {
    let f = layers();
    let t = |n: &str| f.t(&format!("{case}.{n}"));
    let (y, dx) = run(t("x"), t("dy"));
    assert_close(&format!("{case}.y"), &y, t("y"));
    assert_close(&format!("{case}.dx"), &dx, t("dx"));
}

fn maxpool_case(case: &str, k: usize, stride: usize, pad: usize, relu: bool) {
    unary_case(case, |x, dy| {
        let mut p = MaxPool2d::new(k, stride, pad, relu);
        let (mut y, mut dx) = (Tensor::default(), Tensor::default());
        p.forward(x, &mut y).unwrap();
        p.backward(&x.shape, dy, &mut dx);
        (y, dx)
    });
}

fn adaptive_case(case: &str, out: usize) {
    unary_case(case, |x, dy| {
        let mut p = AdaptiveAvgPool2d { out };
        let (mut y, mut dx) = (Tensor::default(), Tensor::default());
        p.forward(x, &mut y).unwrap();
        p.backward(&x.shape, dy, &mut dx);
        (y, dx)
    });
}

#[test]
fn maxpool_a_k2_s2() {
    maxpool_case("maxpool_a", 2, 2, 0, false);
}

#[test]
fn maxpool_b_k3_s2_p1() {
    maxpool_case("maxpool_b", 3, 2, 1, false);
}

#[test]
fn relumaxpool_a_fused() {
    // A MaxPool2d with relu = true applied to x directly computes maxpool(relu(x)).
    maxpool_case("relumaxpool_a", 2, 2, 0, true);
}

#[test]
fn avgpool_a_k2_s2() {
    unary_case("avgpool_a", |x, dy| {
        let mut p = AvgPool2d {
            k: 2,
            stride: 2,
            pad: 0,
        };
        let (mut y, mut dx) = (Tensor::default(), Tensor::default());
        p.forward(x, &mut y).unwrap();
        p.backward(&x.shape, dy, &mut dx);
        (y, dx)
    });
}

#[test]
fn adaptive_a_global() {
    adaptive_case("adaptive_a", 1);
}

#[test]
fn adaptive_b_10_to_7() {
    adaptive_case("adaptive_b", 7);
}

#[test]
fn adaptive_c_upsampling_2_to_7() {
    adaptive_case("adaptive_c", 7);
}

#[test]
fn relu_a() {
    unary_case("relu_a", |x, dy| {
        let mut r = Relu;
        let (mut y, mut dx) = (Tensor::default(), Tensor::default());
        r.forward(x, &mut y);
        r.backward(&y, dy, &mut dx);
        (y, dx)
    });
}

/// A BatchNorm2d with the fixture's weight, bias and running statistics; y, dx, ∇γ, ∇β against PyTorch.
/// Returns the layer for the running-statistics checks.
fn bn_case(case: &str, train: bool) -> BatchNorm2d {
    let f = layers();
    let t = |n: &str| f.t(&format!("{case}.{n}"));
    let mut bn = BatchNorm2d::new(t("weight").len());
    bn.weight.value = t("weight").clone();
    bn.bias.value = t("bias").clone();
    bn.running_mean = t("running_mean").clone();
    bn.running_var = t("running_var").clone();
    let mut y = Tensor::default();
    bn.forward(t("x"), &mut y, train).unwrap();
    assert_close(&format!("{case}.y"), &y, t("y"));
    bn.weight.zero_grad();
    bn.bias.zero_grad();
    let mut dx = Tensor::default();
    bn.backward(t("x"), t("dy"), &mut dx).unwrap();
    assert_close(&format!("{case}.dx"), &dx, t("dx"));
    assert_close(
        &format!("{case}.grad_weight"),
        &bn.weight.grad,
        t("grad_weight"),
    );
    assert_close(&format!("{case}.grad_bias"), &bn.bias.grad, t("grad_bias"));
    bn
}

#[test]
fn bn_train() {
    let f = layers();
    let bn = bn_case("bn_train", true);
    assert_close(
        "bn_train.running_mean_after",
        &bn.running_mean,
        f.t("bn_train.running_mean_after"),
    );
    assert_close(
        "bn_train.running_var_after",
        &bn.running_var,
        f.t("bn_train.running_var_after"),
    );
    assert_eq!(bn.num_batches_tracked, 1);
}

#[test]
fn bn_eval() {
    let f = layers();
    let bn = bn_case("bn_eval", false);
    // Evaluation leaves the running statistics alone.
    assert_eq!(&bn.running_mean, f.t("bn_eval.running_mean"));
    assert_eq!(&bn.running_var, f.t("bn_eval.running_var"));
    assert_eq!(bn.num_batches_tracked, 0);
}

#[test]
fn linear_a() {
    let f = layers();
    let t = |n: &str| f.t(&format!("linear_a.{n}"));
    let (o, i) = (t("weight").shape[0], t("weight").shape[1]);
    let mut lin = Linear::new(i, o, &mut Rng::new(0));
    lin.weight.value = t("weight").clone();
    lin.bias.value = t("bias").clone();
    let mut y = Tensor::default();
    lin.forward(t("x"), &mut y).unwrap();
    assert_close("linear_a.y", &y, t("y"));
    lin.weight.zero_grad();
    lin.bias.zero_grad();
    let mut dx = Tensor::default();
    lin.backward(t("x"), t("dy"), Some(&mut dx)).unwrap();
    assert_close("linear_a.dx", &dx, t("dx"));
    assert_close("linear_a.grad_weight", &lin.weight.grad, t("grad_weight"));
    assert_close("linear_a.grad_bias", &lin.bias.grad, t("grad_bias"));
}

#[test]
fn ce_a() {
    let f = layers();
    let mut ce = SoftmaxCrossEntropy::default();
    let loss = ce
        .forward(f.t("ce_a.logits"), &f.labels("ce_a.labels"))
        .unwrap();
    assert_close_slice("ce_a.loss", &[loss], &f.t("ce_a.loss").data);
    let mut dlogits = Tensor::default();
    ce.backward(&mut dlogits);
    assert_close("ce_a.dlogits", &dlogits, f.t("ce_a.dlogits"));
}

#[test]
fn every_layer_case_is_covered() {
    // The cases above, so that a case added to the fixtures without a test is noticed.
    let tested = [
        "adaptive_a",
        "adaptive_b",
        "adaptive_c",
        "avgpool_a",
        "bn_eval",
        "bn_train",
        "ce_a",
        "conv_a",
        "conv_b",
        "conv_c",
        "conv_d",
        "conv_e",
        "conv_f",
        "linear_a",
        "maxpool_a",
        "maxpool_b",
        "relu_a",
        "relumaxpool_a",
    ];
    let mut cases: Vec<String> = layers()
        .names_under("")
        .into_iter()
        .map(|n| n.split('.').next().unwrap().to_string())
        .collect();
    cases.sort();
    cases.dedup();
    assert_eq!(cases, tested);
}
