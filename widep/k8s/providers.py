"""Provider profiles: what differs between Kubernetes clusters for the same plan (pure data).

A profile decides how a pod gets RDMA (an extended resource, or network annotations), which HCA and
transport variables NCCL/NVSHMEM need there, whether DeepEP's GPU-initiated RDMA needs a privileged
container, how nodes with the right GPU are selected, and where node-local caches live.

Sources (../shared/reference/llm-d-wide-ep.md, llm-d's ``guides/wide-ep-lws`` overlays):

* coreweave: ``NCCL_IB_HCA=ibp``, ``NVSHMEM_HCA_PREFIX=ibp``, ``rdma/ib: 1`` per pod, hostPath caches under
  ``/mnt/local``, required node affinity on ``gpu.nvidia.com/model`` ("won't fit on our H100s").
* gke: multi-networking annotations mapping ``eth2..eth9`` to the ``rdma-0..rdma-7`` networks,
  ``privileged: true`` "to perform GPU initiated RDMA", ``NVSHMEM_DISABLED_GDRCOPY=true``, GKE's NCCL
  tuner/net plugins off, ``DEEP_EP_DEVICE_TO_HCA_MAPPING`` (GPU i -> mlx5_i), caches on the local SSD.
* generic: nothing a particular cluster provides is assumed: no RDMA resource unless the topology names one
  (``cluster.network.rdma_resource``), GPU feature discovery's ``nvidia.com/gpu.product`` label preferred, not
  required, GDRCopy requested from the NVIDIA container runtime (``NVIDIA_GDRCOPY=enabled``), caches on
  PersistentVolumeClaims ``hf-cache`` / ``jit-cache`` the user creates (listed as prerequisites).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from widep.errors import UserError, did_you_mean


@dataclass(frozen=True)
class Provider:
    """One cluster flavour."""

    name: str
    description: str
    rdma_resource: str | None
    """Extended resource requested once per pod when the role uses RDMA (None: none)."""
    rdma_annotations: tuple[tuple[str, str], ...] = ()
    """Pod annotations that attach the RDMA networks (GKE multi-networking)."""
    rdma_zero_resources: tuple[str, ...] = ()
    """Extended resources requested (and limited) as "0" on pods that use RDMA: GKE A3 Ultra's work-around in
    llm-d's GKE overlay (``networking.gke.io.networks/rdma-N``, llm-d #1730)."""
    rdma_env: tuple[tuple[str, str], ...] = ()
    """HCA / transport variables for pods whose role uses RDMA."""
    gpu_rdma_privileged: bool = False
    """True where DeepEP's GPU-initiated RDMA (NVSHMEM IBGDA) only works in a privileged container."""
    gpu_label: str = "nvidia.com/gpu.product"
    """Node label with the GPU product."""
    gpu_values: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """GPU kind (cluster.gpu) -> accepted label values."""
    gpu_affinity: str = "preferred"
    """'preferred' (schedule elsewhere rather than stay Pending) or 'required'."""
    model_cache: str = "pvc:hf-cache"
    """Default model cache volume (--model-cache syntax). Any cluster: a PersistentVolumeClaim the user creates
    (ReadWriteMany where a group spans nodes; a prerequisite in every file header): a checkpoint of hundreds of GiB
    on a hostPath would land on the node's root disk, outside ephemeral-storage accounting."""
    jit_cache: str = "pvc:jit-cache"
    """Default compile/JIT cache volume (--jit-cache syntax); survives group recreation."""


#: ``nvidia.com/gpu.product`` values (GPU feature discovery: the NVML device name with spaces as dashes).
NFD_PRODUCTS: dict[str, tuple[str, ...]] = {
    "H100": ("NVIDIA-H100-80GB-HBM3",),
    "H800": ("NVIDIA-H800",),
    "H200": ("NVIDIA-H200", "NVIDIA-H200-141GB-HBM3e"),
    "B200": ("NVIDIA-B200",),
    "GB200": ("NVIDIA-GB200",),
}

_GKE_INTERFACES = [{"interfaceName": "eth0", "network": "default"}] + [
    {"interfaceName": f"eth{i + 2}", "network": f"rdma-{i}"} for i in range(8)
]

PROVIDERS: dict[str, Provider] = {
    "generic": Provider(
        name="generic",
        description="any cluster: no RDMA resource unless the topology names one, GPU label preferred",
        rdma_resource=None,
        rdma_env=(("NVIDIA_GDRCOPY", "enabled"),),
        gpu_values=NFD_PRODUCTS,
    ),
    "coreweave": Provider(
        name="coreweave",
        description="CoreWeave (CKS): InfiniBand through rdma/ib, HCAs ibp*, GPU model label required",
        rdma_resource="rdma/ib",
        rdma_env=(("NVIDIA_GDRCOPY", "enabled"), ("NCCL_IB_HCA", "ibp"), ("NVSHMEM_HCA_PREFIX", "ibp")),
        gpu_label="gpu.nvidia.com/model",
        gpu_values={k: (k,) for k in ("H100", "H200", "B200", "GB200")},
        gpu_affinity="required",
        # CoreWeave's nodes carry local NVMe at /mnt/local (llm-d's CoreWeave overlay)
        model_cache="hostpath:/mnt/local/hf-cache",
        jit_cache="hostpath:/mnt/local/jit-cache",
    ),
    "gke": Provider(
        name="gke",
        description="GKE A3 Ultra / A4 (RoCE, GPUDirect RDMA): multi-network annotations, privileged for IBGDA",
        rdma_resource=None,
        rdma_annotations=(
            ("networking.gke.io/default-interface", "eth0"),
            ("networking.gke.io/interfaces", json.dumps(_GKE_INTERFACES, separators=(",", ":"))),
        ),
        rdma_zero_resources=tuple(f"networking.gke.io.networks/rdma-{i}" for i in range(8)),
        rdma_env=(
            ("NVSHMEM_DISABLED_GDRCOPY", "true"),
            ("NCCL_TUNER_PLUGIN", "none"),
            ("NCCL_NET_PLUGIN", "none"),
            ("DEEP_EP_DEVICE_TO_HCA_MAPPING", ",".join(f"{i}:mlx5_{i}:1" for i in range(8))),
        ),
        gpu_rdma_privileged=True,
        gpu_label="cloud.google.com/gke-accelerator",
        gpu_values={
            "H100": ("nvidia-h100-mega-80gb", "nvidia-h100-80gb"),
            "H200": ("nvidia-h200-141gb",),
            "B200": ("nvidia-b200",),
            "GB200": ("nvidia-gb200",),
        },
        gpu_affinity="required",
        model_cache="hostpath:/mnt/stateful_partition/kube-ephemeral-ssd/shared_disk/hf-cache",
        jit_cache="hostpath:/mnt/stateful_partition/kube-ephemeral-ssd/shared_disk/jit-cache",
    ),
}


def provider(name: str) -> Provider:
    """The profile called ``name``; UserError listing the valid ones otherwise."""
    if name not in PROVIDERS:
        raise UserError(
            f"--provider: unknown provider profile. Given: {name!r}. Valid: {', '.join(PROVIDERS)}."
            f"{did_you_mean(name, list(PROVIDERS))}"
        )
    return PROVIDERS[name]
