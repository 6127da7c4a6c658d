//! The fused BatchNorm → ReLU → MaxPool pass against the unfused layers, and fused networks against the
//! same networks run node by node: forward outputs, ∇x, every parameter gradient and the running averages,
//! in training and in evaluation, with odd spatial sizes and batch 1.

use asymml_core::layers::fused::{bn_relu_maxpool_backward, bn_relu_maxpool_forward, can_fuse};
use asymml_core::layers::{BatchNorm2d, MaxPool2d};
use asymml_core::models::{Layer, LocalExec, ModelSpec, Net};
use asymml_core::rng::Rng;
use asymml_core::Tensor;

fn randn(rng: &mut Rng, shape: &[usize]) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(shape, (0..n).map(|_| rng.normal()).collect()).unwrap()
}

/// a ≈ b elementwise within 1e-5 relative to the larger of the two tensors' largest magnitude (and 1e-30).
fn close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let scale = a.iter().chain(b).fold(1e-30f32, |m, v| m.max(v.abs()));
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-5 * scale,
            "{what}[{i}]: {x} vs {y} (scale {scale})"
        );
    }
}

fn bn_with_params(c: usize, rng: &mut Rng) -> BatchNorm2d {
    let mut bn = BatchNorm2d::new(c);
    for v in bn.weight.value.data.iter_mut() {
        // Some negative γ: the affine map then reverses the order inside a window.
        *v = rng.normal();
    }
    for v in bn.bias.value.data.iter_mut() {
        *v = 0.5 * rng.normal();
    }
    for v in bn.running_mean.data.iter_mut() {
        *v = 0.3 * rng.normal();
    }
    for v in bn.running_var.data.iter_mut() {
        *v = 0.5 + rng.uniform();
    }
    bn
}

/// One case: BN then ReLU+MaxPool(k, s, p), unfused and fused, forward and backward.
fn layer_case(rng: &mut Rng, shape: [usize; 4], (k, s, p): (usize, usize, usize), train: bool) {
    let c = shape[1];
    let x = randn(rng, &shape);
    let mut bn_ref = bn_with_params(c, rng);
    let mut bn_fus = BatchNorm2d::new(c);
    bn_fus.weight.value = bn_ref.weight.value.clone();
    bn_fus.bias.value = bn_ref.bias.value.clone();
    bn_fus.running_mean = bn_ref.running_mean.clone();
    bn_fus.running_var = bn_ref.running_var.clone();
    let mut pool_ref = MaxPool2d::new(k, s, p, true);
    let mut pool_fus = MaxPool2d::new(k, s, p, true);
    assert!(can_fuse(&bn_fus, &pool_fus));
    let what = format!("{shape:?} pool ({k},{s},{p}) train {train}");

    // Unfused reference.
    let (mut t, mut y_ref) = (Tensor::default(), Tensor::default());
    bn_ref.forward(&x, &mut t, train).unwrap();
    pool_ref.forward(&t, &mut y_ref).unwrap();
    // Fused; in evaluation without recording the argmax (backward recomputes it).
    let mut y_fus = Tensor::default();
    bn_relu_maxpool_forward(&mut bn_fus, &mut pool_fus, &x, &mut y_fus, train, train).unwrap();
    assert_eq!(y_ref.shape, y_fus.shape, "{what}: shape");
    assert_eq!(y_ref.data, y_fus.data, "{what}: forward");
    assert_eq!(
        bn_ref.running_mean.data, bn_fus.running_mean.data,
        "{what}: running mean"
    );
    assert_eq!(
        bn_ref.running_var.data, bn_fus.running_var.data,
        "{what}: running var"
    );

    let dy = randn(rng, &y_ref.shape);
    let (mut g, mut dx_ref, mut dx_fus) = (Tensor::default(), Tensor::default(), Tensor::default());
    pool_ref.backward(&t.shape, &dy, &mut g);
    bn_ref.backward(&x, &g, &mut dx_ref).unwrap();
    bn_relu_maxpool_backward(&mut bn_fus, &mut pool_fus, &x, &dy, &mut dx_fus).unwrap();
    assert_eq!(dx_ref.shape, dx_fus.shape);
    close(&dx_ref.data, &dx_fus.data, &format!("{what}: ∇x"));
    close(
        &bn_ref.weight.grad.data,
        &bn_fus.weight.grad.data,
        &format!("{what}: ∇γ"),
    );
    close(
        &bn_ref.bias.grad.data,
        &bn_fus.bias.grad.data,
        &format!("{what}: ∇β"),
    );
    // The gradient is not all zero (the ReLU lets some through; tiny outputs may all be cut).
    if y_ref.len() >= 8 {
        assert!(dx_fus.data.iter().any(|v| *v != 0.0), "{what}: ∇x all zero");
    }
}

#[test]
fn fused_bn_relu_maxpool_matches_the_layers() {
    let mut rng = Rng::new(11);
    for train in [true, false] {
        for shape in [
            [1, 3, 7, 9],
            [2, 4, 11, 10],
            [3, 2, 8, 8],
            [1, 2, 2, 2],
            [2, 5, 15, 13],
        ] {
            for win in [(2, 2, 0), (3, 2, 1), (3, 1, 1), (2, 1, 0)] {
                layer_case(&mut rng, shape, win, train);
            }
        }
        // Wide rows: more than one block of the evaluation loop.
        layer_case(&mut rng, [1, 2, 5, 601], (2, 2, 0), train);
    }
}

#[test]
fn fused_forward_keeps_ties_and_nan_as_the_pool() {
    // Equal values in a window and NaN: the fused pass takes the same value and the same argmax.
    let mut x = Tensor::zeros(&[1, 1, 4, 5]);
    x.data[0] = 1.0;
    x.data[1] = 1.0;
    x.data[7] = f32::NAN;
    x.data[12] = -3.0;
    for train in [true, false] {
        let (mut b1, mut b2) = (BatchNorm2d::new(1), BatchNorm2d::new(1));
        let (mut p1, mut p2) = (MaxPool2d::new(2, 2, 0, true), MaxPool2d::new(2, 2, 0, true));
        let (mut t, mut y1, mut y2) = (Tensor::default(), Tensor::default(), Tensor::default());
        // Running statistics (mean 0, var 1): the NaN stays NaN.
        b1.forward(&x, &mut t, false).unwrap();
        p1.forward(&t, &mut y1).unwrap();
        bn_relu_maxpool_forward(&mut b2, &mut p2, &x, &mut y2, false, train).unwrap();
        for (a, b) in y1.data.iter().zip(&y2.data) {
            assert!(a == b || (a.is_nan() && b.is_nan()), "{a} vs {b}");
        }
    }
}

/// Builds the same network twice (one fused, one node by node) and compares training and evaluation.
fn net_case(name: &str, input: usize, width: usize, batch: usize) {
    let mut spec = ModelSpec::parse(name, 3, 10, input).unwrap();
    spec.width = width;
    let mut fused = spec.build(7).unwrap();
    let mut plain = spec.build(7).unwrap();
    plain.set_fusion(false);
    // Node times tell which nodes ran: a fused pair's time goes to its BN node, none to the pool.
    fused.set_profiling(true);
    let mut rng = Rng::new(3);
    let x = randn(&mut rng, &[batch, 3, input, input]);
    let labels: Vec<usize> = (0..batch).map(|i| (i * 7 + 1) % 10).collect();
    let what = format!("{name} {input}px width {width} batch {batch}");
    for step in 0..2 {
        for net in [&mut fused, &mut plain] {
            net.zero_grad();
            net.forward_loss(&x, &labels, true, &mut LocalExec).unwrap();
            net.backward(&mut LocalExec, true).unwrap();
        }
        let w = format!("{what} train step {step}");
        close(
            &plain.logits().data,
            &fused.logits().data,
            &format!("{w}: logits"),
        );
        close(
            &plain.input_grad.data,
            &fused.input_grad.data,
            &format!("{w}: ∇x"),
        );
        compare_state(&mut plain, &mut fused, &w);
    }
    // In training only 2×2 stride-2 pools run fused (the ResNet stem's 3×3 pool only in evaluation).
    let pools: Vec<usize> = (0..fused.nodes.len())
        .filter(|&i| match &fused.nodes[i].layer {
            Layer::MaxPool(p) => (p.k, p.stride, p.pad) == (2, 2, 0),
            _ => false,
        })
        .collect();
    let times = fused.node_times().unwrap();
    for &i in &pools {
        assert_eq!(fused.nodes[i - 1].layer.kind(), "batchnorm");
        assert_eq!(
            times[i].forward_s + times[i].backward_s,
            0.0,
            "{what}: pool {i} ran alone"
        );
        assert!(times[i - 1].forward_s > 0.0 && times[i - 1].backward_s > 0.0);
    }
    // Evaluation, and a backward after it (the fused pass then recomputes its argmax); every BN → pool pair
    // runs fused.
    fused.set_profiling(true);
    for net in [&mut fused, &mut plain] {
        net.zero_grad();
        net.forward_loss(&x, &labels, false, &mut LocalExec)
            .unwrap();
        net.backward(&mut LocalExec, true).unwrap();
    }
    let times = fused.node_times().unwrap();
    let mut n_pools = 0;
    for (i, node) in fused.nodes.iter().enumerate() {
        if node.layer.kind() == "maxpool" {
            n_pools += 1;
            assert_eq!(
                times[i].forward_s + times[i].backward_s,
                0.0,
                "{what}: eval pool {i} ran alone"
            );
        }
    }
    assert!(n_pools > 0, "{what}: no max pool");
    let w = format!("{what} eval");
    close(
        &plain.logits().data,
        &fused.logits().data,
        &format!("{w}: logits"),
    );
    close(
        &plain.input_grad.data,
        &fused.input_grad.data,
        &format!("{w}: ∇x"),
    );
    compare_state(&mut plain, &mut fused, &w);
}

/// Every parameter gradient and every state entry (running averages included) of two networks.
fn compare_state(a: &mut Net, b: &mut Net, what: &str) {
    let mut grads_a = Vec::new();
    a.visit_params(&mut |n, p| grads_a.push((n.to_string(), p.grad.data.clone())));
    let mut i = 0;
    b.visit_params(&mut |n, p| {
        assert_eq!(grads_a[i].0, n);
        close(&grads_a[i].1, &p.grad.data, &format!("{what}: ∇{n}"));
        i += 1;
    });
    assert_eq!(i, grads_a.len());
    let mut state_a = Vec::new();
    a.visit_state(&mut |n, s| {
        if let asymml_core::models::StateMut::Tensor(t) = s {
            state_a.push((n, t.data.clone()));
        }
    });
    let mut j = 0;
    b.visit_state(&mut |n, s| {
        if let asymml_core::models::StateMut::Tensor(t) = s {
            assert_eq!(state_a[j].0, n);
            close(&state_a[j].1, &t.data, &format!("{what}: {n}"));
            j += 1;
        }
    });
    assert_eq!(j, state_a.len());
}

#[test]
fn fused_vgg_matches_unfused() {
    // Odd sizes: 35 → 17 → 8 → 4 → 2 → 1 through the five pools.
    net_case("vgg11-cifar", 35, 8, 2);
    net_case("vgg11-cifar", 32, 8, 1);
    net_case("vgg-small", 28, 64, 2);
}

#[test]
fn fused_resnet_matches_unfused() {
    // ImageNet stem: BN then ReLU+MaxPool(3, 2, 1) fused; 65 px gives odd maps (33 → 17).
    net_case("resnet18-imagenet", 65, 8, 1);
    net_case("resnet18-imagenet", 64, 8, 2);
}

/// An executor that applies BatchNorm's map itself where the network offers it (as the split runtime does in
/// its merge), counting the offers.
struct Mapping {
    offers: usize,
}

impl asymml_core::models::ConvExec for Mapping {
    fn conv_forward(
        &mut self,
        conv: &mut asymml_core::layers::Conv2d,
        x: &Tensor,
        y: &mut Tensor,
        train: bool,
    ) -> asymml_core::Result<()> {
        LocalExec.conv_forward(conv, x, y, train)
    }

    fn conv_forward_mapped(
        &mut self,
        conv: &mut asymml_core::layers::Conv2d,
        x: &Tensor,
        y: &mut Tensor,
        map: asymml_core::layers::ChannelMap<'_>,
    ) -> asymml_core::Result<bool> {
        self.offers += 1;
        LocalExec.conv_forward(conv, x, y, false)?;
        let plane = y.shape[2] * y.shape[3];
        for (i, row) in y.data.chunks_exact_mut(plane).enumerate() {
            let c = i % map.channels();
            row.iter_mut().for_each(|v| *v = map.apply(c, *v));
        }
        Ok(true)
    }

    fn conv_backward(
        &mut self,
        conv: &mut asymml_core::layers::Conv2d,
        x: &Tensor,
        dy: &Tensor,
        dx: Option<&mut Tensor>,
    ) -> asymml_core::Result<()> {
        LocalExec.conv_backward(conv, x, dy, dx)
    }
}

#[test]
fn batchnorm_applied_by_the_conv_executor_equals_the_layer() {
    // VGG11: three convs whose BatchNorm has no pooling after it (the first of each pair) are offered to the
    // executor in inference; the others keep the BatchNorm → ReLU+MaxPool pass. ResNet18 (CIFAR style): the
    // stem and both convs of every block. The results are BatchNorm's bit for bit (the same arithmetic),
    // over two forwards (the offered convs' outputs change buffers), and nothing is offered in training (nor
    // at the network's own nodes with fusion off).
    for (name, offers) in [("vgg11", 3), ("resnet18", 17)] {
        let mut rng = Rng::new(11);
        let x = randn(&mut rng, &[2, 3, 32, 32]);
        let build = |rng: &mut Rng| {
            let mut net = ModelSpec::parse(name, 3, 10, 32).unwrap().build(7).unwrap();
            let mut bns = Vec::new();
            for node in &mut net.nodes {
                match &mut node.layer {
                    Layer::BatchNorm(b) => bns.push(b),
                    Layer::Block(blk) => {
                        bns.push(&mut blk.bn1);
                        bns.push(&mut blk.bn2);
                        if let Some((_, b)) = blk.downsample.as_mut() {
                            bns.push(b);
                        }
                    }
                    _ => {}
                }
            }
            for b in bns {
                let relu = b.relu;
                *b = bn_with_params(b.channels, rng).with_relu(relu);
            }
            net
        };
        let mut plain = build(&mut Rng::new(3));
        let mut mapped = build(&mut Rng::new(3));
        let mut exec = Mapping { offers: 0 };
        for round in 0..2 {
            let want = plain.forward(&x, false, &mut LocalExec).unwrap().clone();
            let got = mapped.forward(&x, false, &mut exec).unwrap().clone();
            assert_eq!(want.data, got.data, "{name} round {round}");
            assert_eq!(exec.offers, offers * (round + 1), "{name}");
        }
        // Training forwards use the batch's statistics: nothing is offered (both nets' running averages move
        // alike).
        plain.forward(&x, true, &mut LocalExec).unwrap();
        mapped.forward(&x, true, &mut exec).unwrap();
        assert_eq!(exec.offers, 2 * offers, "{name}");
        let offers_before = exec.offers;
        // A backward needs the convs' own outputs, which a mapped inference forward did not keep: refused,
        // until a training forward.
        mapped.forward_loss(&x, &[1, 2], false, &mut exec).unwrap();
        let err = mapped.backward(&mut exec, false).unwrap_err().to_string();
        assert!(
            err.contains("run a training forward first"),
            "{name}: {err}"
        );
        mapped.forward_loss(&x, &[1, 2], true, &mut exec).unwrap();
        mapped.backward(&mut exec, false).unwrap();
        plain.forward(&x, true, &mut LocalExec).unwrap();
        if name == "vgg11" {
            mapped.set_fusion(false);
            let want = plain.forward(&x, false, &mut LocalExec).unwrap().clone();
            let got = mapped.forward(&x, false, &mut exec).unwrap().clone();
            assert_eq!(
                exec.offers,
                offers_before + offers,
                "fusion off: nothing offered"
            );
            assert_eq!(want.data, got.data, "unfused");
        }
    }
}
