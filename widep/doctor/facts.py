"""What the doctor knows and asks: requirements, host facts and check results as plain frozen data, and the pure
parsers that turn what a host prints into facts. No I/O here (:mod:`widep.doctor.gather` looks at the host,
:mod:`widep.doctor.checks` judges)."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Literal

from widep.errors import UserError

Status = Literal["pass", "warn", "fail", "skip"]
STATUSES: tuple[Status, ...] = ("pass", "warn", "fail", "skip")
Device = Literal["cuda", "cpu"]

GiB = 1 << 30
MiB = 1 << 20

# Python modules that vLLM imports for a backend choice (vLLM 0.32 source:
# distributed/device_communicators/cuda_communicator.py, utils/import_utils.py,
# distributed/nixl_utils.py). "a|b" means either module satisfies the need.
ALL2ALL_BACKEND_MODULES: dict[str, tuple[str, ...]] = {
    "deepep_high_throughput": ("deep_ep",),
    "deepep_low_latency": ("deep_ep",),
    "deepep_v2": ("deep_ep",),
    "pplx": ("pplx_kernels",),
    "mori_high_throughput": ("mori",),
    "mori_low_latency": ("mori",),
    "nixl_ep": ("nixl_ep",),
    "moonep": ("moonep",),
    "flashinfer_all2allv": ("flashinfer",),
    "flashinfer_nvlink_two_sided": ("flashinfer",),
    "flashinfer_nvlink_one_sided": ("flashinfer",),
}
# vLLM prefers an installed deep_gemm and falls back to the copy vendored in its wheel.
# widep's vLLM plugin (entry point vllm.general_plugins): expert parallelism on vLLM's CPU backend needs it in the
# environment that runs vLLM (widep/vllm_cpu_ep.py).
CPU_EP_PLUGIN_MODULE = "widep.vllm_cpu_ep"
DEEP_GEMM_MODULE = "deep_gemm|vllm.third_party.deep_gemm"
NIXL_CONNECTOR_MODULE = "nixl"
# all2all backends whose kernels run on NVSHMEM (and so read NVSHMEM_* settings).
NVSHMEM_BACKENDS = frozenset({"deepep_high_throughput", "deepep_low_latency", "pplx"})

NVSHMEM_DEFAULT_SYMMETRIC_SIZE = GiB  # NVSHMEM docs: NVSHMEM_SYMMETRIC_SIZE default 1073741824


# --------------------------------------------------------------------------------------------
# Results and requirements
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckResult:
    """One row of the doctor's table."""

    name: str
    """Stable identifier of the check (``gpus``, ``ports``, ``module:deep_ep``...)."""
    status: Status
    """pass, warn (works but is risky), fail (the start would fail), skip (not needed or not visible)."""
    detail: str
    """What the check saw, including what it could not see and why."""
    fix: str = ""
    """What to do when the status is not ``pass``; empty for a pass."""

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "status": self.status, "detail": self.detail, "fix": self.fix}


@dataclass(frozen=True)
class DoctorRequirements:
    """What one node must provide; built from a plan (:func:`requirements_from_plan`) or CLI options.

    Sequences are stored as tuples so the object is immutable and hashable.
    """

    gpus_needed: int = 0
    """GPUs this node's ranks use (at least this many must be present)."""
    gpu_kind: str | None = None
    """GPU model the topology was planned for, e.g. ``H200``; None accepts any."""
    gpu_memory_bytes: int | None = None
    """Memory per GPU the plan budgeted for (from the GPU catalog); a smaller card fails."""
    vllm_version: str | None = None
    """vLLM version the commands were rendered for (``0.32.0``, or ``0.32`` for any patch)."""
    needed_modules: tuple[str, ...] = ()
    """Python modules the chosen backends import; ``a|b`` accepts either."""
    ports: tuple[tuple[str, int], ...] = ()
    """(host, port) pairs this node's ranks will listen on."""
    interfaces: tuple[str, ...] = ()
    """Network interfaces the topology names (NCCL/Gloo/NVSHMEM bootstrap)."""
    rdma: bool = False
    """Whether the backends need RDMA devices (DeepEP internode, NIXL over IB/RoCE)."""
    model_path: str | None = None
    """Local model directory, or a Hugging Face repo id looked up in the hub cache."""
    model_bytes: int | None = None
    """Estimated size of the model's weights on disk."""
    shm_bytes_min: int = GiB
    """Free space /dev/shm must have (NCCL and vLLM's shared-memory broadcast use it)."""
    memlock_unlimited_needed: bool = False
    """Whether the locked-memory limit must be unlimited (RDMA memory registration)."""
    device: Device = "cuda"
    """cuda or cpu: which accelerator the ranks use."""
    nvshmem: bool = False
    """Whether a chosen backend runs on NVSHMEM (DeepEP, pplx)."""
    cpu_ranks: int = 0
    """For CPU runs: cores the ranks on this node bind to (a core per rank unless cluster.cpu_cores shares them)."""
    memory_bytes_min: int | None = None
    """For CPU runs: host memory the ranks need (weights plus KV cache)."""
    source: str = "options"
    """Where these requirements came from, shown in the report."""

    def __post_init__(self) -> None:
        def set_(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        if self.device not in ("cuda", "cpu"):
            raise UserError(f"device: Given: {self.device!r}. Valid: 'cuda' or 'cpu'.")
        for name in ("gpus_needed", "shm_bytes_min", "cpu_ranks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise UserError(f"{name}: Given: {value!r}. Valid: an integer >= 0.")
        for name in ("model_bytes", "memory_bytes_min", "gpu_memory_bytes"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise UserError(f"{name}: Given: {value!r}. Valid: an integer >= 0 (bytes) or None.")
        set_("needed_modules", tuple(dict.fromkeys(str(m) for m in self.needed_modules)))
        set_("interfaces", tuple(dict.fromkeys(str(i) for i in self.interfaces)))
        ports = []
        for item in self.ports:
            host, port = item
            if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
                raise UserError(f"ports: Given: {host}:{port!r}. Valid: a port number 1-65535.")
            ports.append((str(host), port))
        set_("ports", tuple(dict.fromkeys(ports)))


# --------------------------------------------------------------------------------------------
# Host facts (plain data; gathered by gather_host_facts, or constructed in tests)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    uuid: str | None = None
    pci_bus_id: str | None = None
    memory_total_mib: int | None = None
    memory_used_mib: int | None = None
    fabric_state: str | None = None
    """NVSwitch fabric state as nvidia-smi reports it (``Completed``...); None when not reported."""
    fabric_status: str | None = None
    processes: tuple[tuple[int, str, int | None], ...] = ()
    """(pid, name, MiB used) of compute processes on the GPU, as nvidia-smi lists them."""


@dataclass(frozen=True)
class GpuFacts:
    source: str | None
    """``nvidia-smi`` or ``nvml`` (pynvml) when GPUs could be listed, else None."""
    gpus: tuple[GpuInfo, ...] = ()
    driver_version: str | None = None
    cuda_version: str | None = None
    """Highest CUDA version the driver supports."""
    attempts: tuple[str, ...] = ()
    """What was tried and what each attempt said, in order."""
    seconds: float = 0.0

    @property
    def seen(self) -> bool:
        return self.source is not None


@dataclass(frozen=True)
class ModuleFacts:
    name: str
    found: bool
    origin: str | None = None
    version: str | None = None
    distribution: str | None = None
    import_tried: bool = False
    imported: bool = False
    error: str | None = None
    """Why the module could not be located or imported."""


@dataclass(frozen=True)
class PythonFacts:
    requested: str
    """The interpreter asked for (``--python``)."""
    executable: str | None = None
    version: str | None = None
    modules: tuple[ModuleFacts, ...] = ()
    torch_version: str | None = None
    torch_cuda: str | None = None
    """CUDA version torch was built for (``torch/version.py``, read without importing torch)."""
    error: str | None = None
    """Why the interpreter could not be probed (not found, timed out, crashed)."""
    seconds: float = 0.0

    def module(self, name: str) -> ModuleFacts | None:
        return next((m for m in self.modules if m.name == name), None)


@dataclass(frozen=True)
class RdmaPort:
    device: str
    port: int
    state: str | None
    """``ACTIVE``, ``DOWN``, ``INIT``... from /sys/class/infiniband/<dev>/ports/<n>/state."""
    phys_state: str | None = None
    link_layer: str | None = None
    rate: str | None = None


@dataclass(frozen=True)
class RdmaFacts:
    sysfs_present: bool
    """Whether /sys/class/infiniband exists at all (no RDMA driver loaded when False)."""
    ports: tuple[RdmaPort, ...] = ()
    peermem_loaded: bool | None = None
    """Whether the nvidia_peermem kernel module is loaded (GPUDirect RDMA)."""
    gdrcopy_present: bool | None = None
    """Whether /dev/gdrdrv exists (GDRCopy, used by NVSHMEM/UCX)."""
    nvidia_params: tuple[tuple[str, str], ...] | None = None
    """/proc/driver/nvidia/params, None when unreadable (no NVIDIA driver)."""
    error: str | None = None


@dataclass(frozen=True)
class MemlockFacts:
    soft: int | None
    """Soft RLIMIT_MEMLOCK in bytes; None means unlimited."""
    hard: int | None
    error: str | None = None


@dataclass(frozen=True)
class ShmFacts:
    path: str
    total_bytes: int | None = None
    free_bytes: int | None = None
    leftover_files: int = 0
    """Files named like NCCL/PSM/vLLM segments (``nccl-*``, ``psm_*``...) left in /dev/shm."""
    leftover_bytes: int = 0
    error: str | None = None


@dataclass(frozen=True)
class MemoryFacts:
    mem_total_bytes: int | None = None
    mem_available_bytes: int | None = None
    hugepages_total: int | None = None
    hugepages_free: int | None = None
    hugepage_size_bytes: int | None = None
    thp_mode: str | None = None
    """Transparent huge pages mode (the bracketed word in /sys/kernel/mm/transparent_hugepage/enabled)."""
    error: str | None = None


@dataclass(frozen=True)
class PortFacts:
    host: str
    port: int
    free: bool | None
    """True when a listening socket could be bound; None when the test could not run."""
    error: str | None = None


@dataclass(frozen=True)
class InterfaceInfo:
    name: str
    operstate: str | None = None
    """``up``, ``down``, ``unknown``... from /sys/class/net/<name>/operstate."""
    addresses: tuple[str, ...] = ()
    mtu: int | None = None


@dataclass(frozen=True)
class InterfaceFacts:
    interfaces: tuple[InterfaceInfo, ...] = ()
    error: str | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(i.name for i in self.interfaces)

    def get(self, name: str) -> InterfaceInfo | None:
        return next((i for i in self.interfaces if i.name == name), None)


@dataclass(frozen=True)
class DiskFacts:
    target: str
    """The model as the requirements name it."""
    kind: Literal["local", "hub-cache"]
    directory: str
    """The directory that holds (or will hold) the weights."""
    exists: bool
    present_bytes: int = 0
    checked_path: str | None = None
    """The existing path whose filesystem was measured."""
    free_bytes: int | None = None
    error: str | None = None


@dataclass(frozen=True)
class CpuFacts:
    logical_cpus: int | None = None
    usable_cpus: tuple[int, ...] = ()
    """CPUs this process may run on (sched_getaffinity)."""
    physical_cores: int | None = None
    numa_nodes: tuple[tuple[int, str], ...] = ()
    """(node id, cpulist) from /sys/devices/system/node."""
    model_name: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class HostFacts:
    """Everything the checks look at, gathered once. None means "not gathered" (not required)."""

    hostname: str
    gpu: GpuFacts | None = None
    python: PythonFacts | None = None
    rdma: RdmaFacts | None = None
    memlock: MemlockFacts | None = None
    shm: ShmFacts | None = None
    memory: MemoryFacts | None = None
    ports: tuple[PortFacts, ...] = ()
    interfaces: InterfaceFacts | None = None
    disk: DiskFacts | None = None
    cpu: CpuFacts | None = None
    env: tuple[tuple[str, str], ...] = ()
    """Relevant environment variables (NVSHMEM_*, NCCL_*, ...); secret-looking names dropped."""
    gather_seconds: float = 0.0

    def getenv(self, name: str) -> str | None:
        return next((v for k, v in self.env if k == name), None)


# --------------------------------------------------------------------------------------------
# Small parsers (pure)
# --------------------------------------------------------------------------------------------

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "ki": 1 << 10,
    "kib": 1 << 10,
    "kb": 10**3,
    "m": 1 << 20,
    "mi": 1 << 20,
    "mib": 1 << 20,
    "mb": 10**6,
    "g": 1 << 30,
    "gi": 1 << 30,
    "gib": 1 << 30,
    "gb": 10**9,
    "t": 1 << 40,
    "ti": 1 << 40,
    "tib": 1 << 40,
    "tb": 10**12,
}


def parse_size(text: str, *, field_name: str = "size") -> int:
    """``"16G"``, ``"1.5GiB"``, ``"700GB"``, ``"1048576"`` → bytes (K/M/G/T binary, KB/MB/GB decimal)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _SIZE_UNITS:
        raise UserError(
            f"{field_name}: Given: {text!r}. Valid: a number of bytes with an optional unit, "
            "e.g. 1073741824, 16G, 1.5GiB, 700GB."
        )
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


def parse_nvshmem_size(text: str) -> int | None:
    """NVSHMEM's size syntax (its env docs): a number, one optional k/m/g/t suffix, rest ignored."""
    m = re.match(r"\s*(\d+(?:\.\d*)?|\.\d+)([kKmMgGtT]?)", text)
    if not m:
        return None
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(-(-float(m.group(1)) * scale // 1))


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def release_tuple(version: str) -> tuple[int, ...]:
    """Leading numeric release of a version string: ``0.32.0+cpu`` → (0, 32, 0)."""
    m = re.match(r"\s*v?(\d+(?:\.\d+)*)", version)
    return tuple(int(x) for x in m.group(1).split(".")) if m else ()


def gpu_kind_matches(kind: str, gpu_name: str) -> bool:
    """Whether a GPU named ``NVIDIA H100 80GB HBM3`` is of kind ``H100`` (model token match)."""
    name_tokens = set(re.findall(r"[a-z0-9]+", gpu_name.lower()))
    kind_tokens = re.findall(r"[a-z0-9]+", kind.lower())
    return bool(kind_tokens) and kind_tokens[0] in name_tokens


def parse_nvidia_smi_xml(text: str) -> tuple[tuple[GpuInfo, ...], str | None, str | None]:
    """(gpus, driver version, CUDA version) from ``nvidia-smi -q -x`` output."""
    root = ET.fromstring(text)

    def txt(node: ET.Element | None, path: str) -> str | None:
        if node is None:
            return None
        el = node.find(path)
        if el is None or el.text is None:
            return None
        value = el.text.strip()
        return None if value in ("", "N/A") else value

    def mib(value: str | None) -> int | None:
        m = re.match(r"\s*(\d+)\s*MiB", value or "")
        return int(m.group(1)) if m else None

    gpus = []
    for index, gpu in enumerate(root.findall("gpu")):
        procs = []
        for proc in gpu.findall("processes/process_info"):
            pid = txt(proc, "pid")
            if pid and pid.isdigit():
                procs.append((int(pid), txt(proc, "process_name") or "?", mib(txt(proc, "used_memory"))))
        gpus.append(
            GpuInfo(
                index=index,
                name=txt(gpu, "product_name") or "unknown",
                uuid=txt(gpu, "uuid"),
                pci_bus_id=gpu.get("id"),
                memory_total_mib=mib(txt(gpu, "fb_memory_usage/total")),
                memory_used_mib=mib(txt(gpu, "fb_memory_usage/used")),
                fabric_state=txt(gpu, "fabric/state"),
                fabric_status=txt(gpu, "fabric/status"),
                processes=tuple(procs),
            )
        )
    return tuple(gpus), txt(root, "driver_version"), txt(root, "cuda_version")


def parse_nvidia_params(text: str) -> tuple[tuple[str, str], ...]:
    """``/proc/driver/nvidia/params`` lines ``Name: value`` → pairs (quotes stripped)."""
    pairs = []
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            pairs.append((key.strip(), value.strip().strip('"')))
    return tuple(pairs)


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo → {key: value}; ``kB`` values converted to bytes, counts left as they are."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        parts = rest.split()
        if sep and parts and parts[0].isdigit():
            out[key.strip()] = int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
    return out


def parse_port_spec(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[v6]:PORT`` or ``PORT`` (all addresses, 0.0.0.0) → (host, port)."""
    value = text.strip()
    m = re.fullmatch(r"\[([0-9a-fA-F:.%\w]+)\]:(\d+)", value) or re.fullmatch(r"([^:\s]+):(\d+)", value)
    if m:
        host, port_text = m.group(1), m.group(2)
    elif value.isdigit():
        host, port_text = "0.0.0.0", value
    else:
        host, port_text = "", ""
    port = int(port_text) if port_text else 0
    if not port_text or not 0 < port < 65536:
        raise UserError(
            f"--port: Given: {text!r}. Valid: HOST:PORT, [IPv6]:PORT or PORT (1-65535), "
            "e.g. 0.0.0.0:8000 or 127.0.0.1:29550."
        )
    return host, port
