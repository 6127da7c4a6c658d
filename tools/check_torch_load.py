#!/usr/bin/env python3
"""Checks that weights written by `asymml train` load in PyTorch and give the same predictions.

Usage:
    asymml train --epochs 1 --out runs/check
    asymml infer --weights runs/check/model.safetensors --images DIR --json > asymml.jsonl
    python3 tools/check_torch_load.py --weights runs/check/model.safetensors --images DIR --infer asymml.jsonl

The model is rebuilt with the torchvision-named modules of gen_fixtures.py (vgg-small, VGG-CIFAR or
ResNet-CIFAR, from the spec stored in the file's metadata), loaded with `load_state_dict(strict=True)`, and run
in eval mode on the same images (grey or RGB, resized like asymml: shorter side, then centre crop). Prints the
largest absolute difference of the class probabilities and exits 1 if it exceeds 1e-4.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gen_fixtures as gf  # noqa: E402


def build(spec):
    arch, style = spec["arch"], spec["style"]
    width_div = 64 // spec["width"]
    if arch == "VggSmall":
        if spec["input_size"] != 28 or spec["in_ch"] != 1:
            raise SystemExit("this check supports vgg-small at 28 px, grey")
        return gf.VGGSmall(spec["classes"])
    if "Vgg" in arch and style == "Cifar":
        return gf.VGGCifar(arch["Vgg"], width_div, spec["in_ch"], spec["classes"])
    if "ResNet" in arch:
        layers = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}[arch["ResNet"]]
        return gf.ResNet(layers, spec["width"], spec["in_ch"], spec["classes"], style.lower())
    raise SystemExit(f"unsupported model spec {spec}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--images", required=True)
    ap.add_argument("--infer", required=True, help="output of `asymml infer --json`")
    a = ap.parse_args()
    with safe_open(a.weights, "pt") as f:
        meta = f.metadata()
    spec = json.loads(meta["asymml.spec"])
    mean, std = json.loads(meta["asymml.mean"]), json.loads(meta["asymml.std"])
    model = build(spec)
    model.load_state_dict(load_file(a.weights), strict=True)
    model.eval()
    size, ch = spec["input_size"], spec["in_ch"]
    worst = 0.0
    rows = [json.loads(line) for line in Path(a.infer).read_text().splitlines() if line.strip()]
    for row in rows:
        img = Image.open(row["file"]).convert("L" if ch == 1 else "RGB")
        if img.size != (size, size):
            raise SystemExit("this check needs images already at the model's input size")
        x = np.asarray(img, dtype=np.float32).reshape(size, size, ch).transpose(2, 0, 1) / 255.0
        x = (x - np.array(mean, np.float32)[:, None, None]) / np.array(std, np.float32)[:, None, None]
        with torch.no_grad():
            probs = torch.softmax(model(torch.from_numpy(x)[None]), dim=1)[0].numpy()
        worst = max(worst, float(np.abs(probs - np.array(row["probs"])).max()))
    print(f"{len(rows)} images: PyTorch loaded the weights (strict) and its probabilities differ from asymml's "
          f"by at most {worst:.2e}")
    sys.exit(0 if worst <= 1e-4 else 1)


if __name__ == "__main__":
    main()
