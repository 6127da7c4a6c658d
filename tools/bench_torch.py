#!/usr/bin/env python3
"""PyTorch CPU reference benchmark for asymml.

Times inference (forward under no_grad, eval mode) and a full training step
(forward + cross-entropy + backward + SGD step, train mode) for the CNNs that
asymml's own Rust benchmark runs, so the two can be compared on the same
machine with the same thread count.

Examples:
    python3 tools/bench_torch.py
    python3 tools/bench_torch.py --models vgg11-cifar,resnet34-cifar --threads 1
    python3 tools/bench_torch.py --models resnet18-imagenet --batch-size 8 --json
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

VGG_DEPTHS = ("11", "13", "16", "19")
RESNET_DEPTHS = ("18", "34")
VARIANTS = ("cifar", "imagenet")
DEFAULT_INPUT_SIZE = {"cifar": 32, "imagenet": 224}
NUM_CLASSES = 10


def parse_model_name(name):
    """'vgg16-cifar' -> ('vgg', '16', 'cifar'); raises ValueError if unknown."""
    base, sep, variant = name.strip().lower().rpartition("-")
    if not sep or variant not in VARIANTS:
        raise ValueError(
            f"unknown model {name!r}: expected <arch>-cifar or <arch>-imagenet"
        )
    if base.startswith("vgg") and base[3:] in VGG_DEPTHS:
        return "vgg", base[3:], variant
    if base.startswith("resnet") and base[6:] in RESNET_DEPTHS:
        return "resnet", base[6:], variant
    archs = ", ".join([f"vgg{d}" for d in VGG_DEPTHS] + [f"resnet{d}" for d in RESNET_DEPTHS])
    raise ValueError(f"unknown model {name!r}: architecture must be one of {archs}")


def build_model(name):
    import torch.nn as nn
    import torchvision.models as tvm

    family, depth, variant = parse_model_name(name)
    if family == "vgg":
        ctor = getattr(tvm, f"vgg{depth}_bn")
        if variant == "imagenet":
            return ctor(weights=None, num_classes=NUM_CLASSES)
        # CIFAR VGG: the conv stack of vgg*_bn, global average pool, one linear layer.
        features = ctor(weights=None).features
        return nn.Sequential(
            features,
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(1),
            nn.Linear(512, NUM_CLASSES),
        )
    ctor = getattr(tvm, f"resnet{depth}")
    model = ctor(weights=None, num_classes=NUM_CLASSES)
    if variant == "cifar":
        # CIFAR ResNet stem: 3x3 stride-1 conv, no max-pool.
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
        model.fc = nn.Linear(512, NUM_CLASSES)
    return model


def time_steps(fn, warmup, steps):
    for _ in range(warmup):
        fn()
    times_ms = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times_ms.append((time.perf_counter() - t0) * 1000.0)
    return times_ms


def bench_model(name, batch, input_size, warmup, steps):
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = build_model(name)
    x = torch.randn(batch, 3, input_size, input_size)
    y = torch.randint(0, NUM_CLASSES, (batch,))

    # Inference.
    model.eval()

    def forward():
        with torch.no_grad():
            model(x)

    fwd = time_steps(forward, warmup, steps)

    # Training step.
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def train_step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    train = time_steps(train_step, warmup, steps)

    fwd_med, train_med = statistics.median(fwd), statistics.median(train)
    return {
        "model": name,
        "input_size": input_size,
        "forward_ms_median": fwd_med,
        "forward_ms_min": min(fwd),
        "train_ms_median": train_med,
        "train_ms_min": min(train),
        "forward_images_per_s": batch * 1000.0 / fwd_med,
        "train_images_per_s": batch * 1000.0 / train_med,
        "forward_ms_all": fwd,
        "train_ms_all": train,
    }


def positive_int(s):
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def non_negative_int(s):
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def main(argv=None):
    p = argparse.ArgumentParser(
        description="PyTorch CPU forward / training-step benchmark (reference for asymml)."
    )
    p.add_argument("--threads", type=positive_int, default=2,
                   help="intra-op threads (torch.set_num_threads); inter-op threads are 1 (default 2)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="batch size (default 32)")
    p.add_argument("--models", default="vgg16-cifar,resnet18-cifar",
                   help="comma-separated: vgg11/13/16/19 or resnet18/34 with -cifar or -imagenet "
                        "(default vgg16-cifar,resnet18-cifar)")
    p.add_argument("--input-size", type=positive_int, default=None,
                   help="square input side in pixels (default 32 for -cifar, 224 for -imagenet)")
    p.add_argument("--warmup", type=non_negative_int, default=2, help="untimed steps per phase (default 2)")
    p.add_argument("--steps", type=positive_int, default=5, help="timed steps per phase (default 5)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args(argv)

    models = [m.strip().lower() for m in args.models.split(",") if m.strip()]
    if not models:
        p.error("--models is empty")
    for m in models:
        try:
            parse_model_name(m)
        except ValueError as e:
            p.error(str(e))

    import torch

    # Must happen before any parallel work is started.
    torch.set_num_interop_threads(1)
    torch.set_num_threads(args.threads)

    load_before = os.getloadavg()
    results = []
    for m in models:
        size = args.input_size or DEFAULT_INPUT_SIZE[parse_model_name(m)[2]]
        if not args.json:
            print(f"running {m} (input {size}x{size}) ...", file=sys.stderr, flush=True)
        results.append(bench_model(m, args.batch_size, size, args.warmup, args.steps))
    load_after = os.getloadavg()

    report = {
        "threads": args.threads,
        "batch": args.batch_size,
        "warmup": args.warmup,
        "steps": args.steps,
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "loadavg_1m_before": load_before[0],
        "loadavg_1m_after": load_after[0],
        "results": results,
    }
    if args.json:
        print(json.dumps(report))
        return 0

    print(f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch_size}, "
          f"{args.warmup} warmup + {args.steps} timed steps, "
          f"load avg (1 min) {load_before[0]:.2f} -> {load_after[0]:.2f} on {os.cpu_count()} CPUs")
    header = (f"{'model':<20} {'input':>5} {'fwd med ms':>11} {'fwd min ms':>11} {'fwd img/s':>10} "
              f"{'train med ms':>13} {'train min ms':>13} {'train img/s':>12}")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['model']:<20} {r['input_size']:>5} {r['forward_ms_median']:>11.1f} "
              f"{r['forward_ms_min']:>11.1f} {r['forward_images_per_s']:>10.1f} "
              f"{r['train_ms_median']:>13.1f} {r['train_ms_min']:>13.1f} "
              f"{r['train_images_per_s']:>12.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
