"""Gathering host facts: the only side effects of the doctor.

:func:`gather_host_facts` reads ``/sys`` and ``/proc``, runs ``nvidia-smi`` (or NVML through ``pynvml``) and the
target Python with a timeout, and binds the required ports for a moment. Every probe records what it saw *and* why
it could not see something, so a check can say "nvidia-smi not found: cannot see GPUs" instead of "0 GPUs".
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
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from widep.doctor.facts import (
    CpuFacts,
    DiskFacts,
    DoctorRequirements,
    GpuFacts,
    GpuInfo,
    HostFacts,
    InterfaceFacts,
    InterfaceInfo,
    MemlockFacts,
    MemoryFacts,
    MiB,
    ModuleFacts,
    PortFacts,
    PythonFacts,
    RdmaFacts,
    RdmaPort,
    ShmFacts,
    parse_meminfo,
    parse_nvidia_params,
    parse_nvidia_smi_xml,
)

# Environment prefixes recorded in the facts (values with secret-looking names are dropped).
_ENV_PREFIXES = ("NVSHMEM_", "NCCL_", "GLOO_", "UCX_", "VLLM_", "DEEP_EP_", "NVIDIA_", "HF_")
_ENV_NAMES = ("CUDA_VISIBLE_DEVICES", "XDG_CACHE_HOME", "HOME")
_SECRET_HINTS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL")


# --------------------------------------------------------------------------------------------
# Gathering (the only side effects in the doctor)
# --------------------------------------------------------------------------------------------

# Runs inside the target interpreter (any Python >= 3.8): locates (and optionally imports)
# modules, reads versions from package metadata, and torch's build CUDA from torch/version.py
# without importing torch. Prints one line prefixed with the marker; imports may print too.
_PROBE = r"""
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
def plugin_entry_point(name):
    # 'entry point NAME = VALUE (vllm.general_plugins)' when a vLLM plugin entry point names module `name`
    try:
        import importlib.metadata as md
        eps = md.entry_points()
        g = "vllm.general_plugins"
        group = eps.select(group=g) if hasattr(eps, "select") else eps.get(g, [])
        for e in group:
            if e.value.split(":")[0].strip() == name:
                return "entry point %s = %s (vllm.general_plugins)" % (e.name, e.value)
    except Exception:
        pass
    return None
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
    ep = None if spec is not None else plugin_entry_point(name)
    if ep is not None:
        # found the way vLLM finds it (an editable install's import hook is invisible to PathFinder)
        r["found"] = True; r["origin"] = ep; r["error"] = None
        r["distribution"], r["version"] = dist_version(name)
        if do_import:
            r["import_tried"] = True
            try:
                importlib.import_module(name); r["imported"] = True
            except BaseException as e:
                r["error"] = "%s: %s" % (type(e).__name__, str(e)[:500])
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
    version_py = os.path.join(list(torch_spec.submodule_search_locations)[0], "version.py")
    v = read_assignments(version_py, ("__version__", "cuda"))
    result["torch_version"] = v.get("__version__"); result["torch_cuda"] = v.get("cuda")
sys.stdout.write("\n" + MARK + json.dumps(result) + "\n"); sys.stdout.flush()
"""
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
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(env),
            start_new_session=True,
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
    return GpuFacts(source="nvidia-smi", gpus=gpus, driver_version=driver, cuda_version=cuda), (f"{nvidia_smi}: ok")


def _python_from_probe(requested: str, started: subprocess.Popen[str] | str | None, timeout_s: float) -> PythonFacts:
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
    data = json.loads(line[len(_PROBE_MARK) :])
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


def gather_interfaces(sys_root: Path, proc_root: Path) -> InterfaceFacts:
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
    interfaces = gather_interfaces(sysp, procp)
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
    gpu = GpuFacts(gpu.source, gpu.gpus, gpu.driver_version, gpu.cuda_version, tuple(attempts), round(smi_seconds, 3))
    py = _python_from_probe(python_req, probe, import_timeout_s if import_modules else timeout_s)
    py = PythonFacts(
        py.requested,
        py.executable,
        py.version,
        py.modules,
        py.torch_version,
        py.torch_cuda,
        py.error,
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
