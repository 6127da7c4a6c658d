#!/usr/bin/env python3
"""PyTorch GPU reference benchmark for asymml (the "GPU-only" baseline).

Times inference (forward under no_grad, eval mode) and a full training step
(forward + cross-entropy + backward + SGD step, train mode) of the same CNNs
as tools/bench_torch.py, entirely on one CUDA GPU, with torch.cuda.synchronize()
around every timed step so that the times are the GPU's, not the launch
queue's. Models, input sizes and the SGD settings are those of bench_torch.py.

By default convolutions and matmuls run in plain float32 (TF32 off), like
asymml's CUDA backend; --tf32 allows TF32 tensor cores, --cudnn-benchmark
lets cuDNN time its algorithms at the first step (PyTorch's fastest setting).

Examples:
    python3 tools/bench_torch_gpu.py
    python3 tools/bench_torch_gpu.py --models vgg16-imagenet --batch-size 32 --json
    python3 tools/bench_torch_gpu.py --models vgg16-cifar,resnet18-cifar --tf32 --cudnn-benchmark
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_torch import (  # noqa: E402  (the CPU benchmark's models and argument checks)
    DEFAULT_INPUT_SIZE,
    NUM_CLASSES,
    build_model,
    non_negative_int,
    parse_model_name,
    positive_int,
)


def time_steps(fn, warmup, steps, sync):
    for _ in range(warmup):
        fn()
    sync()
    times_ms = []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times_ms.append((time.perf_counter() - t0) * 1000.0)
    return times_ms


def bench_model(name, batch, input_size, warmup, steps, device):
    import torch
    import torch.nn.functional as F

    def sync():
        torch.cuda.synchronize(device)

    torch.manual_seed(0)
    model = build_model(name).to(device)
    x = torch.randn(batch, 3, input_size, input_size, device=device)
    y = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    torch.cuda.reset_peak_memory_stats(device)

    # Inference.
    model.eval()

    def forward():
        with torch.no_grad():
            model(x)

    fwd = time_steps(forward, warmup, steps, sync)

    # Training step.
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def train_step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    train = time_steps(train_step, warmup, steps, sync)

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
        "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 1e6,
    }


def main(argv=None):
    p = argparse.ArgumentParser(
        description="PyTorch GPU forward / training-step benchmark (the GPU-only reference for asymml)."
    )
    p.add_argument("--device", default="cuda:0", help="CUDA device (default cuda:0)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="batch size (default 32)")
    p.add_argument("--models", default="vgg16-imagenet,resnet18-imagenet",
                   help="comma-separated: vgg11/13/16/19 or resnet18/34 with -cifar or -imagenet "
                        "(default vgg16-imagenet,resnet18-imagenet)")
    p.add_argument("--input-size", type=positive_int, default=None,
                   help="square input side in pixels (default 32 for -cifar, 224 for -imagenet)")
    p.add_argument("--warmup", type=non_negative_int, default=3, help="untimed steps per phase (default 3)")
    p.add_argument("--steps", type=positive_int, default=10, help="timed steps per phase (default 10)")
    p.add_argument("--tf32", action="store_true",
                   help="allow TF32 tensor cores in convolutions and matmuls (default: plain float32)")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="torch.backends.cudnn.benchmark = True (cuDNN times its algorithms first)")
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

    if not torch.cuda.is_available():
        print("error: PyTorch sees no CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type != "cuda":
        p.error(f"--device must be a CUDA device, got {args.device!r}")
    torch.cuda.set_device(device)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch.backends.cudnn.benchmark = args.cudnn_benchmark

    results = []
    for m in models:
        size = args.input_size or DEFAULT_INPUT_SIZE[parse_model_name(m)[2]]
        if not args.json:
            print(f"running {m} (input {size}x{size}) on {args.device} ...", file=sys.stderr, flush=True)
        results.append(bench_model(m, args.batch_size, size, args.warmup, args.steps, device))

    props = torch.cuda.get_device_properties(device)
    report = {
        "device": args.device,
        "gpu": props.name,
        "gpu_memory_gb": props.total_memory / 1e9,
        "compute_capability": f"{props.major}.{props.minor}",
        "batch": args.batch_size,
        "warmup": args.warmup,
        "steps": args.steps,
        "tf32": args.tf32,
        "cudnn_benchmark": args.cudnn_benchmark,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "machine": platform.machine(),
        "results": results,
    }
    if args.json:
        print(json.dumps(report))
        return 0

    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}) on "
          f"{props.name}, batch {args.batch_size}, {args.warmup} warmup + {args.steps} timed steps, "
          f"TF32 {'on' if args.tf32 else 'off'}, cudnn.benchmark {'on' if args.cudnn_benchmark else 'off'}")
    header = (f"{'model':<20} {'input':>5} {'fwd med ms':>11} {'fwd min ms':>11} {'fwd img/s':>10} "
              f"{'train med ms':>13} {'train min ms':>13} {'train img/s':>12} {'peak MB':>8}")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['model']:<20} {r['input_size']:>5} {r['forward_ms_median']:>11.2f} "
              f"{r['forward_ms_min']:>11.2f} {r['forward_images_per_s']:>10.1f} "
              f"{r['train_ms_median']:>13.2f} {r['train_ms_min']:>13.2f} "
              f"{r['train_images_per_s']:>12.1f} {r['peak_memory_mb']:>8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
