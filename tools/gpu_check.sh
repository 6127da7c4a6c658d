#!/usr/bin/env bash
# Checks asymml's CUDA accelerator on a GPU machine, from binaries built elsewhere with `--features cuda`:
#   1. the CUDA backend's own tests against the CPU backend (if the test binary is given),
#   2. `asymml verify` (one split training step with the GPU accelerator against trusted-only, 1e-4) on
#      VGG16 and ResNet18 at 32 and 224 px, with ranks that send every split conv's residual to the GPU,
#   3. PyTorch's GPU-only training step of the same models (tools/bench_torch_gpu.py), if python3 has torch,
#   4. `asymml bench` of VGG16 and ResNet18 at 224 px: split (GPU accelerator) against trusted-only (the
#      machine's CPU cores), with the accelerator's copy and kernel times.
# It puts the CUDA 13 / cuDNN 9 libraries of PyTorch's pip packages (site-packages/nvidia/*/lib) on
# LD_LIBRARY_PATH when python3 finds them.
#
#   ASYMML_BIN=target/release/asymml ASYMML_TEST_BIN=target/release/deps/asymml_untrusted-… \
#   ASYMML_IMAGES=../shared/data/images/photos GPU_OUT=gpu-out tools/gpu_check.sh
#
# Environment: ASYMML_DEVICE (cuda:0), ASYMML_THREADS (all cores), ASYMML_BATCH (32), ASYMML_STEPS (2),
# ASYMML_RANKS_SPLIT (the ranks benched with --route split: schedule,asym1), ASYMML_RANKS_AUTO (with the default
# --route auto and auto-wall: schedule,guard), ASYMML_PHASES (infer,train), ASYMML_ROUTES (split auto auto-wall),
# GPU_CHECKS (which parts to run: any of tests,verify,torch,bench; default all), GPU_OUT (folder for the logs
# and JSON; default gpu-out), GPU_BENCH_DIR (the benches' folders with bench.json and the per-layer PNGs;
# default GPU_OUT; when another, each bench.json is copied into GPU_OUT).
# Exit status: the number of failed checks (0: all passed).
set -uo pipefail
BIN=${ASYMML_BIN:-target/release/asymml}
TEST_BIN=${ASYMML_TEST_BIN:-}
DEVICE=${ASYMML_DEVICE:-cuda:0}
THREADS=${ASYMML_THREADS:-$(nproc)}
BATCH=${ASYMML_BATCH:-32}
STEPS=${ASYMML_STEPS:-2}
IMAGES=${ASYMML_IMAGES:-}
RANKS_SPLIT=${ASYMML_RANKS_SPLIT:-schedule,asym1}
RANKS_AUTO=${ASYMML_RANKS_AUTO:-schedule,guard}
PHASES=${ASYMML_PHASES:-infer,train}
ROUTES=${ASYMML_ROUTES:-split auto auto-wall}
CHECKS=${GPU_CHECKS:-tests,verify,torch,bench}
OUTDIR=${GPU_OUT:-gpu-out}
BENCH_DIR=${GPU_BENCH_DIR:-$OUTDIR}
mkdir -p "$OUTDIR" "$BENCH_DIR"
here=$(cd "$(dirname "$0")" && pwd)

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
echo "cores: $(nproc); threads: $THREADS"

failed=0
# check SECONDS COMMAND…: runs it under a time limit and counts a failure.
check() {
    local limit=$1
    shift
    echo "== $* (limit ${limit} s)"
    local t0=$SECONDS
    timeout "$limit" "$@"
    local rc=$?
    if [ $rc -eq 0 ]; then echo "== ok ($((SECONDS - t0)) s)"; else
        echo "== FAILED (exit $rc after $((SECONDS - t0)) s)"
        failed=$((failed + 1))
    fi
}
wants() { [[ ",$CHECKS," == *",$1,"* ]]; }

if wants tests && [ -n "$TEST_BIN" ]; then
    check 120 env ASYMML_REQUIRE_GPU=1 "$TEST_BIN" cuda --nocapture --test-threads 1
fi
if wants verify; then
    # ASYMML_CUDA_LOG=1: each layer's cuDNN algorithms are printed as they are chosen.
    for args in "vgg16 32 4 schedule" "resnet18 32 4 schedule" "vgg16 224 2 asym1" "resnet18 224 2 schedule"; do
        set -- $args
        check 120 env ASYMML_CUDA_LOG=1 "$BIN" verify --model "$1" --input-size "$2" --batch "$3" --rank "$4" \
            --threads "$THREADS" --accelerator-device "$DEVICE"
    done
    check 120 "$BIN" verify --model resnet18 --input-size 32 --batch 4 --rank schedule --micro-batches 3 \
        --threads "$THREADS" --accelerator-device "$DEVICE"
    # The same check with the CPU accelerator on this machine's threads, for comparison.
    check 120 "$BIN" verify --model vgg16 --input-size 32 --batch 4 --rank schedule --threads "$THREADS" \
        --accelerator-device cpu
fi
if wants torch && python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
    check 150 python3 "$here/bench_torch_gpu.py" --models vgg16-imagenet,resnet18-imagenet --batch-size "$BATCH" \
        --warmup 2 --steps 5
fi
if wants bench; then
    img=()
    [ -n "$IMAGES" ] && img=(--images "$IMAGES")
    for model in vgg16-imagenet resnet18-imagenet; do
        # The split itself (every split conv on the GPU), the default route (`auto`: a conv runs wholly
        # trusted where that costs the trusted runtime less) and `auto-wall` (where that makes the step
        # shorter), each against trusted-only in the same run.
        for route in $ROUTES; do
            modes=trusted-only,split
            ranks=$RANKS_SPLIT
            if [ "$route" != split ]; then ranks=$RANKS_AUTO; fi
            check 300 env ASYMML_ACCEL_STATS=1 "$BIN" bench --models "$model" --modes "$modes" --rank "$ranks" \
                --route "$route" --phase "$PHASES" --batch-size "$BATCH" --warmup 1 --steps "$STEPS" \
                --threads "$THREADS" --accelerator-device "$DEVICE" "${img[@]}" --out "$BENCH_DIR/bench-$model-$route"
            # Keep the JSON; the per-layer PNGs stay in the folder.
            [ "$BENCH_DIR" != "$OUTDIR" ] && cp "$BENCH_DIR/bench-$model-$route/bench.json" "$OUTDIR/bench-$model-$route.json"
        done
    done
fi
echo "failed checks: $failed"
exit "$failed"
