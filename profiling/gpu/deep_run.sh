#!/usr/bin/env bash
# Build DeepEP V1 and DeepGEMM from sources that travelled with the tree, then run deep_kernels_bench.py.
# Fetches nothing. SRC holds DeepEP/ (deepseek-ai/DeepEP 567632d, the last V1 commit) and DeepGEMM/
# (deepseek-ai/DeepGEMM 54e2261 with third-party/cutlass/include from NVIDIA/cutlass f3fde58 and
# third-party/fmt/include from fmtlib/fmt 553ec11), as ../shared/reference/deepep-deepgemm-on-device.md describes.
#
#   OUT=/some/dir bash profiling/gpu/deep_run.sh SRC [extra deep_kernels_bench.py args]
#
# Writes OUT/deep-kernels-<card>x<N>.json and OUT/deep_run.log. NVLink multicast stays off.
set -u
SRC="$(cd "${1:?usage: deep_run.sh SRC_DIR}" && pwd)"; shift
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="${OUT:-$PWD/profiling-out}"; mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/deep_run.log") 2>&1
SITE="$($PY -c 'import site; print(site.getsitepackages()[0])')"
NVSHMEM="$SITE/nvidia/nvshmem"; TORCHLIB="$($PY -c 'import torch, os; print(os.path.dirname(torch.__file__))')/lib"
export LD_LIBRARY_PATH="$NVSHMEM/lib:$SITE/nvidia/cu13/lib:$TORCHLIB:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
N="$($PY -c 'import torch; print(torch.cuda.device_count())')"
echo "== $(date -u +%T) deep_run: $N GPU(s), SRC=$SRC"
nvidia-smi --query-gpu=index,name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv || true
nvidia-smi topo -m || true
t0=$SECONDS
( cd "$SRC/DeepEP" && CPATH=/usr/local/cuda/include/cccl LIBRARY_PATH=/usr/local/cuda/lib64/stubs MAX_JOBS=16 \
    TORCH_CUDA_ARCH_LIST=9.0 $PY setup.py build_ext --inplace >"$OUT/build-deepep.log" 2>&1; echo "deepep build rc=$?" ) &
p_ep=$!
( cd "$SRC/DeepGEMM" && CC=/usr/bin/g++ CXX=/usr/bin/g++ DG_USE_LOCAL_VERSION=0 MAX_JOBS=16 \
    $PY setup.py build >"$OUT/build-deepgemm.log" 2>&1; echo "deepgemm build rc=$?" ) &
p_dg=$!
wait "$p_ep"; wait "$p_dg"   # not a bare wait: that would also wait for the tee behind the log
echo "== builds done in $((SECONDS - t0)) s"
DG_LIB="$(ls -d "$SRC"/DeepGEMM/build/lib.* | head -1)"
export PYTHONPATH="$SRC/DeepEP:$DG_LIB:${PYTHONPATH:-}" DG_JIT_CACHE_DIR="${DG_JIT_CACHE_DIR:-/tmp/dg-jit}"
CARD="$($PY -c 'import torch,re; n=torch.cuda.get_device_name(0).upper(); m=re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", n); print(m.group(1).lower() if m else "gpu")')"
timeout --kill-after=10 "${BENCH_SECS:-420}" $PY -m torch.distributed.run --standalone --nproc-per-node="$N" \
  "$HERE/deep_kernels_bench.py" --src "$SRC" --out "$OUT/deep-kernels-${CARD}x${N}.json" "$@"
echo "== $(date -u +%T) deep_run done rc=$? ($((SECONDS - t0)) s)"
