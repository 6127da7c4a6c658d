#!/usr/bin/env python3
"""Generate PyTorch reference fixtures for the asymml-core Rust tests.

Usage (from the repository root):

    pip install torch torchvision safetensors numpy
    python3 tools/gen_fixtures.py [--out DIR]

Writes into crates/asymml-core/tests/fixtures/ by default:

    layers.safetensors               single-layer forward/backward cases
    vgg_small.safetensors            small models with torchvision parameter
    vgg11_w8_cifar.safetensors       names: params, eval/train forward,
    resnet18_w8_cifar.safetensors    loss, grads, BN buffers after one train
    resnet18_w8_imagenet.safetensors forward, params after one SGD step
    optim.safetensors                SGD / Nesterov / AdamW steps, LR schedules
    torchvision_keys.json            state_dict names + shapes of torchvision models

See tools/README.md for the exact tensor names.

Conventions: every stored tensor is a contiguous float32 tensor, except class
labels and BatchNorm `num_batches_tracked` (int64).  Inputs and weights are
drawn as float32 (fixed seeds) and stored as such; the reference computation
is then done in float64 starting from exactly those float32 values, and the
results are rounded to float32 once at the end.  Re-running the script
produces byte-identical files.
"""

import argparse
import math
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "crates" / "asymml-core" / "tests" / "fixtures"


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def randn(*shape):
    return torch.randn(*shape, dtype=torch.float32)


def rand(*shape):
    return torch.rand(*shape, dtype=torch.float32)


def dbl(t, grad=False):
    """Exact float64 copy of a (float32) tensor, optionally requiring grad."""
    out = t.detach().to(torch.float64).clone()
    if grad:
        out.requires_grad_(True)
    return out


def store(t):
    """Tensor as it goes into a file: float32 unless integer, contiguous, own storage."""
    t = t.detach()
    if t.dtype.is_floating_point:
        t = t.to(torch.float32)
    else:
        t = t.to(torch.int64)
    return t.contiguous().clone()


def save(tensors, path):
    tensors = {k: store(v) for k, v in tensors.items()}
    save_file(tensors, str(path))
    os.chmod(path, 0o644)
    print(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}"
          f"  ({len(tensors)} tensors, {path.stat().st_size} bytes)")


# ---------------------------------------------------------------------------
# Fixture 1: layers.safetensors
# ---------------------------------------------------------------------------

def conv_case(out, name, seed, xshape, cout, k, s, p, bias):
    torch.manual_seed(seed)
    cin = xshape[1]
    x = randn(*xshape)
    weight = randn(cout, cin, k, k) * (1.0 / math.sqrt(cin * k * k))
    b = randn(cout) * 0.1 if bias else None

    xd, wd = dbl(x, True), dbl(weight, True)
    bd = dbl(b, True) if bias else None
    y = F.conv2d(xd, wd, bd, stride=s, padding=p)
    dy = randn(*y.shape)
    inputs = [xd, wd] + ([bd] if bias else [])
    grads = torch.autograd.grad(y, inputs, dbl(dy))

    out[f"{name}.x"] = x
    out[f"{name}.weight"] = weight
    if bias:
        out[f"{name}.bias"] = b
    out[f"{name}.y"] = y
    out[f"{name}.dy"] = dy
    out[f"{name}.dx"] = grads[0]
    out[f"{name}.grad_weight"] = grads[1]
    if bias:
        out[f"{name}.grad_bias"] = grads[2]


def unary_case(out, name, seed, xshape, fn):
    torch.manual_seed(seed)
    x = randn(*xshape)
    xd = dbl(x, True)
    y = fn(xd)
    dy = randn(*y.shape)
    (dx,) = torch.autograd.grad(y, [xd], dbl(dy))
    out[f"{name}.x"] = x
    out[f"{name}.y"] = y
    out[f"{name}.dy"] = dy
    out[f"{name}.dx"] = dx


def bn_case(out, name, seed, training):
    torch.manual_seed(seed)
    c = 3
    x = randn(4, c, 5, 5)
    weight = 1.0 + 0.1 * randn(c)
    bias = 0.1 * randn(c)
    running_mean = 0.1 * randn(c)
    running_var = 1.0 + 0.5 * rand(c)

    xd, wd, bd = dbl(x, True), dbl(weight, True), dbl(bias, True)
    rm, rv = dbl(running_mean), dbl(running_var)
    y = F.batch_norm(xd, rm, rv, wd, bd, training=training, momentum=0.1, eps=1e-5)
    dy = randn(*y.shape)
    dx, gw, gb = torch.autograd.grad(y, [xd, wd, bd], dbl(dy))

    out[f"{name}.x"] = x
    out[f"{name}.weight"] = weight
    out[f"{name}.bias"] = bias
    out[f"{name}.running_mean"] = running_mean
    out[f"{name}.running_var"] = running_var
    out[f"{name}.y"] = y
    out[f"{name}.dy"] = dy
    out[f"{name}.dx"] = dx
    out[f"{name}.grad_weight"] = gw
    out[f"{name}.grad_bias"] = gb
    if training:
        out[f"{name}.running_mean_after"] = rm
        out[f"{name}.running_var_after"] = rv


def linear_case(out, name, seed):
    torch.manual_seed(seed)
    x = randn(3, 7)
    weight = randn(5, 7) * (1.0 / math.sqrt(7))
    bias = 0.1 * randn(5)
    xd, wd, bd = dbl(x, True), dbl(weight, True), dbl(bias, True)
    y = F.linear(xd, wd, bd)
    dy = randn(*y.shape)
    dx, gw, gb = torch.autograd.grad(y, [xd, wd, bd], dbl(dy))
    out[f"{name}.x"] = x
    out[f"{name}.weight"] = weight
    out[f"{name}.bias"] = bias
    out[f"{name}.y"] = y
    out[f"{name}.dy"] = dy
    out[f"{name}.dx"] = dx
    out[f"{name}.grad_weight"] = gw
    out[f"{name}.grad_bias"] = gb


def ce_case(out, name, seed):
    torch.manual_seed(seed)
    logits = randn(4, 6) * 2.0
    labels = torch.randint(0, 6, (4,), dtype=torch.int64)
    ld = dbl(logits, True)
    loss = F.cross_entropy(ld, labels, reduction="mean")
    (dlogits,) = torch.autograd.grad(loss, [ld])
    out[f"{name}.logits"] = logits
    out[f"{name}.labels"] = labels
    out[f"{name}.loss"] = loss.reshape(1)
    out[f"{name}.dlogits"] = dlogits


def gen_layers(out_dir):
    t = {}
    # name, xshape, cout, k, stride, pad, bias
    convs = [
        ("conv_a", (2, 3, 9, 9), 4, 3, 1, 1, True),
        ("conv_b", (2, 4, 10, 10), 6, 3, 2, 1, False),
        ("conv_c", (2, 5, 7, 7), 3, 1, 1, 0, True),
        ("conv_d", (2, 3, 16, 16), 4, 7, 2, 3, False),
        ("conv_e", (2, 4, 8, 8), 6, 1, 2, 0, False),
        ("conv_f", (3, 8, 6, 6), 16, 3, 1, 1, False),
    ]
    for i, (name, xs, cout, k, s, p, b) in enumerate(convs):
        conv_case(t, name, 1000 + i, xs, cout, k, s, p, b)

    unary = [
        ("maxpool_a", (2, 3, 8, 8), lambda x: F.max_pool2d(x, 2, 2)),
        ("maxpool_b", (2, 3, 9, 9), lambda x: F.max_pool2d(x, 3, 2, 1)),
        ("avgpool_a", (2, 3, 8, 8), lambda x: F.avg_pool2d(x, 2, 2)),
        ("adaptive_a", (2, 3, 5, 5), lambda x: F.adaptive_avg_pool2d(x, 1)),
        ("adaptive_b", (2, 2, 10, 10), lambda x: F.adaptive_avg_pool2d(x, 7)),
        ("adaptive_c", (1, 2, 2, 2), lambda x: F.adaptive_avg_pool2d(x, 7)),
        ("relu_a", (2, 3, 4, 4), lambda x: F.relu(x)),
        ("relumaxpool_a", (2, 3, 8, 8), lambda x: F.max_pool2d(F.relu(x), 2, 2)),
    ]
    for i, (name, xs, fn) in enumerate(unary):
        unary_case(t, name, 2000 + i, xs, fn)

    bn_case(t, "bn_train", 3000, training=True)
    bn_case(t, "bn_eval", 3001, training=False)
    linear_case(t, "linear_a", 4000)
    ce_case(t, "ce_a", 5000)
    save(t, out_dir / "layers.safetensors")


# ---------------------------------------------------------------------------
# Fixtures 2..5: small models with torchvision parameter names
# ---------------------------------------------------------------------------

VGG_CFGS = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
}


def make_vgg_features(cfg, in_channels, div=1):
    layers = []
    c = in_channels
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            v = v // div
            layers += [
                nn.Conv2d(c, v, kernel_size=3, padding=1, bias=True),
                nn.BatchNorm2d(v),
                nn.ReLU(inplace=False),
            ]
            c = v
    return nn.Sequential(*layers), c


class VGGCifar(nn.Module):
    """torchvision vgg*_bn features, then AdaptiveAvgPool2d(1) + one Linear."""

    def __init__(self, depth, div, in_channels, num_classes):
        super().__init__()
        self.features, c = make_vgg_features(VGG_CFGS[depth], in_channels, div)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


class VGGSmall(nn.Module):
    """3 conv blocks for 28x28 grey images: 28 -> 14 -> 7 -> 3."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.features, c = make_vgg_features([32, "M", 64, "M", 64, "M"], 1)
        self.classifier = nn.Sequential(
            nn.Linear(c * 3 * 3, 128),
            nn.ReLU(inplace=False),
            nn.Linear(128, num_classes),
        )

    def forward(self, x):
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


class BasicBlock(nn.Module):
    """Same structure and names as torchvision.models.resnet.BasicBlock."""

    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision ResNet (BasicBlock) with base width `width`.

    stem="imagenet": conv1 7x7 s2 p3, bn1, relu, maxpool 3/2/1 (torchvision).
    stem="cifar":    conv1 3x3 s1 p1, bn1, relu, no maxpool.
    """

    def __init__(self, layers, width, in_channels, num_classes, stem):
        super().__init__()
        self.inplanes = width
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        elif stem == "cifar":
            self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        else:
            raise ValueError(stem)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=False)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if stem == "imagenet" else None
        self.layer1 = self._make_layer(width, layers[0], 1)
        self.layer2 = self._make_layer(width * 2, layers[1], 2)
        self.layer3 = self._make_layer(width * 4, layers[2], 2)
        self.layer4 = self._make_layer(width * 8, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width * 8 * BasicBlock.expansion, num_classes)

    def _make_layer(self, planes, blocks, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes * BasicBlock.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * BasicBlock.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * BasicBlock.expansion),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * BasicBlock.expansion
        for _ in range(1, blocks):
            layers.append(BasicBlock(self.inplanes, planes))
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        if self.maxpool is not None:
            x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


@torch.no_grad()
def init_model(model):
    """Seeded init (caller seeds). Conv: kaiming_normal fan_out (torchvision),
    conv bias 0.1*randn; Linear: PyTorch default; BN: weight 1+0.1*randn,
    bias 0.1*randn, running_mean 0.1*randn, running_var 1+0.5*rand,
    num_batches_tracked 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                m.bias.copy_(0.1 * randn(*m.bias.shape))
        elif isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.copy_(1.0 + 0.1 * randn(n))
            m.bias.copy_(0.1 * randn(n))
            m.running_mean.copy_(0.1 * randn(n))
            m.running_var.copy_(1.0 + 0.5 * rand(n))
            m.num_batches_tracked.zero_()
        elif isinstance(m, nn.Linear):
            m.reset_parameters()


def gen_model(out_dir, fname, build, xshape, seed, num_classes=10):
    torch.manual_seed(seed)
    model = build()
    init_model(model)
    model = model.to(torch.float32)

    t = {}
    for k, v in model.state_dict().items():
        t[f"param.{k}"] = v.clone()

    torch.manual_seed(seed + 1)
    x = randn(*xshape)
    labels = torch.randint(0, num_classes, (xshape[0],), dtype=torch.int64)
    t["x"] = x
    t["labels"] = labels

    # Exact float64 copy of the float32 model (int64 buffers untouched).
    model = model.to(torch.float64)

    model.eval()
    with torch.no_grad():
        t["eval_logits"] = model(dbl(x))

    model.train()
    xd = dbl(x, True)
    logits = model(xd)
    loss = F.cross_entropy(logits, labels, reduction="mean")
    model.zero_grad(set_to_none=True)
    loss.backward()
    t["logits"] = logits
    t["loss"] = loss.reshape(1)
    t["dx"] = xd.grad

    for n, p in model.named_parameters():
        t[f"grad.{n}"] = p.grad
    for n, b in model.named_buffers():
        t[f"after.{n}"] = b.clone()

    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9,
                          weight_decay=5e-4, nesterov=True)
    opt.step()
    for n, p in model.named_parameters():
        t[f"sgd.{n}"] = p.detach().clone()

    save(t, out_dir / fname)


def gen_models(out_dir):
    gen_model(out_dir, "vgg_small.safetensors", lambda: VGGSmall(10), (4, 1, 28, 28), 6000)
    gen_model(out_dir, "vgg11_w8_cifar.safetensors",
              lambda: VGGCifar(11, 8, 3, 10), (2, 3, 32, 32), 6100)
    gen_model(out_dir, "resnet18_w8_cifar.safetensors",
              lambda: ResNet([2, 2, 2, 2], 8, 3, 10, "cifar"), (2, 3, 16, 16), 6200)
    gen_model(out_dir, "resnet18_w8_imagenet.safetensors",
              lambda: ResNet([2, 2, 2, 2], 8, 3, 10, "imagenet"), (2, 3, 64, 64), 6300)


# ---------------------------------------------------------------------------
# Fixture 6: optim.safetensors
# ---------------------------------------------------------------------------

def gen_optim(out_dir):
    torch.manual_seed(7000)
    p0 = randn(10)
    gs = [randn(10) for _ in range(3)]
    t = {"p0": p0, "g1": gs[0], "g2": gs[1], "g3": gs[2]}

    configs = {
        "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=5e-4),
        "nesterov": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=5e-4,
                                               nesterov=True),
        "plain": lambda ps: torch.optim.SGD(ps, lr=0.1),
        "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, betas=(0.9, 0.999), eps=1e-8,
                                              weight_decay=1e-2),
    }
    for name, make in configs.items():
        p = nn.Parameter(dbl(p0))
        opt = make([p])
        for i, g in enumerate(gs, start=1):
            p.grad = dbl(g)
            opt.step()
            t[f"{name}.p{i}"] = p.detach().clone()

    def lrs(make_sched, n):
        p = nn.Parameter(torch.zeros(1, dtype=torch.float64))
        opt = torch.optim.SGD([p], lr=0.1)
        sched = make_sched(opt)
        out = []
        for _ in range(n):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return torch.tensor(out, dtype=torch.float64)

    t["cosine_lrs"] = lrs(
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10, eta_min=0.001), 12)
    t["step_lrs"] = lrs(
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.1), 10)
    save(t, out_dir / "optim.safetensors")


# ---------------------------------------------------------------------------
# Fixture 7: torchvision_keys.json
# ---------------------------------------------------------------------------

def gen_torchvision_keys(out_dir):
    import torchvision

    names = ["vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn", "resnet18", "resnet34"]
    # Hand-written JSON: one state_dict entry per line, stable formatting.
    chunks = []
    for name in names:
        with torch.device("meta"):
            model = getattr(torchvision.models, name)(weights=None)
        entries = [
            '    ["%s", [%s]]' % (k, ", ".join(str(int(d)) for d in v.shape))
            for k, v in model.state_dict().items()
        ]
        chunks.append('  "%s": [\n%s\n  ]' % (name, ",\n".join(entries)))
    text = "{\n" + ",\n".join(chunks) + "\n}\n"
    path = out_dir / "torchvision_keys.json"
    path.write_text(text)
    print(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}"
          f"  ({path.stat().st_size} bytes)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    args = ap.parse_args()

    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    torch.set_default_dtype(torch.float32)
    out_dir = args.out.resolve()
    os.makedirs(out_dir, exist_ok=True)

    gen_layers(out_dir)
    gen_models(out_dir)
    gen_optim(out_dir)
    gen_torchvision_keys(out_dir)


if __name__ == "__main__":
    main()
