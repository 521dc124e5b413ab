"""Node preflight: gather host facts once, then judge them with pure checks.

Two halves, kept apart on purpose (DESIGN.md: "host facts are gathered explicitly"):

* :func:`gather_host_facts` is the only function here with side effects. It reads ``/sys`` and
  ``/proc``, runs ``nvidia-smi`` (or NVML through ``pynvml``) and the target Python with a
  timeout, and binds the required ports for a moment. Every probe records what it saw *and* why
  it could not see something, so a check can say "nvidia-smi not found: cannot see GPUs"
  instead of "0 GPUs".
* :func:`run_checks` turns :class:`DoctorRequirements` plus :class:`HostFacts` into a list of
  frozen :class:`CheckResult` rows (pass / warn / fail / skip, what was seen, what to do). It is
  a pure function, so every branch is testable with constructed facts.
"""

from __future__ import annotations

import errno
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from widep.errors import UserError, did_you_mean

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
# widep's vLLM plugin (entry point vllm.general_plugins): expert parallelism on vLLM's CPU backend needs it in the
# environment that runs vLLM (widep/vllm_cpu_ep.py).
CPU_EP_PLUGIN_MODULE = "widep.vllm_cpu_ep"
# vLLM prefers an installed deep_gemm and falls back to the copy vendored in its wheel.
DEEP_GEMM_MODULE = "deep_gemm|vllm.third_party.deep_gemm"
NIXL_CONNECTOR_MODULE = "nixl"
# all2all backends whose kernels run on NVSHMEM (and so read NVSHMEM_* settings).
NVSHMEM_BACKENDS = frozenset({"deepep_high_throughput", "deepep_low_latency", "pplx"})

NVSHMEM_DEFAULT_SYMMETRIC_SIZE = GiB  # NVSHMEM docs: NVSHMEM_SYMMETRIC_SIZE default 1073741824
# Environment prefixes recorded in the facts (values with secret-looking names are dropped).
_ENV_PREFIXES = ("NVSHMEM_", "NCCL_", "GLOO_", "UCX_", "VLLM_", "DEEP_EP_", "NVIDIA_", "HF_")
_ENV_NAMES = ("CUDA_VISIBLE_DEVICES", "XDG_CACHE_HOME", "HOME")
_SECRET_HINTS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL")


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
    """For CPU runs: ranks on this node; each needs at least one core of its own."""
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
    "": 1, "b": 1,
    "k": 1 << 10, "ki": 1 << 10, "kib": 1 << 10, "kb": 10**3,
    "m": 1 << 20, "mi": 1 << 20, "mib": 1 << 20, "mb": 10**6,
    "g": 1 << 30, "gi": 1 << 30, "gib": 1 << 30, "gb": 10**9,
    "t": 1 << 40, "ti": 1 << 40, "tib": 1 << 40, "tb": 10**12,
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


def _release(version: str) -> tuple[int, ...]:
    """Leading numeric release of a version string: ``0.32.0+cpu`` → (0, 32, 0)."""
    m = re.match(r"\s*v?(\d+(?:\.\d+)*)", version)
    return tuple(int(x) for x in m.group(1).split(".")) if m else ()


def _truthy(value: str | None) -> bool:
    return value is not None and value.strip().lower() in ("1", "true", "yes", "on", "y", "t")


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


def parse_cpulist(text: str) -> tuple[int, ...]:
    """``0-3,8,10-11`` → (0, 1, 2, 3, 8, 10, 11)."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return tuple(cpus)


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


# --------------------------------------------------------------------------------------------
# Gathering (the only side effects in the doctor)
# --------------------------------------------------------------------------------------------

# Runs inside the target interpreter (any Python >= 3.8): locates (and optionally imports)
# modules, reads versions from package metadata, and torch's build CUDA from torch/version.py
# without importing torch. Prints one line prefixed with the marker; imports may print too.
_PROBE = r'''
import ast, importlib, importlib.util, json, os, sys
from importlib.machinery import PathFinder
names = json.loads(sys.argv[1]); do_import = sys.argv[2] == "1"
MARK = "WIDEP-DOCTOR-PROBE "
def locate(name):
    parts = name.split("."); spec = PathFinder.find_spec(parts[0])
    for i in range(1, len(parts)):
        if spec is None or not spec.submodule_search_locations:
            return None
        spec = PathFinder.find_spec(".".join(parts[: i + 1]), list(spec.submodule_search_locations))
    return spec
def dist_version(name):
    try:
        import importlib.metadata as md
    except ImportError:
        return None, None
    top = name.split(".")[0]
    for cand in (top, top.replace("_", "-")):
        try:
            return cand, md.version(cand)
        except Exception:
            pass
    try:
        for dist in md.packages_distributions().get(top, []):
            return dist, md.version(dist)
    except Exception:
        pass
    return None, None
def read_assignments(path, keys):
    out = {}
    try:
        tree = ast.parse(open(path).read())
    except Exception:
        return out
    for node in tree.body:
        targets = getattr(node, "targets", None) or ([node.target] if getattr(node, "target", None) is not None else [])
        for t in targets:
            if isinstance(t, ast.Name) and t.id in keys and isinstance(getattr(node, "value", None), ast.Constant):
                out[t.id] = node.value.value
    return out
result = {"executable": sys.executable, "version": "%d.%d.%d" % sys.version_info[:3], "modules": []}
for name in names:
    r = {"name": name, "found": False}
    try:
        spec = locate(name)
    except Exception as e:
        spec = None; r["error"] = "%s: %s" % (type(e).__name__, e)
    if spec is not None:
        r["found"] = True
        locs = list(spec.submodule_search_locations or [])
        r["origin"] = spec.origin if spec.origin not in (None, "namespace") else (locs[0] if locs else None)
        r["distribution"], r["version"] = dist_version(name)
        if r["version"] is None and locs:
            v = read_assignments(os.path.join(locs[0], "_version.py"), ("__version__", "version"))
            r["version"] = v.get("__version__") or v.get("version")
        if do_import:
            r["import_tried"] = True
            saved = sys.stdout
            sys.stdout = sys.stderr
            try:
                mod = importlib.import_module(name)
                r["imported"] = True
                v = getattr(mod, "__version__", None)
                if isinstance(v, str):
                    r["version"] = v
            except BaseException as e:
                r["error"] = "%s: %s" % (type(e).__name__, str(e)[:500])
            finally:
                sys.stdout = saved
    result["modules"].append(r)
torch_spec = None
try:
    torch_spec = locate("torch")
except Exception:
    pass
if torch_spec is not None and torch_spec.submodule_search_locations:
    v = read_assignments(os.path.join(list(torch_spec.submodule_search_locations)[0], "version.py"), ("__version__", "cuda"))
    result["torch_version"] = v.get("__version__"); result["torch_cuda"] = v.get("cuda")
sys.stdout.write("\n" + MARK + json.dumps(result) + "\n"); sys.stdout.flush()
'''
_PROBE_MARK = "WIDEP-DOCTOR-PROBE "


def _module_names(req: DoctorRequirements) -> list[str]:
    names = ["vllm"]
    for need in req.needed_modules:
        for alt in need.split("|"):
            if alt and alt not in names:
                names.append(alt)
    return names


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _relevant_env(env: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    keep = []
    for key in sorted(env):
        if not (key.startswith(_ENV_PREFIXES) or key in _ENV_NAMES):
            continue
        if any(h in key.upper() for h in _SECRET_HINTS):
            continue
        keep.append((key, env[key]))
    return tuple(keep)


def _start(argv: list[str], env: Mapping[str, str]) -> subprocess.Popen[str] | str:
    try:
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=dict(env), start_new_session=True,
        )
    except OSError as err:
        return f"{argv[0]} could not be started: {err.strerror or err}"


def _finish(proc: subprocess.Popen[str], timeout_s: float) -> tuple[int | None, str, str]:
    """(returncode or None on timeout, stdout, stderr); a timed-out process is killed."""
    try:
        out, err = proc.communicate(timeout=timeout_s)
        return proc.returncode, out, err
    except subprocess.TimeoutExpired:
        # The probe runs in its own session: kill the whole group, so a child holding the pipes
        # (a wrapper script's `sleep`, a hung driver call) cannot keep us waiting.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            proc.kill()
        try:
            out, err = proc.communicate(timeout=2.0)
        except subprocess.TimeoutExpired:
            out, err = "", ""
        return None, out or "", err or ""


def _nvml_facts() -> tuple[GpuFacts | None, str]:
    """GPU facts through pynvml, or (None, why not)."""
    try:
        import pynvml  # type: ignore[import-not-found]
    except Exception as err:  # ImportError, or a broken install
        return None, f"pynvml not importable ({type(err).__name__})"
    try:
        pynvml.nvmlInit()
    except Exception as err:
        return None, f"NVML did not initialise: {err}"
    try:
        def s(v: object) -> str:
            return v.decode() if isinstance(v, bytes) else str(v)

        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            gpus.append(
                GpuInfo(
                    index=i,
                    name=s(pynvml.nvmlDeviceGetName(h)),
                    uuid=s(pynvml.nvmlDeviceGetUUID(h)),
                    pci_bus_id=s(pynvml.nvmlDeviceGetPciInfo(h).busId),
                    memory_total_mib=int(mem.total) // MiB,
                    memory_used_mib=int(mem.used) // MiB,
                )
            )
        cuda = pynvml.nvmlSystemGetCudaDriverVersion()
        return (
            GpuFacts(
                source="nvml",
                gpus=tuple(gpus),
                driver_version=s(pynvml.nvmlSystemGetDriverVersion()),
                cuda_version=f"{cuda // 1000}.{cuda % 1000 // 10}",
            ),
            "pynvml: ok",
        )
    except Exception as err:
        return None, f"NVML query failed: {err}"
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def _gpu_from_smi(
    started: subprocess.Popen[str] | str | None, nvidia_smi: str, timeout_s: float
) -> tuple[GpuFacts | None, str]:
    if started is None:
        return None, f"{nvidia_smi} not found on PATH"
    if isinstance(started, str):
        return None, started
    rc, out, err = _finish(started, timeout_s)
    if rc is None:
        return None, (
            f"{nvidia_smi} did not answer within {timeout_s:g} s (a hung driver or a GPU that "
            "fell off the bus makes it hang)"
        )
    if rc != 0:
        msg = (err.strip() or out.strip()).splitlines()
        return None, f"{nvidia_smi} exited {rc}: {msg[-1] if msg else 'no output'}"
    try:
        gpus, driver, cuda = parse_nvidia_smi_xml(out)
    except ET.ParseError as parse_err:
        return None, f"{nvidia_smi} -q -x output could not be parsed: {parse_err}"
    return GpuFacts(source="nvidia-smi", gpus=gpus, driver_version=driver, cuda_version=cuda), (
        f"{nvidia_smi}: ok"
    )


def _python_from_probe(
    requested: str, started: subprocess.Popen[str] | str | None, timeout_s: float
) -> PythonFacts:
    if started is None:
        return PythonFacts(requested=requested, error=f"{requested} not found (not a file, not on PATH)")
    if isinstance(started, str):
        return PythonFacts(requested=requested, error=started)
    rc, out, err = _finish(started, timeout_s)
    if rc is None:
        return PythonFacts(requested=requested, error=f"{requested} did not finish within {timeout_s:g} s")
    line = next((ln for ln in reversed(out.splitlines()) if ln.startswith(_PROBE_MARK)), None)
    if line is None:
        tail = (err.strip() or out.strip()).splitlines()
        return PythonFacts(
            requested=requested,
            error=f"{requested} exited {rc} without a result: {tail[-1] if tail else 'no output'}",
        )
    data = json.loads(line[len(_PROBE_MARK):])
    modules = tuple(
        ModuleFacts(
            name=m["name"],
            found=bool(m.get("found")),
            origin=m.get("origin"),
            version=m.get("version"),
            distribution=m.get("distribution"),
            import_tried=bool(m.get("import_tried")),
            imported=bool(m.get("imported")),
            error=m.get("error"),
        )
        for m in data["modules"]
    )
    return PythonFacts(
        requested=requested,
        executable=data.get("executable"),
        version=data.get("version"),
        modules=modules,
        torch_version=data.get("torch_version"),
        torch_cuda=data.get("torch_cuda"),
    )


def _gather_rdma(sys_root: Path, proc_root: Path, dev_root: Path) -> RdmaFacts:
    params_text = _read(proc_root / "driver/nvidia/params")
    params = parse_nvidia_params(params_text) if params_text is not None else None
    peermem = (sys_root / "module/nvidia_peermem").exists()
    gdrcopy = (dev_root / "gdrdrv").exists()
    ib = sys_root / "class/infiniband"
    if not ib.is_dir():
        return RdmaFacts(False, (), peermem, gdrcopy, params)
    ports = []
    try:
        for dev in sorted(ib.iterdir()):
            port_dir = dev / "ports"
            for port in sorted(port_dir.iterdir(), key=lambda p: int(p.name) if p.name.isdigit() else 0):
                def field_(name: str, port: Path = port) -> str | None:
                    text = _read(port / name)
                    if text is None:
                        return None
                    value = text.strip()
                    # "4: ACTIVE" / "5: LinkUp": keep the word
                    return value.split(":", 1)[1].strip() if re.match(r"\d+:", value) else value

                ports.append(
                    RdmaPort(
                        device=dev.name,
                        port=int(port.name) if port.name.isdigit() else 0,
                        state=field_("state"),
                        phys_state=field_("phys_state"),
                        link_layer=field_("link_layer"),
                        rate=field_("rate"),
                    )
                )
    except OSError as err:
        return RdmaFacts(True, tuple(ports), peermem, gdrcopy, params, error=f"{ib}: {err}")
    return RdmaFacts(True, tuple(ports), peermem, gdrcopy, params)


_SHM_LEFTOVER = re.compile(r"^(nccl-|psm_|vllm|torch_|sem\.mp-|cuda\.shm)")


def _gather_shm(path: str) -> ShmFacts:
    try:
        st = os.statvfs(path)
    except OSError as err:
        return ShmFacts(path=path, error=f"{path}: {err.strerror or err}")
    count = size = 0
    try:
        with os.scandir(path) as it:
            for entry in it:
                if entry.is_file(follow_symlinks=False) and _SHM_LEFTOVER.match(entry.name):
                    count += 1
                    size += entry.stat(follow_symlinks=False).st_blocks * 512
    except OSError:
        pass  # unreadable listing: free space is what matters
    return ShmFacts(
        path=path,
        total_bytes=st.f_blocks * st.f_frsize,
        free_bytes=st.f_bavail * st.f_frsize,
        leftover_files=count,
        leftover_bytes=size,
    )


def _gather_memory(sys_root: Path, proc_root: Path) -> MemoryFacts:
    text = _read(proc_root / "meminfo")
    if text is None:
        return MemoryFacts(error=f"{proc_root / 'meminfo'} unreadable")
    info = parse_meminfo(text)
    thp_text = _read(sys_root / "kernel/mm/transparent_hugepage/enabled")
    thp = None
    if thp_text:
        m = re.search(r"\[(\w+)\]", thp_text)
        thp = m.group(1) if m else thp_text.strip()
    return MemoryFacts(
        mem_total_bytes=info.get("MemTotal"),
        mem_available_bytes=info.get("MemAvailable"),
        hugepages_total=info.get("HugePages_Total"),
        hugepages_free=info.get("HugePages_Free"),
        hugepage_size_bytes=info.get("Hugepagesize"),
        thp_mode=thp,
    )


def _probe_port(host: str, port: int) -> PortFacts:
    """Bind and listen like a server would (SO_REUSEADDR, as uvicorn sets it), then close."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        return PortFacts(host, port, None, f"cannot resolve {host!r}: {err.strerror}")
    family, socktype, proto, _, addr = infos[0]
    sock = socket.socket(family, socktype, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(1)
        return PortFacts(host, port, True)
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            return PortFacts(host, port, False, "address already in use")
        if err.errno == errno.EADDRNOTAVAIL:
            return PortFacts(host, port, None, f"{host} is not an address of this host")
        if err.errno == errno.EACCES:
            return PortFacts(host, port, None, "permission denied (ports below 1024 need privileges)")
        return PortFacts(host, port, None, f"{err.strerror or err}")
    finally:
        sock.close()


def _ipv4_addresses(name: str) -> tuple[str, ...]:
    import fcntl
    import struct

    siocgifaddr = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), siocgifaddr, struct.pack("256s", name.encode()[:15]))
        except OSError:
            return ()
    return (socket.inet_ntoa(packed[20:24]),)


def _gather_interfaces(sys_root: Path, proc_root: Path) -> InterfaceFacts:
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError as err:
        return InterfaceFacts(error=f"socket.if_nameindex failed: {err}")
    v6: dict[str, list[str]] = {}
    for line in (_read(proc_root / "net/if_inet6") or "").splitlines():
        parts = line.split()
        if len(parts) == 6:
            raw = parts[0]
            addr = socket.inet_ntop(socket.AF_INET6, bytes.fromhex(raw))
            v6.setdefault(parts[5], []).append(addr)
    infos = []
    for name in names:
        net = sys_root / "class/net" / name
        oper = _read(net / "operstate")
        mtu = _read(net / "mtu")
        infos.append(
            InterfaceInfo(
                name=name,
                operstate=oper.strip() if oper else None,
                addresses=_ipv4_addresses(name) + tuple(v6.get(name, ())),
                mtu=int(mtu) if mtu and mtu.strip().isdigit() else None,
            )
        )
    return InterfaceFacts(tuple(infos))


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_cache_dir(env: Mapping[str, str]) -> Path:
    """Hugging Face hub cache: HF_HUB_CACHE, else HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub."""
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    base = env.get("XDG_CACHE_HOME") or os.path.join(env.get("HOME") or os.path.expanduser("~"), ".cache")
    return Path(base).expanduser() / "huggingface" / "hub"


def _tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            try:
                st = os.stat(os.path.join(dirpath, f), follow_symlinks=False)
            except OSError:
                continue
            if not os.path.islink(os.path.join(dirpath, f)):
                total += st.st_size
    return total


def _gather_disk(model: str, env: Mapping[str, str]) -> DiskFacts:
    local = Path(model).expanduser()
    if local.exists() or not _REPO_ID.match(model):
        kind: Literal["local", "hub-cache"] = "local"
        directory = local
    else:
        kind = "hub-cache"
        directory = hub_cache_dir(env) / ("models--" + model.replace("/", "--"))
    exists = directory.exists()
    present = 0
    if exists:
        present = _tree_bytes(directory / "blobs" if kind == "hub-cache" else directory)
    checked = directory
    while not checked.exists() and checked != checked.parent:
        checked = checked.parent
    try:
        free = shutil.disk_usage(checked).free
        error = None
    except OSError as err:
        free, error = None, f"{checked}: {err.strerror or err}"
    return DiskFacts(model, kind, str(directory), exists, present, str(checked), free, error)


def _gather_cpu(sys_root: Path, proc_root: Path) -> CpuFacts:
    try:
        usable = tuple(sorted(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        usable = ()
    cores = set()
    cpu_dir = sys_root / "devices/system/cpu"
    for cpu in usable:
        topo = cpu_dir / f"cpu{cpu}" / "topology"
        pkg, core = _read(topo / "physical_package_id"), _read(topo / "core_id")
        if pkg is not None and core is not None:
            cores.add((pkg.strip(), core.strip()))
    nodes = []
    node_dir = sys_root / "devices/system/node"
    if node_dir.is_dir():
        for node in sorted(node_dir.glob("node[0-9]*"), key=lambda p: int(p.name[4:])):
            cpulist = _read(node / "cpulist")
            if cpulist is not None:
                nodes.append((int(node.name[4:]), cpulist.strip()))
    model = None
    for line in (_read(proc_root / "cpuinfo") or "").splitlines():
        if line.startswith("model name"):
            model = line.partition(":")[2].strip()
            break
    return CpuFacts(
        logical_cpus=os.cpu_count(),
        usable_cpus=usable,
        physical_cores=len(cores) or None,
        numa_nodes=tuple(nodes),
        model_name=model,
    )


def gather_host_facts(
    req: DoctorRequirements,
    *,
    python: str | None = None,
    import_modules: bool = False,
    nvidia_smi: str = "nvidia-smi",
    timeout_s: float = 10.0,
    import_timeout_s: float = 300.0,
    env: Mapping[str, str] | None = None,
    sys_root: str = "/sys",
    proc_root: str = "/proc",
    dev_root: str = "/dev",
    shm_path: str = "/dev/shm",
) -> HostFacts:
    """Look at this host once: the only function of the doctor with side effects.

    ``python`` is the interpreter the ranks will run (default: this one); its modules are located
    without importing them unless ``import_modules`` (importing vLLM takes seconds). ``nvidia-smi``
    and the interpreter run concurrently, each under its timeout, with ``env`` (default: this
    process's environment) as their environment. Ports in ``req.ports`` are bound
    and released; nothing else is changed. The roots are parameters so that a test can point a
    probe at a directory it built, but the defaults are the real system.
    """
    t0 = time.perf_counter()
    env = dict(os.environ if env is None else env)
    sysp, procp, devp = Path(sys_root), Path(proc_root), Path(dev_root)
    python_req = python or sys.executable

    # Start the two slow probes first; they run while the rest is read.
    smi_path = shutil.which(nvidia_smi, path=env.get("PATH"))
    t_smi = time.perf_counter()
    smi = _start([smi_path, "-q", "-x"], env) if smi_path else None
    py_path = python_req if os.sep in python_req else shutil.which(python_req, path=env.get("PATH"))
    if py_path and not os.path.exists(py_path):
        py_path = None
    t_py = time.perf_counter()
    probe = (
        _start([py_path, "-c", _PROBE, json.dumps(_module_names(req)), "1" if import_modules else "0"], env)
        if py_path
        else None
    )

    rdma = _gather_rdma(sysp, procp, devp)
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        inf = resource.RLIM_INFINITY
        memlock = MemlockFacts(None if soft == inf else soft, None if hard == inf else hard)
    except (OSError, ValueError) as err:
        memlock = MemlockFacts(None, None, error=f"getrlimit(RLIMIT_MEMLOCK) failed: {err}")
    shm = _gather_shm(shm_path)
    memory = _gather_memory(sysp, procp)
    ports = tuple(_probe_port(h, p) for h, p in req.ports)
    interfaces = _gather_interfaces(sysp, procp)
    disk = _gather_disk(req.model_path, env) if req.model_path else None
    cpu = _gather_cpu(sysp, procp)

    gpu, smi_note = _gpu_from_smi(smi, nvidia_smi, timeout_s)
    smi_seconds = time.perf_counter() - t_smi
    attempts = [smi_note]
    if gpu is None:
        gpu, nvml_note = _nvml_facts()
        attempts.append(nvml_note)
    if gpu is None:
        gpu = GpuFacts(source=None)
    gpu = GpuFacts(
        gpu.source, gpu.gpus, gpu.driver_version, gpu.cuda_version, tuple(attempts), round(smi_seconds, 3)
    )
    py = _python_from_probe(python_req, probe, import_timeout_s if import_modules else timeout_s)
    py = PythonFacts(
        py.requested, py.executable, py.version, py.modules, py.torch_version, py.torch_cuda, py.error,
        round(time.perf_counter() - t_py, 3),
    )
    return HostFacts(
        hostname=socket.gethostname(),
        gpu=gpu,
        python=py,
        rdma=rdma,
        memlock=memlock,
        shm=shm,
        memory=memory,
        ports=ports,
        interfaces=interfaces,
        disk=disk,
        cpu=cpu,
        env=_relevant_env(env),
        gather_seconds=round(time.perf_counter() - t0, 3),
    )


# --------------------------------------------------------------------------------------------
# Checks (pure functions of requirements and facts)
# --------------------------------------------------------------------------------------------


def _r(name: str, status: Status, detail: str, fix: str = "") -> CheckResult:
    return CheckResult(name, status, detail, "" if status == "pass" else fix)


def _cannot_see_gpus(gpu: GpuFacts) -> str:
    return "; ".join(gpu.attempts) + ": cannot see GPUs" if gpu.attempts else "GPU facts not gathered"


def _visible_indices(cvd: str | None, gpus: Sequence[GpuInfo]) -> list[GpuInfo] | None:
    """GPUs left by CUDA_VISIBLE_DEVICES (indices or UUID prefixes), None when it is unset."""
    if cvd is None:
        return None
    chosen = []
    for token in [t.strip() for t in cvd.split(",") if t.strip()]:
        if token.isdigit():
            match = next((g for g in gpus if g.index == int(token)), None)
        else:
            match = next((g for g in gpus if g.uuid and g.uuid.startswith(token)), None)
        if match is None:
            break  # CUDA stops at the first invalid entry
        chosen.append(match)
    return chosen


def check_gpus(req: DoctorRequirements, facts: HostFacts) -> CheckResult:
    gpu = facts.gpu
    if req.device == "cpu":
        seen = f"{len(gpu.gpus)} GPU(s) seen" if gpu and gpu.seen else (_cannot_see_gpus(gpu) if gpu else "not looked at")
        return _r("gpus", "skip", f"CPU topology: no GPUs needed ({seen})")
    if gpu is None or not gpu.seen:
        detail = _cannot_see_gpus(gpu) if gpu else "GPU facts not gathered"
        if req.gpus_needed == 0:
            return _r("gpus", "skip", f"{detail} (no GPU count required)",
                      "Give --gpus N or a topology to require GPUs.")
        return _r(
            "gpus", "fail", f"{detail}; {req.gpus_needed} needed",
            "Install the NVIDIA driver (nvidia-smi comes with it), or in a container run with the GPUs "
            "exposed (--gpus all / the NVIDIA container toolkit); check `nvidia-smi` by hand.",
        )
    names = sorted({g.name for g in gpu.gpus})
    count = len(gpu.gpus)
    seen = f"{count} GPU(s): {', '.join(names) or 'none'} (via {gpu.source})"
    problems: list[str] = []
    fixes: list[str] = []
    if count < req.gpus_needed:
        problems.append(f"{req.gpus_needed} needed")
        fixes.append("Run on a node with enough GPUs or lower gpus_per_node in the topology.")
    if req.gpu_memory_bytes:
        small = [g for g in gpu.gpus if g.memory_total_mib is not None
                 and g.memory_total_mib * MiB < req.gpu_memory_bytes * 0.98]
        if small:
            problems.append(f"the plan budgets {fmt_bytes(req.gpu_memory_bytes)} per GPU, GPU {small[0].index} "
                            f"has {fmt_bytes(small[0].memory_total_mib * MiB)}")
            fixes.append("Re-plan for this card (cluster.gpu) so weights and KV cache fit its memory.")
    if req.gpu_kind:
        wrong = sorted({g.name for g in gpu.gpus if not gpu_kind_matches(req.gpu_kind, g.name)})
        if wrong:
            problems.append(f"topology is planned for {req.gpu_kind}, found {', '.join(wrong)}")
            fixes.append(f"Set cluster.gpu to this node's GPU kind, or run on {req.gpu_kind} nodes "
                         "(memory and KV budgets were planned for that card).")
    if problems:
        return _r("gpus", "fail", f"{seen}; " + "; ".join(problems), " ".join(fixes))
    cvd = facts.getenv("CUDA_VISIBLE_DEVICES")
    visible = _visible_indices(cvd, gpu.gpus)
    if visible is not None and len(visible) < req.gpus_needed:
        return _r(
            "gpus", "warn",
            f"{seen}; CUDA_VISIBLE_DEVICES={cvd!r} in this shell leaves {len(visible)} of "
            f"{req.gpus_needed} needed",
            "Unset CUDA_VISIBLE_DEVICES before launching (widep assigns GPUs per rank), or widen it.",
        )
    need = f"{req.gpus_needed} needed" if req.gpus_needed else "no count required"
    return _r("gpus", "pass", f"{seen}; {need}")


def check_gpu_memory(req: DoctorRequirements, facts: HostFacts) -> CheckResult:
    gpu = facts.gpu
    if req.device == "cpu":
        return _r("gpu-memory", "skip", "CPU topology")
    if gpu is None or not gpu.seen:
        return _r("gpu-memory", "skip", "GPUs not visible: cannot see their memory (see the gpus row)")
    # 1 GiB: NVML's v1 "used" counts driver-reserved memory (480 MiB on an idle H100, seen).
    busy = [g for g in gpu.gpus if g.memory_used_mib is not None and g.memory_used_mib >= 1024]
    unknown = [g for g in gpu.gpus if g.memory_used_mib is None]
    if busy:
        def who(g: GpuInfo) -> str:
            procs = ", ".join(f"pid {pid} {name}" + (f" {mib} MiB" if mib is not None else "")
                              for pid, name, mib in g.processes[:3])
            return f" by {procs}" if procs else ""

        listed = ", ".join(f"GPU {g.index}: {g.memory_used_mib} of {g.memory_total_mib} MiB used{who(g)}"
                           for g in busy)
        return _r(
            "gpu-memory", "warn",
            f"{listed}: another process holds GPU memory, so --gpu-memory-utilization may not fit",
            "Find the holders with `nvidia-smi --query-compute-apps=pid,used_memory --format=csv` and stop "
            "them (an old rank that did not exit is the usual one).",
        )
    if unknown and len(unknown) == len(gpu.gpus):
        return _r("gpu-memory", "skip", f"{gpu.source} did not report memory use")
    return _r("gpu-memory", "pass", f"all {len(gpu.gpus)} GPU(s) have < 1 GiB in use")


def check_driver(req: DoctorRequirements, facts: HostFacts) -> CheckResult:
    gpu = facts.gpu
    if req.device == "cpu":
        return _r("driver", "skip", "CPU topology: no NVIDIA driver needed")
    if gpu is None or not gpu.seen:
        status: Status = "fail" if req.gpus_needed else "skip"
        return _r("driver", status, (_cannot_see_gpus(gpu) if gpu else "not gathered")
                  + ": cannot read driver or CUDA versions",
                  "Install the NVIDIA driver and make nvidia-smi work on this node.")
    detail = f"driver {gpu.driver_version or 'unknown'}, CUDA {gpu.cuda_version or 'unknown'} (via {gpu.source})"
    fabric_bad = [g for g in gpu.gpus if g.fabric_state is not None
                  and (g.fabric_state != "Completed" or (g.fabric_status not in (None, "Success")))]
    if fabric_bad:
        listed = ", ".join(f"GPU {g.index}: {g.fabric_state}/{g.fabric_status}" for g in fabric_bad)
        return _r(
            "driver", "fail", f"{detail}; NVSwitch fabric not ready ({listed})",
            "Start the fabric manager (`systemctl start nvidia-fabricmanager`, same version as the driver); "
            "CUDA fails with 'system not yet initialized' until it is ready.",
        )
    fabric = [g.fabric_state for g in gpu.gpus if g.fabric_state]
    if fabric:
        detail += f"; NVSwitch fabric {fabric[0]} on {len(fabric)} GPU(s)"
    if gpu.driver_version is None or gpu.cuda_version is None:
        return _r("driver", "warn", detail, "Check `nvidia-smi` by hand: it did not report every version.")
    return _r("driver", "pass", detail)


def check_torch_cuda(req: DoctorRequirements, facts: HostFacts) -> CheckResult:
    py, gpu = facts.python, facts.gpu
    if req.device == "cpu":
        return _r("torch-cuda", "skip", "CPU topology")
    if py is None or py.error:
        return _r("torch-cuda", "skip", "python not probed: cannot see torch (see the python row)")
    if py.torch_version is None:
        return _r("torch-cuda", "fail", f"torch not found in {py.executable}",
                  "Install vLLM (it brings its torch) into that environment, or point --python at the right one.")
    if py.torch_cuda is None:
        return _r("torch-cuda", "fail", f"torch {py.torch_version} in {py.executable} is a CPU-only build",
                  "Install a CUDA build of torch / vLLM in that environment.")
    detail = f"torch {py.torch_version} built for CUDA {py.torch_cuda}"
    if gpu is None or not gpu.seen or not gpu.cuda_version:
        return _r("torch-cuda", "skip", f"{detail}; driver CUDA version unknown: cannot compare")
    built, driver = _release(py.torch_cuda), _release(gpu.cuda_version)
    detail += f"; driver supports CUDA {gpu.cuda_version}"
    if built[:1] > driver[:1]:
        return _r("torch-cuda", "fail", detail,
                  f"Upgrade the driver to one supporting CUDA {py.torch_cuda}, or install a torch/vLLM "
                  f"build for CUDA {gpu.cuda_version.split('.')[0]}.x.")
    if built[:2] > driver[:2]:
        return _r("torch-cuda", "warn", f"{detail}: runs under minor-version compatibility; "
                  "kernels needing a newer driver (PTX JIT) can fail",
                  f"Upgrade the driver to CUDA >= {py.torch_cuda}, or use a build for CUDA {gpu.cuda_version}.")
    return _r("torch-cuda", "pass", detail)


def check_python(req: DoctorRequirements, facts: HostFacts) -> CheckResult:
    py = facts.python
    if py is None:
        return _r("python", "skip", "not probed")
    if py.error:
        return _r("python", "fail", py.error,
                  "Point --python (or the topology's vllm.python) at the interpreter of the vLLM environment.")
    how = "modules imported" if any(m.import_tried for m in py.modules) else \
        "modules located, not imported (--import imports them)"
    return _r("python", "pass", f"{py.executable} (Python {py.version}) answered in {py.seconds:.2f} s; {how}")


def check_vllm(req: DoctorRequirements, facts: HostFacts) -> CheckResult:
    py = facts.python
    if py is None or py.error:
        return _r("vllm", "fail", "python could not be probed: cannot see vLLM (see the python row)",
                  "Fix the python row first.")
    m = py.module("vllm")
    if m is None or not m.found:
        why = f" ({m.error})" if m and m.error else ""
        want = f"=={req.vllm_version}" if req.vllm_version else ""
        return _r("vllm", "fail", f"vllm not found in {py.executable}{why}",
                  f"pip install 'vllm{want}' in that environment, or point --python at the one that has it.")
    where = f"{m.version or 'unknown version'}"
    if m.distribution and m.distribution != "vllm":
        where += f" (distribution {m.distribution})"
    where += f" at {m.origin}"
    if m.import_tried and not m.imported:
        return _r("vllm", "fail", f"vllm {where} failed to import: {m.error}",
                  "Reinstall vLLM in that environment; the error above names the missing piece.")
    seen = "imported" if m.imported else "located"
    if req.vllm_version is None:
        return _r("vllm", "pass", f"vllm {where} {seen}; no version required")
    if m.version is None:
        return _r("vllm", "warn", f"vllm {where} {seen}; its version is unknown, topology wants {req.vllm_version}",
                  "Check `python -c 'import vllm; print(vllm.__version__)'` by hand.")
    have, want = _release(m.version), _release(req.vllm_version)
    if have[: len(want)] == want:
        return _r("vllm", "pass", f"vllm {where} {seen}; topology wants {req.vllm_version}")
    if have[:2] == want[:2]:
        return _r("vllm", "warn", f"vllm {where} {seen}; topology was rendered for {req.vllm_version} "
                  "(same minor release)",
                  f"Set vllm.version: {m.version} in the topology, or install vllm=={req.vllm_version}.")
    return _r("vllm", "fail", f"vllm {where} {seen}; topology was rendered for {req.vllm_version}: flags and "
              "environment variables differ between releases",
              f"Set vllm.version: {'.'.join(map(str, have[:3]))} in the topology and re-render, or install "
              f"vllm=={req.vllm_version}.")


def check_modules(req: DoctorRequirements, facts: HostFacts) -> list[CheckResult]:
    py = facts.python
    out = []
    for need in req.needed_modules:
        alts = [a for a in need.split("|") if a]
        name = f"module:{need}"
        if py is None or py.error:
            out.append(_r(name, "fail", f"python could not be probed: cannot see {need}", "Fix the python row first."))
            continue
        seen = [py.module(a) for a in alts]
        ok = next((m for m in seen if m and m.found and (m.imported or not m.import_tried)), None)
        if ok is not None:
            how = "imported" if ok.imported else "located (not imported)"
            version = f" {ok.version}" if ok.version else ""
            alt = f" (for {need})" if len(alts) > 1 else ""
            out.append(_r(name, "pass", f"{ok.name}{version} {how} at {ok.origin}{alt}"))
            continue
        broken = next((m for m in seen if m and m.found), None)
        if broken is not None:
            out.append(_r(name, "fail", f"{broken.name} found at {broken.origin} but failed to import: {broken.error}",
                          f"Rebuild {broken.name} against this torch/CUDA (vLLM's tools/ep_kernels scripts build "
                          "DeepEP and friends)."))
            continue
        if alts[0] == CPU_EP_PLUGIN_MODULE:
            out.append(_r(name, "fail", f"widep's vLLM plugin ({alts[0]}) not found in {py.executable}: vLLM 0.32 "
                          "cannot answer on an expert-parallel group on CPU without it",
                          "pip install widep into that environment (vLLM loads the plugin from its entry point)."))
            continue
        out.append(_r(name, "fail", f"{' or '.join(alts)} not found in {py.executable}",
                      f"Install {alts[0]} into that environment (the chosen backend imports it); vLLM's "
                      "tools/ep_kernels/ has install scripts for the EP kernels."))
    return out


def check_nvshmem(req: DoctorRequirements, facts: HostFacts) -> CheckResult:
    env = {k: v for k, v in facts.env if k.startswith("NVSHMEM_")}
    shown = ", ".join(f"{k}={v}" for k, v in sorted(env.items())) or "no NVSHMEM_* variables set"
    if not req.nvshmem:
        return _r("nvshmem", "skip", f"no NVSHMEM backend chosen ({shown})")
    size_text = env.get("NVSHMEM_SYMMETRIC_SIZE")
    if size_text is not None:
        size = parse_nvshmem_size(size_text)
        if size is None:
            return _r("nvshmem", "fail", f"NVSHMEM_SYMMETRIC_SIZE={size_text!r} is not a size ({shown})",
                      "Use NVSHMEM's size syntax, e.g. NVSHMEM_SYMMETRIC_SIZE=16G.")
    transport = env.get("NVSHMEM_REMOTE_TRANSPORT")
    if transport is not None and transport.lower() not in ("ibrc", "ucx", "libfabric", "ibdevx", "ibgda", "none"):
        return _r("nvshmem", "fail", f"NVSHMEM_REMOTE_TRANSPORT={transport!r} is not a transport ({shown})",
                  "Valid: ibrc, ucx, libfabric, ibdevx, ibgda, none (llm-d uses ibgda).")
    if size_text is None:
        return _r("nvshmem", "warn",
                  f"NVSHMEM_SYMMETRIC_SIZE unset: NVSHMEM's default heap is "
                  f"{fmt_bytes(NVSHMEM_DEFAULT_SYMMETRIC_SIZE)} per GPU ({shown})",
                  "llm-d's decode manifests set NVSHMEM_SYMMETRIC_SIZE=16G to prevent NVSHMEM OOM; set it in "
                  "the topology's env if DeepEP buffers fail to allocate.")
    return _r("nvshmem", "pass", shown)


def _param(params: Iterable[tuple[str, str]] | None, key: str) -> str | None:
    return next((v for k, v in params or () if k == key), None)


def check_ibgda(req: DoctorRequirements, facts: HostFacts) -> CheckResult:
    """GPU-initiated RDMA (IBGDA) needs NVIDIA driver options on the host."""
    if not (req.nvshmem and req.rdma):
        return _r("ibgda", "skip", "no NVSHMEM backend over RDMA chosen")
    rdma = facts.rdma
    if rdma is None or rdma.nvidia_params is None:
        return _r("ibgda", "skip", "/proc/driver/nvidia/params unreadable (no NVIDIA driver loaded): "
                  "cannot see the IBGDA driver options")
    stream = _param(rdma.nvidia_params, "EnableStreamMemOPs")
    dwords = _param(rdma.nvidia_params, "RegistryDwords") or ""
    detail = f"EnableStreamMemOPs={stream}, RegistryDwords={dwords!r}"
    if stream != "1" or "PeerMappingOverride=1" not in dwords.replace(" ", ""):
        return _r("ibgda", "warn", f"{detail}: IBGDA driver options not set",
                  "As vLLM's tools/ep_kernels/configure_system_drivers.sh does: add `options nvidia "
                  "NVreg_EnableStreamMemOPs=1 NVreg_RegistryDwords=\"PeerMappingOverride=1;\"` to "
                  "/etc/modprobe.d/nvidia.conf, update-initramfs -u, reboot.")
    return _r("ibgda", "pass", detail)


def check_rdma(req: DoctorRequirements, facts: HostFacts) -> CheckResult:
    rdma = facts.rdma
    if rdma is None:
        return _r("rdma", "skip", "not gathered")
    extras = []
    if rdma.peermem_loaded is not None:
        extras.append(f"nvidia_peermem {'loaded' if rdma.peermem_loaded else 'not loaded'}")
    if rdma.gdrcopy_present is not None:
        extras.append(f"gdrcopy {'present' if rdma.gdrcopy_present else 'absent'}")
    tail = f" ({', '.join(extras)})" if extras else ""
    if not rdma.sysfs_present:
        detail = f"/sys/class/infiniband absent: no RDMA devices (no RDMA driver loaded){tail}"
        if req.rdma:
            return _r("rdma", "fail", detail,
                      "Load the RDMA drivers (MLNX_OFED/DOCA or rdma-core with mlx5_ib); in Kubernetes request "
                      "rdma/ib and mount the devices. `ibv_devinfo` should list the HCAs.")
        return _r("rdma", "skip", f"{detail}; not needed")
    if not rdma.ports:
        detail = f"/sys/class/infiniband has no devices (RDMA core loaded, no HCA bound or exposed){tail}"
        if req.rdma:
            return _r("rdma", "fail", detail,
                      "Check `ibv_devinfo`: the HCA driver (mlx5_ib...) must bind the NICs; in a container "
                      "the RDMA devices must be passed in (rdma/ib resource, /dev/infiniband).")
        return _r("rdma", "skip", f"{detail}; not needed")
    active = [p for p in rdma.ports if (p.state or "").upper() == "ACTIVE"]
    listed = ", ".join(f"{p.device}/{p.port} {p.state}/{p.phys_state} {p.link_layer or ''} {p.rate or ''}".strip()
                       for p in rdma.ports) or "no ports"
    detail = f"{len(active)} of {len(rdma.ports)} RDMA port(s) ACTIVE: {listed}{tail}"
    if rdma.error:
        detail += f"; {rdma.error}"
    if not req.rdma:
        return _r("rdma", "pass", f"{detail}; not needed")
    if not active:
        return _r("rdma", "fail", detail,
                  "Bring the links up (check cables/switch ports, `ibstat`, and for RoCE the netdev), then "
                  "re-run the doctor.")
    if len(active) < len(rdma.ports):
        return _r("rdma", "warn", detail,
                  "Some ports are down: DeepEP/NVSHMEM may pick a down HCA; pin the HCAs "
                  "(NVSHMEM_HCA_PREFIX / DEEP_EP_DEVICE_TO_HCA_MAPPING) or fix the links.")
    return _r("rdma", "pass", detail)


def check_memlock(req: DoctorRequirements, facts: HostFacts) -> CheckResult:
    ml = facts.memlock
    if ml is None:
        return _r("memlock", "skip", "not gathered")
    if ml.error:
        return _r("memlock", "fail" if req.memlock_unlimited_needed else "skip", ml.error,
                  "Check `ulimit -l` by hand.")

    def show(v: int | None) -> str:
        return "unlimited" if v is None else fmt_bytes(v)

    detail = f"RLIMIT_MEMLOCK soft {show(ml.soft)}, hard {show(ml.hard)}"
    if ml.soft is None:
        return _r("memlock", "pass", detail)
    fix = ("Run `ulimit -l unlimited` before launching (needs hard limit unlimited: /etc/security/limits.conf "
           "`* - memlock unlimited`, systemd LimitMEMLOCK=infinity, docker --ulimit memlock=-1).")
    if req.memlock_unlimited_needed:
        return _r("memlock", "fail", f"{detail}: RDMA memory registration needs it unlimited", fix)
    return _r("memlock", "pass", f"{detail}; unlimited not required")


def check_shm(req: DoctorRequirements, facts: HostFacts) -> CheckResult:
    shm = facts.shm
    if shm is None:
        return _r("shm", "skip", "not gathered")
    if shm.error or shm.free_bytes is None:
        return _r("shm", "fail", f"cannot stat {shm.path}: {shm.error}",
                  "Mount a tmpfs at /dev/shm (docker --shm-size, or an emptyDir medium: Memory in Kubernetes).")
    detail = f"{shm.path}: {fmt_bytes(shm.free_bytes)} free of {fmt_bytes(shm.total_bytes)}"
    if shm.leftover_files:
        detail += f"; {shm.leftover_files} NCCL/PSM/vLLM segment(s) left there ({fmt_bytes(shm.leftover_bytes)})"
    need = f"needs {fmt_bytes(req.shm_bytes_min)}"
    if shm.free_bytes < req.shm_bytes_min:
        fix = "Enlarge /dev/shm (docker --shm-size, Kubernetes emptyDir sizeLimit, mount -o remount,size=...)."
        if shm.leftover_files:
            fix += " With no ranks running, delete the leftovers: find /dev/shm -type f -delete."
        return _r("shm", "fail", f"{detail}; {need}", fix)
    return _r("shm", "pass", f"{detail}; {need}")


def check_hugepages(req: DoctorRequirements, facts: HostFacts) -> CheckResult:
    mem = facts.memory
    if mem is None or mem.error:
        return _r("hugepages", "skip", f"cannot read memory facts: {mem.error if mem else 'not gathered'}")
    reserved = (mem.hugepages_total or 0) * (mem.hugepage_size_bytes or 0)
    detail = (f"{mem.hugepages_total} huge pages of {fmt_bytes(mem.hugepage_size_bytes)} reserved "
              f"({mem.hugepages_free} free), transparent huge pages: {mem.thp_mode or 'unknown'}")
    if mem.mem_total_bytes and reserved > mem.mem_total_bytes // 4:
        return _r("hugepages", "warn",
                  f"{detail}: {fmt_bytes(reserved)} of {fmt_bytes(mem.mem_total_bytes)} is reserved for huge "
                  "pages and unavailable to ordinary allocations (pinned buffers, CPU KV cache)",
                  "Lower vm.nr_hugepages unless something on this node uses them.")
    return _r("hugepages", "pass", detail)


def check_ports(req: DoctorRequirements, facts: HostFacts) -> CheckResult:
    if not req.ports:
        return _r("ports", "skip", "no ports required")
    probed = {(p.host, p.port): p for p in facts.ports}
    taken, unknown, free = [], [], []
    for host, port in req.ports:
        p = probed.get((host, port))
        label = f"{host}:{port}"
        if p is None:
            unknown.append(f"{label} (not probed)")
        elif p.free:
            free.append(label)
        elif p.free is False:
            taken.append(f"{label} ({p.error})")
        else:
            unknown.append(f"{label} ({p.error})")
    parts = []
    if taken:
        parts.append("taken: " + ", ".join(taken))
    if unknown:
        parts.append("could not test: " + ", ".join(unknown))
    parts.append(f"{len(free)} of {len(req.ports)} free" + (f": {', '.join(free)}" if len(free) <= 8 else ""))
    detail = "; ".join(parts)
    if taken or unknown:
        return _r("ports", "fail", detail,
                  "Stop what holds them (`ss -ltnp 'sport = :PORT'` names the process; often a rank of an "
                  "earlier run), or move serving.port / rpc_port in the topology. An address that is not on "
                  "this host means this is not the node the topology names.")
    return _r("ports", "pass", detail)


def check_interfaces(req: DoctorRequirements, facts: HostFacts) -> CheckResult:
    ifs = facts.interfaces
    if not req.interfaces:
        present = ", ".join(ifs.names) if ifs and not ifs.error else "not listed"
        return _r("interfaces", "skip", f"no interfaces named (present: {present})")
    if ifs is None or ifs.error:
        return _r("interfaces", "fail", f"cannot list interfaces: {ifs.error if ifs else 'not gathered'}",
                  "Check `ip link` by hand.")
    missing, down, bare, ok = [], [], [], []
    for name in req.interfaces:
        info = ifs.get(name)
        if info is None:
            hint = did_you_mean(name, ifs.names).strip()
            missing.append(f"{name} ({hint})" if hint else name)
        elif (info.operstate or "").lower() in ("down", "lowerlayerdown", "notpresent", "dormant"):
            down.append(f"{name} ({info.operstate})")
        elif not info.addresses:
            bare.append(name)
        else:
            ok.append(f"{name} {info.operstate} {', '.join(info.addresses[:2])}")
    parts = []
    if missing:
        parts.append("missing: " + ", ".join(missing))
    if down:
        parts.append("down: " + ", ".join(down))
    if bare:
        parts.append("no IP address: " + ", ".join(bare))
    if ok:
        parts.append("ok: " + "; ".join(ok))
    detail = "; ".join(parts) + f" (present: {', '.join(ifs.names)})"
    if missing or down:
        return _r("interfaces", "fail", detail,
                  "Set cluster.network.interface to an interface this node has (NCCL/Gloo/NVSHMEM bind to it), "
                  "or bring the link up.")
    if bare:
        return _r("interfaces", "warn", detail, "Give the interface an address: NCCL/Gloo sockets bind to it.")
    return _r("interfaces", "pass", detail)


# NCCL_SOCKET_IFNAME: comma list of prefixes; "^" excludes, "=" asks for exact names (NCCL docs).
_IFNAME_VARS = ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME")


def ifname_matches(spec: str, names: Sequence[str], *, prefix: bool) -> list[str]:
    """Interfaces selected by an NCCL-style list (``eth``, ``=eth0``, ``^docker,lo``)."""
    spec = spec.strip()
    exclude = spec.startswith("^")
    spec = spec.lstrip("^")
    exact = not prefix or spec.startswith("=")
    items = [s for s in spec.lstrip("=").split(",") if s]

    def hit(n: str) -> bool:
        return any(n == s if exact else n.startswith(s) for s in items)

    return [n for n in names if (not hit(n) if exclude else hit(n))]


def check_ifname_env(req: DoctorRequirements, facts: HostFacts) -> CheckResult:
    ifs = facts.interfaces
    set_vars = [(k, facts.getenv(k)) for k in _IFNAME_VARS if facts.getenv(k) is not None]
    if not set_vars:
        return _r("ifname-env", "skip", f"none of {', '.join(_IFNAME_VARS)} set in this shell")
    if ifs is None or ifs.error:
        return _r("ifname-env", "skip", "cannot list interfaces: cannot compare")
    bad, good = [], []
    for key, value in set_vars:
        # NCCL and NVSHMEM match prefixes; Gloo wants exact names.
        hits = ifname_matches(value or "", ifs.names, prefix=key != "GLOO_SOCKET_IFNAME")
        (good if hits else bad).append(f"{key}={value!r} → {', '.join(hits) if hits else 'no interface'}")
    detail = "; ".join(bad + good) + f" (present: {', '.join(ifs.names)})"
    if bad:
        return _r("ifname-env", "fail", detail,
                  "Set these variables to interfaces this node has (see `ip -br addr`), or unset them.")
    return _r("ifname-env", "pass", detail)


def check_disk(req: DoctorRequirements, facts: HostFacts) -> CheckResult:
    disk = facts.disk
    if req.model_path is None:
        return _r("disk", "skip", "no model path given")
    if disk is None:
        return _r("disk", "skip", "not gathered")
    where = "local path" if disk.kind == "local" else "Hugging Face cache"
    have = f"{fmt_bytes(disk.present_bytes)} present in {disk.directory} ({where})" if disk.exists \
        else f"{disk.directory} does not exist ({where})"
    free = f"{fmt_bytes(disk.free_bytes)} free on the filesystem of {disk.checked_path}"
    if disk.error:
        return _r("disk", "fail", f"{have}; cannot measure free space: {disk.error}", "Check the path by hand.")
    if disk.kind == "local" and not disk.exists and req.model_bytes is None:
        return _r("disk", "fail", f"{have}; no size estimate to plan a download",
                  "Give the path of a downloaded model, or a Hugging Face repo id.")
    if req.model_bytes is None:
        return _r("disk", "pass" if disk.present_bytes else "warn",
                  f"{have}; {free}; no model size estimate: cannot tell whether a download fits",
                  "Give --model-bytes (or a topology) so the doctor can compare.")
    want = f"model needs ~{fmt_bytes(req.model_bytes)}"
    if disk.present_bytes >= req.model_bytes * 0.98:
        return _r("disk", "pass", f"{have}; {want}: already downloaded")
    missing = req.model_bytes - disk.present_bytes
    if disk.free_bytes is not None and disk.free_bytes >= missing * 1.05:
        return _r("disk", "pass", f"{have}; {free}; {want}, {fmt_bytes(missing)} still to download")
    return _r("disk", "fail", f"{have}; {free}; {want}, {fmt_bytes(missing)} still to download",
              "Free space there, or point HF_HUB_CACHE / the model path at a larger filesystem.")


def check_cpu(req: DoctorRequirements, facts: HostFacts) -> CheckResult:
    cpu, mem = facts.cpu, facts.memory
    if cpu is None or cpu.error:
        return _r("cpu", "skip" if req.device == "cuda" else "fail",
                  f"cannot read CPU topology: {cpu.error if cpu else 'not gathered'}", "Check `lscpu` by hand.")
    numa = "; ".join(f"node{n}: {cl}" for n, cl in cpu.numa_nodes) or "no NUMA info"
    detail = (f"{len(cpu.usable_cpus)} of {cpu.logical_cpus} CPUs usable by this process, "
              f"{cpu.physical_cores or 'unknown'} physical cores, {numa}")
    if cpu.model_name:
        detail += f" ({cpu.model_name})"
    if mem and mem.mem_available_bytes is not None:
        detail += f"; {fmt_bytes(mem.mem_available_bytes)} memory available"
    if req.device == "cuda":
        return _r("cpu", "skip", f"GPU topology; {detail}")
    problems = []
    if req.cpu_ranks and len(cpu.usable_cpus) < req.cpu_ranks:
        problems.append(f"{req.cpu_ranks} ranks need a CPU each")
    if req.memory_bytes_min is not None and mem and mem.mem_available_bytes is not None \
            and mem.mem_available_bytes < req.memory_bytes_min:
        problems.append(f"ranks need {fmt_bytes(req.memory_bytes_min)} of memory")
    if problems:
        return _r("cpu", "fail", f"{detail}; " + "; ".join(problems),
                  "Run fewer CPU ranks on this node (or lower VLLM_CPU_KVCACHE_SPACE), or widen the CPU set.")
    if req.cpu_ranks:
        detail += f"; {req.cpu_ranks} rank(s), one CPU each (VLLM_CPU_OMP_THREADS_BIND)"
    return _r("cpu", "pass", detail)


CHECKS: tuple[Callable[[DoctorRequirements, HostFacts], CheckResult | list[CheckResult]], ...] = (
    check_gpus,
    check_gpu_memory,
    check_driver,
    check_torch_cuda,
    check_python,
    check_vllm,
    check_modules,
    check_nvshmem,
    check_ibgda,
    check_rdma,
    check_memlock,
    check_shm,
    check_hugepages,
    check_ports,
    check_interfaces,
    check_ifname_env,
    check_disk,
    check_cpu,
)


def run_checks(req: DoctorRequirements, facts: HostFacts) -> list[CheckResult]:
    """Every check, in table order; pure (no I/O)."""
    results: list[CheckResult] = []
    for check in CHECKS:
        out = check(req, facts)
        results.extend(out if isinstance(out, list) else [out])
    return results


def summarize(results: Sequence[CheckResult]) -> int:
    """Exit code: 1 when any check failed, else 0 (pass, warn and skip all let a start go ahead)."""
    return 1 if any(r.status == "fail" for r in results) else 0


def counts(results: Sequence[CheckResult]) -> dict[str, int]:
    return {s: sum(1 for r in results if r.status == s) for s in STATUSES}


def facts_to_dict(facts: HostFacts) -> dict[str, object]:
    return asdict(facts)


__all__ = [
    "CheckResult", "DoctorRequirements", "HostFacts", "GpuFacts", "GpuInfo", "PythonFacts", "ModuleFacts",
    "RdmaFacts", "RdmaPort", "MemlockFacts", "ShmFacts", "MemoryFacts", "PortFacts", "InterfaceFacts",
    "InterfaceInfo", "DiskFacts", "CpuFacts", "gather_host_facts", "run_checks", "summarize", "counts",
    "parse_size", "parse_port_spec", "facts_to_dict", "fmt_bytes",
]
