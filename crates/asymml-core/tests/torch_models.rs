//! Whole models against PyTorch (`tests/fixtures/*_w8_*.safetensors`, `vgg_small.safetensors`), the
//! state-dict layout against torchvision (`torchvision_keys.json`), and weight-file round trips.

mod common;

use asymml_core::models::{LocalExec, ModelSpec, Net, StateMut};
use asymml_core::optim::{Optimizer, OptimizerKind};
use asymml_core::rng::Rng;
use asymml_core::weights::{self, state_entries};
use asymml_core::{CoreError, Tensor};
use common::{assert_close, assert_close_floor, assert_close_slice, fixture, randn};
use std::collections::{BTreeMap, HashMap};

fn spec(name: &str, in_ch: usize, classes: usize, input: usize, width: usize) -> ModelSpec {
    let mut s = ModelSpec::parse(name, in_ch, classes, input).unwrap();
    s.width = width;
    s
}

fn max_abs(t: &Tensor) -> f64 {
    t.data.iter().fold(1e-6, |m, &v| m.max(v.abs() as f64))
}

fn is_buffer(name: &str) -> bool {
    ["running_mean", "running_var", "num_batches_tracked"]
        .iter()
        .any(|b| name.ends_with(b))
}

/// One model file: load `param.*`, then eval logits, train logits and loss, ∇x and every ∇param, the BN
/// buffers after the train forward, and one Nesterov SGD step, all against PyTorch.
fn model_case(file: &str, spec: ModelSpec) {
    let f = fixture(file);
    let ctx = |n: &str| format!("{file}: {n}");
    let mut net = spec.build(123).unwrap();
    // A torchvision-named state dict reproduces PyTorch's logits: `param.*` is PyTorch's `state_dict()`
    // (buffers included) under torchvision's names, loaded strictly.
    weights::load_bytes(&mut net, &f.bytes, "param.").unwrap();
    let x = f.t("x");
    let labels = f.labels("labels");

    let eval = net.forward(x, false, &mut LocalExec).unwrap().clone();
    assert_close(&ctx("eval_logits"), &eval, f.t("eval_logits"));

    let (loss, _) = net.forward_loss(x, &labels, true, &mut LocalExec).unwrap();
    assert_close(&ctx("logits"), net.logits(), f.t("logits"));
    assert_close_slice(&ctx("loss"), &[loss], &f.t("loss").data);

    net.zero_grad();
    net.backward(&mut LocalExec, true).unwrap();
    assert_close(&ctx("dx"), &net.input_grad, f.t("dx"));
    let mut params = Vec::new();
    net.visit_params(&mut |name, p| {
        let key = format!("grad.{name}");
        let want = f.t(&key);
        assert_eq!(p.grad.shape, want.shape, "{file}: {key} shape");
        // A conv bias followed by a train-mode BatchNorm has a zero gradient (the batch mean cancels it):
        // PyTorch's is ~1e-16, ours f32 round-off, so its scale is the conv weight gradient's.
        let floor = match name.strip_suffix(".bias") {
            Some(layer) => max_abs(f.t(&format!("grad.{layer}.weight"))),
            None => 1e-6,
        };
        assert_close_floor(&ctx(&key), &p.grad.data, &want.data, floor);
        params.push(name.to_string());
    });
    params.sort();
    assert_eq!(params, f.names_under("grad."), "{file}: parameter names");

    let mut buffers = Vec::new();
    net.visit_state(&mut |name, s| {
        if !is_buffer(&name) {
            return;
        }
        let key = format!("after.{name}");
        match s {
            StateMut::Tensor(t) => assert_close(&ctx(&key), t, f.t(&key)),
            StateMut::Counter(c) => {
                assert_eq!(*c, 1, "{file}: {name}");
                assert_eq!(f.ints(&key), [1], "{file}: {key}");
            }
        }
        buffers.push(name);
    });
    buffers.sort();
    assert_eq!(buffers, f.names_under("after."), "{file}: buffer names");

    // torch.optim.SGD(lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True), one step.
    let mut opt = Optimizer::new(
        OptimizerKind::Sgd {
            momentum: 0.9,
            nesterov: true,
        },
        5e-4,
    );
    opt.begin_step();
    let mut i = 0;
    net.visit_params(&mut |_, p| {
        opt.update(i, p, 0.1);
        i += 1;
    });
    net.visit_params(&mut |name, p| {
        let key = format!("sgd.{name}");
        assert_close(&ctx(&key), &p.value, f.t(&key));
    });
}

#[test]
fn vgg_small_matches_torch() {
    model_case(
        "vgg_small.safetensors",
        ModelSpec::parse("vgg-small", 1, 10, 28).unwrap(),
    );
}

#[test]
fn vgg11_w8_cifar_matches_torch() {
    model_case(
        "vgg11_w8_cifar.safetensors",
        spec("vgg11-cifar", 3, 10, 32, 8),
    );
}

#[test]
fn resnet18_w8_cifar_matches_torch() {
    model_case(
        "resnet18_w8_cifar.safetensors",
        spec("resnet18-cifar", 3, 10, 16, 8),
    );
}

#[test]
fn resnet18_w8_imagenet_matches_torch() {
    model_case(
        "resnet18_w8_imagenet.safetensors",
        spec("resnet18-imagenet", 3, 10, 64, 8),
    );
}

type Keys = HashMap<String, Vec<(String, Vec<usize>)>>;

/// `state_shapes()` of each of our models equals torchvision's state_dict: names, order and shapes.
fn torchvision_layout(models: &[(&str, &str)]) {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/torchvision_keys.json"
    );
    let keys: Keys = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    for &(tv, ours) in models {
        // Built one at a time: VGG at 224 px with 1000 classes holds ~0.5 GB of weights.
        let mut net = ModelSpec::parse(ours, 3, 1000, 224)
            .unwrap()
            .build(0)
            .unwrap();
        let got = net.state_shapes();
        let want = &keys[tv];
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert_eq!(g, w, "{ours} vs torchvision {tv}: entry {i}");
        }
        assert_eq!(got.len(), want.len(), "{ours} vs {tv}: number of entries");
    }
}

#[test]
fn vgg_state_dict_layout_is_torchvision() {
    torchvision_layout(&[
        ("vgg11_bn", "vgg11-imagenet"),
        ("vgg13_bn", "vgg13-imagenet"),
        ("vgg16_bn", "vgg16-imagenet"),
        ("vgg19_bn", "vgg19-imagenet"),
    ]);
}

#[test]
fn resnet_state_dict_layout_is_torchvision() {
    torchvision_layout(&[
        ("resnet18", "resnet18-imagenet"),
        ("resnet34", "resnet34-imagenet"),
    ]);
}

/// A net whose BN buffers and counters are no longer the defaults (one train forward).
fn trained_once(spec: &ModelSpec, seed: u64, x: &Tensor) -> Net {
    let mut net = spec.build(seed).unwrap();
    net.forward(x, true, &mut LocalExec).unwrap();
    net
}

fn input(spec: &ModelSpec, b: usize) -> Tensor {
    let s = spec.input_size;
    randn(&mut Rng::new(99), &[b, spec.in_ch, s, s], 1.0)
}

/// Every state entry as (name, dtype, shape, bytes).
fn state_bytes(net: &mut Net) -> Vec<(String, String, Vec<usize>, Vec<u8>)> {
    state_entries(net)
        .into_iter()
        .map(|(n, e)| (n, format!("{:?}", e.dtype), e.shape, e.bytes))
        .collect()
}

#[test]
fn save_then_load_reproduces_the_model() {
    let dir = tempfile::tempdir().unwrap();
    for spec in [
        spec("resnet18-cifar", 3, 10, 16, 8),
        spec("vgg11-cifar", 3, 10, 32, 8),
    ] {
        let name = spec.name();
        let x = input(&spec, 2);
        let mut a = trained_once(&spec, 1, &x);
        let path = dir.path().join(format!("{name}.safetensors"));
        let meta = BTreeMap::from([("model".to_string(), name.clone())]);
        weights::save(&mut a, &path, &meta).unwrap();
        let bytes = weights::read_file(&path).unwrap();
        assert_eq!(weights::metadata(&bytes).unwrap(), meta, "{name}: metadata");

        let mut b = spec.build(2).unwrap();
        let la = a.forward(&x, false, &mut LocalExec).unwrap().clone();
        let lb = b.forward(&x, false, &mut LocalExec).unwrap().clone();
        assert_ne!(la, lb, "{name}: seeds 1 and 2 should differ before loading");
        weights::load(&mut b, &path).unwrap();
        let lb = b.forward(&x, false, &mut LocalExec).unwrap().clone();
        assert_eq!(la, lb, "{name}: logits after the round trip");
        assert_eq!(state_bytes(&mut a), state_bytes(&mut b), "{name}: state");
    }
}

/// Loading `from`'s weights into `into` fails with a `CoreError::Weights` naming `tensor`, and leaves
/// `into` unchanged.
fn load_fails(from: &ModelSpec, into: &ModelSpec, tensor: &str) {
    let x = input(from, 2);
    let mut src = trained_once(from, 1, &x);
    let bytes = weights::serialize(&state_entries(&mut src), &BTreeMap::new()).unwrap();
    let mut dst = into.build(2).unwrap();
    let before = state_bytes(&mut dst);
    match weights::load_bytes(&mut dst, &bytes, "") {
        Err(CoreError::Weights(msg)) => assert!(
            msg.contains(tensor),
            "{} into {}: message should name {tensor}: {msg}",
            from.name(),
            into.name()
        ),
        other => panic!(
            "{} into {}: expected CoreError::Weights, got {other:?}",
            from.name(),
            into.name()
        ),
    }
    assert!(
        before == state_bytes(&mut dst),
        "a failed load changed the model"
    );
}

#[test]
fn loading_into_a_different_model_fails_naming_the_tensor() {
    let r18 = spec("resnet18-cifar", 3, 10, 16, 8);
    // Class count: the classifier's shapes differ.
    load_fails(&r18, &spec("resnet18-cifar", 3, 100, 16, 8), "fc.weight");
    load_fails(&r18, &spec("resnet18-cifar", 3, 100, 16, 8), "fc.bias");
    // Width: every shape differs, starting with the stem.
    load_fails(&r18, &spec("resnet18-cifar", 3, 10, 16, 16), "conv1.weight");
    // Depth: ResNet34 has blocks the file lacks.
    load_fails(
        &r18,
        &spec("resnet34-cifar", 3, 10, 16, 8),
        "layer1.2.conv1.weight",
    );
    // Deeper file into a shallower model: names the model does not have.
    load_fails(&spec("resnet34-cifar", 3, 10, 16, 8), &r18, "layer1.2.");
    // Another family altogether.
    load_fails(
        &r18,
        &spec("vgg11-cifar", 3, 10, 32, 8),
        "features.0.weight",
    );
    // Input channels.
    load_fails(
        &spec("vgg11-cifar", 3, 10, 32, 8),
        &spec("vgg11-cifar", 1, 10, 32, 8),
        "features.0.weight",
    );
}
