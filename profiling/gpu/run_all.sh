#!/usr/bin/env bash
# Run every GPU microbenchmark of profiling/gpu/ for the GPUs of this node and write the results into
# OUT (default ./profiling-out): a2a-<card>x<N>.json, gemm-<card>x1.json, hbm-<card>x1.json,
# moe-layer-<card>x2.json, moe-layer-<card>x<N>.json, calibration-<card>x<N>.json and run_all.log.
#
#   OUT=/some/dir bash profiling/gpu/run_all.sh            # on the GPU node
#   QUICK=1 ...                                            # fewer points (a fast look)
#   DEEP_SRC=/dir/with/DeepEP+DeepGEMM ...                 # also build and run DeepEP/DeepGEMM (deep_run.sh)
#
# Steps run one after another, except the two single-GPU benchmarks (gemm on GPU 0, hbm on GPU 1), which
# run side by side on different GPUs when there are two or more. Each step has its own time limit, so one
# that hangs cannot take the others with it; a failed step is reported and the rest still run.
# NVLink multicast stays off (NCCL_NVLS_ENABLE=0 and friends), as the lending machines require.
set -u
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="${OUT:-$PWD/profiling-out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
LOG="$OUT/run_all.log"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
exec > >(tee -a "$LOG") 2>&1

SMOKE_ARG=()
if [ "${SMOKE:-0}" = 1 ]; then
  # CPU smoke run (tests): 2 gloo ranks, tiny shapes, the Triton kernel in its interpreter
  N=2; SMOKE_ARG=(--cpu-smoke); export TRITON_INTERPRET=1
  echo "== $(date -u +%FT%TZ) run_all SMOKE on the CPU, OUT=$OUT"
else
  N="$($PY -c 'import torch; print(torch.cuda.device_count())')"
  echo "== $(date -u +%FT%TZ) run_all: $N GPU(s), OUT=$OUT"
  nvidia-smi --query-gpu=index,name,memory.total,driver_version,clocks.sm,clocks.mem,power.limit --format=csv || true
  nvidia-smi topo -m || true
fi
$PY -c 'import torch, sys; print("torch", torch.__version__, "cuda", torch.version.cuda, "python", sys.version.split()[0]); torch.cuda.is_available() and print("nccl", torch.cuda.nccl.version())'
$PY -c 'import triton; print("triton", triton.__version__)' || true
$PY -c 'import deep_ep' 2>&1 | tail -1 || true
if [ "$N" -lt 1 ]; then echo "no GPU: nothing to run (tests use --cpu-smoke)"; exit 2; fi

A2A_ARGS=() ; GEMM_ARGS=() ; HBM_ARGS=() ; MOE_ARGS=()
if [ "${QUICK:-0}" = 1 ]; then
  A2A_ARGS=(--tokens 1,128,4096 --iters 10) ; GEMM_ARGS=(--tokens 1,128,4096 --experts 16,64 --samples 3)
  HBM_ARGS=(--shapes 128x4096 --samples 3) ; MOE_ARGS=(--tokens 1,128,4096 --iters 5)
fi

fail=0
step() {  # step <name> <seconds> <command...>
  local name="$1" secs="$2"; shift 2
  echo "== $(date -u +%T) start $name"
  local t0=$SECONDS
  timeout --kill-after=10 "$secs" "$@"; local rc=$?
  echo "== $(date -u +%T) end $name rc=$rc ($((SECONDS - t0)) s)"
  [ $rc -eq 0 ] || fail=1
  return $rc
}
TR=("$PY" -m torch.distributed.run --standalone)

if [ "$N" -ge 2 ]; then
  step a2a "${A2A_SECS:-130}" "${TR[@]}" --nproc-per-node="$N" "$HERE/a2a_bench.py" --out-dir "$OUT" "${A2A_ARGS[@]}" "${SMOKE_ARG[@]}"
fi
if [ "$N" -ge 2 ]; then
  CUDA_VISIBLE_DEVICES=0 step gemm "${GEMM_SECS:-200}" "$PY" "$HERE/gemm_bench.py" --out-dir "$OUT" "${GEMM_ARGS[@]}" "${SMOKE_ARG[@]}" &
  p_gemm=$!
  CUDA_VISIBLE_DEVICES=1 step hbm "${HBM_SECS:-200}" "$PY" "$HERE/hbm_bench.py" --out-dir "$OUT" "${HBM_ARGS[@]}" "${SMOKE_ARG[@]}" &
  p_hbm=$!
  wait "$p_gemm" || fail=1   # not a bare wait: that would also wait for the tee behind the log
  wait "$p_hbm" || fail=1
else
  step gemm "${GEMM_SECS:-200}" "$PY" "$HERE/gemm_bench.py" --out-dir "$OUT" "${GEMM_ARGS[@]}" "${SMOKE_ARG[@]}"
  step hbm "${HBM_SECS:-200}" "$PY" "$HERE/hbm_bench.py" --out-dir "$OUT" "${HBM_ARGS[@]}" "${SMOKE_ARG[@]}"
fi
if [ "$N" -ge 2 ]; then
  CUDA_VISIBLE_DEVICES=0,1 step moe-ep2 "${MOE_SECS:-90}" "${TR[@]}" --nproc-per-node=2 "$HERE/moe_layer_bench.py" --out-dir "$OUT" "${MOE_ARGS[@]}" "${SMOKE_ARG[@]}"
fi
if [ "$N" -gt 2 ]; then
  step "moe-ep$N" "${MOE_SECS:-90}" "${TR[@]}" --nproc-per-node="$N" "$HERE/moe_layer_bench.py" --out-dir "$OUT" "${MOE_ARGS[@]}" "${SMOKE_ARG[@]}"
fi
if [ -n "${DEEP_SRC:-}" ] && [ "$N" -ge 2 ]; then  # DeepEP V1 + DeepGEMM built from carried sources (deep_run.sh)
  step deep "${DEEP_SECS:-600}" env OUT="$OUT" bash "$HERE/deep_run.sh" "$DEEP_SRC"
fi
step calibration 30 "$PY" "$HERE/make_calibration.py" --results "$OUT"
ls -la "$OUT"
echo "== $(date -u +%T) run_all done, failures: $fail"
exit $fail
