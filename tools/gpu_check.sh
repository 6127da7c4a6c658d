#!/usr/bin/env bash
# Checks asymml's CUDA accelerator on a GPU machine, from binaries built elsewhere with `--features cuda`:
#   1. the CUDA backend's own tests against the CPU backend (if the test binary is given),
#   2. `asymml verify` (one split training step on the GPU against trusted-only) on VGG16 and ResNet18,
#   3. one split benchmark with the accelerator's copy / kernel times.
# It puts the CUDA 13 / cuDNN 9 libraries of PyTorch's pip packages (site-packages/nvidia/*/lib) on
# LD_LIBRARY_PATH when python3 finds them.
#
#   ASYMML_BIN=target/release/asymml ASYMML_TEST_BIN=target/release/untrusted-tests tools/gpu_check.sh
#
# Exit status: the number of failed checks (0: all passed).
set -uo pipefail
BIN=${ASYMML_BIN:-target/release/asymml}
TEST_BIN=${ASYMML_TEST_BIN:-}
DEVICE=${ASYMML_DEVICE:-cuda:0}
THREADS=${ASYMML_THREADS:-$(nproc)}

if command -v python3 >/dev/null; then
    libs=$(python3 - <<'EOF'
import glob, os, site, sys
roots = list(site.getsitepackages()) + [site.getusersitepackages()] + sys.path
seen = []
for r in roots:
    for d in sorted(glob.glob(os.path.join(r, "nvidia", "*", "lib"))):
        if d not in seen:
            seen.append(d)
print(":".join(seen))
EOF
)
    if [ -n "$libs" ]; then
        export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    fi
fi
command -v nvidia-smi >/dev/null && nvidia-smi -L

failed=0
check() {
    echo "== $*"
    if "$@"; then echo "== ok"; else echo "== FAILED ($?)"; failed=$((failed + 1)); fi
}

if [ -n "$TEST_BIN" ]; then
    check env ASYMML_REQUIRE_GPU=1 "$TEST_BIN" --nocapture --test-threads 1
fi
check "$BIN" verify --model vgg16 --input-size 32 --batch 4 --threads "$THREADS" --accelerator-device "$DEVICE"
check "$BIN" verify --model resnet18 --input-size 32 --batch 4 --threads "$THREADS" --accelerator-device "$DEVICE"
check "$BIN" verify --model vgg16 --input-size 224 --batch 2 --rank asym1 --threads "$THREADS" --accelerator-device "$DEVICE"
# Informational (not counted): TF32 convolutions are about 1e-3 accurate, so this may exceed verify's 1e-4.
echo "== (TF32, informational)"
ASYMML_CUDA_TF32=1 "$BIN" verify --model resnet18 --input-size 32 --batch 4 --threads "$THREADS" \
    --accelerator-device "$DEVICE"
check env ASYMML_ACCEL_STATS=1 "$BIN" bench --models vgg16-imagenet,resnet18-imagenet --modes split \
    --batch-size 32 --warmup 1 --steps 2 --threads "$THREADS" --accelerator-device "$DEVICE"
echo "failed checks: $failed"
exit "$failed"
