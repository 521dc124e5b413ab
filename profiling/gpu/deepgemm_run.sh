#!/usr/bin/env bash
# Build DeepGEMM from a source tarball that travelled with the tree, then run deepgemm_bench.py on GPU 0.
# Fetches nothing. SRC_TGZ holds DeepGEMM/ (deepseek-ai/DeepGEMM 54e2261 with third-party/cutlass/include from
# NVIDIA/cutlass f3fde58 and third-party/fmt/include from fmtlib/fmt 553ec11), as
# ../shared/reference/deepep-deepgemm-on-device.md describes.
#
#   OUT=/some/dir bash profiling/gpu/deepgemm_run.sh SRC_TGZ [extra deepgemm_bench.py args]
#
# Writes OUT/deepgemm-<card>x1.json, OUT/deepgemm_run.log and OUT/build-deepgemm.log.
set -u
TGZ="$(cd "$(dirname "${1:?usage: deepgemm_run.sh SRC_TGZ}")" && pwd)/$(basename "$1")"; shift
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="${OUT:-$PWD/profiling-out}"; mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/deepgemm_run.log") 2>&1
WORK="${WORK:-/tmp/dg-src}"; mkdir -p "$WORK"; tar -xzf "$TGZ" -C "$WORK"
echo "== $(date -u +%T) deepgemm_run: SRC=$WORK/DeepGEMM"
nvidia-smi --query-gpu=index,name,memory.total,driver_version,clocks.max.sm,clocks.max.mem,power.limit --format=csv || true
t0=$SECONDS
( cd "$WORK/DeepGEMM" && CC=/usr/bin/g++ CXX=/usr/bin/g++ DG_USE_LOCAL_VERSION=0 MAX_JOBS=16 \
    $PY setup.py build >"$OUT/build-deepgemm.log" 2>&1; echo "deepgemm build rc=$? ($((SECONDS - t0)) s)" )
DG_LIB="$(ls -d "$WORK"/DeepGEMM/build/lib.* | head -1)"
export PYTHONPATH="$DG_LIB:${PYTHONPATH:-}" DG_JIT_CACHE_DIR="${DG_JIT_CACHE_DIR:-/tmp/dg-jit}"
CARD="$($PY -c 'import torch,re; n=torch.cuda.get_device_name(0).upper(); m=re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", n); print(m.group(1).lower() if m else "gpu")')"
timeout --kill-after=10 "${BENCH_SECS:-420}" $PY "$HERE/deepgemm_bench.py" --src "$WORK/DeepGEMM" \
  --out "$OUT/deepgemm-${CARD}x1.json" "$@"
echo "== $(date -u +%T) deepgemm_run done rc=$? ($((SECONDS - t0)) s)"
