"""Accelerator catalog: memory, bandwidths and peak throughput per GPU kind (a data file)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Literal

import yaml

from widep.errors import UserError, did_you_mean


@dataclass(frozen=True)
class GPUSpec:
    """One accelerator kind. Throughputs are dense (no 2:4 sparsity); bandwidths per direction."""

    name: str
    description: str
    memory_gib: float
    """Memory the device reports (what --gpu-memory-utilization multiplies), GiB."""
    hbm_tbps: float
    bf16_tflops: float
    fp8_tflops: float
    fp4_tflops: float | None
    nvlink_gbps: float
    """Intra-node GPU-to-GPU bandwidth per direction, GB/s."""
    nic_gbps: float
    """Inter-node bandwidth per GPU per direction, GB/s (one 400 Gb/s NIC per GPU = 50)."""
    device: Literal["cuda", "cpu"]
    sms: int = 132
    """Streaming multiprocessors: the DeepGEMM expert GEMMs' weight stream is capped per SM (perf model)."""

    def tflops(self, dtype: str) -> float:
        if dtype == "fp8":
            return self.fp8_tflops
        if dtype in ("mxfp4", "fp4", "int4") and self.fp4_tflops:
            return self.fp4_tflops
        return self.bf16_tflops


@lru_cache(maxsize=1)
def gpu_catalog() -> dict[str, GPUSpec]:
    raw = yaml.safe_load((resources.files("widep.spec") / "presets" / "gpus.yaml").read_text())
    return {name: GPUSpec(name=name, **fields) for name, fields in raw.items()}


def get_gpu(name: str) -> GPUSpec:
    """The spec of a GPU kind by name (case-insensitive); UserError listing valid kinds otherwise."""
    cat = gpu_catalog()
    for key, spec in cat.items():
        if key.lower() == name.lower():
            return spec
    raise UserError(
        f"cluster.gpu: unknown GPU kind {name!r}.{did_you_mean(name.upper(), list(cat))} Valid: {', '.join(cat)}."
    )
