"""The doctor's checks: pure functions of :class:`~widep.doctor.facts.DoctorRequirements` and
:class:`~widep.doctor.facts.HostFacts` (gathered by :mod:`widep.doctor.gather`, or constructed in tests), each
returning frozen :class:`~widep.doctor.facts.CheckResult` rows (pass / warn / fail / skip, what was seen, what to
do); :func:`run_checks` runs them all, :func:`summarize` turns the rows into an exit code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from widep.doctor.facts import (
    CPU_EP_PLUGIN_MODULE,
    NVSHMEM_DEFAULT_SYMMETRIC_SIZE,
    STATUSES,
    CheckResult,
    DoctorRequirements,
    GpuFacts,
    GpuInfo,
    HostFacts,
    MiB,
    Status,
    fmt_bytes,
    gpu_kind_matches,
    parse_nvshmem_size,
    release_tuple,
)
from widep.errors import did_you_mean

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
        seen = (
            f"{len(gpu.gpus)} GPU(s) seen" if gpu and gpu.seen else (_cannot_see_gpus(gpu) if gpu else "not looked at")
        )
        return _r("gpus", "skip", f"CPU topology: no GPUs needed ({seen})")
    if gpu is None or not gpu.seen:
        detail = _cannot_see_gpus(gpu) if gpu else "GPU facts not gathered"
        if req.gpus_needed == 0:
            return _r(
                "gpus", "skip", f"{detail} (no GPU count required)", "Give --gpus N or a topology to require GPUs."
            )
        return _r(
            "gpus",
            "fail",
            f"{detail}; {req.gpus_needed} needed",
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
        small = [
            g
            for g in gpu.gpus
            if g.memory_total_mib is not None and g.memory_total_mib * MiB < req.gpu_memory_bytes * 0.98
        ]
        if small:
            problems.append(
                f"the plan budgets {fmt_bytes(req.gpu_memory_bytes)} per GPU, GPU {small[0].index} "
                f"has {fmt_bytes(small[0].memory_total_mib * MiB)}"
            )
            fixes.append("Re-plan for this card (cluster.gpu) so weights and KV cache fit its memory.")
    if req.gpu_kind:
        wrong = sorted({g.name for g in gpu.gpus if not gpu_kind_matches(req.gpu_kind, g.name)})
        if wrong:
            problems.append(f"topology is planned for {req.gpu_kind}, found {', '.join(wrong)}")
            fixes.append(
                f"Set cluster.gpu to this node's GPU kind, or run on {req.gpu_kind} nodes "
                "(memory and KV budgets were planned for that card)."
            )
    if problems:
        return _r("gpus", "fail", f"{seen}; " + "; ".join(problems), " ".join(fixes))
    cvd = facts.getenv("CUDA_VISIBLE_DEVICES")
    visible = _visible_indices(cvd, gpu.gpus)
    if visible is not None and len(visible) < req.gpus_needed:
        return _r(
            "gpus",
            "warn",
            f"{seen}; CUDA_VISIBLE_DEVICES={cvd!r} in this shell leaves {len(visible)} of {req.gpus_needed} needed",
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
            procs = ", ".join(
                f"pid {pid} {name}" + (f" {mib} MiB" if mib is not None else "") for pid, name, mib in g.processes[:3]
            )
            return f" by {procs}" if procs else ""

        listed = ", ".join(f"GPU {g.index}: {g.memory_used_mib} of {g.memory_total_mib} MiB used{who(g)}" for g in busy)
        return _r(
            "gpu-memory",
            "warn",
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
        return _r(
            "driver",
            status,
            (_cannot_see_gpus(gpu) if gpu else "not gathered") + ": cannot read driver or CUDA versions",
            "Install the NVIDIA driver and make nvidia-smi work on this node.",
        )
    detail = f"driver {gpu.driver_version or 'unknown'}, CUDA {gpu.cuda_version or 'unknown'} (via {gpu.source})"
    fabric_bad = [
        g
        for g in gpu.gpus
        if g.fabric_state is not None and (g.fabric_state != "Completed" or (g.fabric_status not in (None, "Success")))
    ]
    if fabric_bad:
        listed = ", ".join(f"GPU {g.index}: {g.fabric_state}/{g.fabric_status}" for g in fabric_bad)
        return _r(
            "driver",
            "fail",
            f"{detail}; NVSwitch fabric not ready ({listed})",
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
        return _r(
            "torch-cuda",
            "fail",
            f"torch not found in {py.executable}",
            "Install vLLM (it brings its torch) into that environment, or point --python at the right one.",
        )
    if py.torch_cuda is None:
        return _r(
            "torch-cuda",
            "fail",
            f"torch {py.torch_version} in {py.executable} is a CPU-only build",
            "Install a CUDA build of torch / vLLM in that environment.",
        )
    detail = f"torch {py.torch_version} built for CUDA {py.torch_cuda}"
    if gpu is None or not gpu.seen or not gpu.cuda_version:
        return _r("torch-cuda", "skip", f"{detail}; driver CUDA version unknown: cannot compare")
    built, driver = release_tuple(py.torch_cuda), release_tuple(gpu.cuda_version)
    detail += f"; driver supports CUDA {gpu.cuda_version}"
    if built[:1] > driver[:1]:
        return _r(
            "torch-cuda",
            "fail",
            detail,
            f"Upgrade the driver to one supporting CUDA {py.torch_cuda}, or install a torch/vLLM "
            f"build for CUDA {gpu.cuda_version.split('.')[0]}.x.",
        )
    if built[:2] > driver[:2]:
        return _r(
            "torch-cuda",
            "warn",
            f"{detail}: runs under minor-version compatibility; kernels needing a newer driver (PTX JIT) can fail",
            f"Upgrade the driver to CUDA >= {py.torch_cuda}, or use a build for CUDA {gpu.cuda_version}.",
        )
    return _r("torch-cuda", "pass", detail)


def check_python(req: DoctorRequirements, facts: HostFacts) -> CheckResult:
    py = facts.python
    if py is None:
        return _r("python", "skip", "not probed")
    if py.error:
        return _r(
            "python",
            "fail",
            py.error,
            "Point --python (or the topology's vllm.python) at the interpreter of the vLLM environment.",
        )
    how = (
        "modules imported"
        if any(m.import_tried for m in py.modules)
        else "modules located, not imported (--import imports them)"
    )
    return _r("python", "pass", f"{py.executable} (Python {py.version}) answered in {py.seconds:.2f} s; {how}")


def _render_line(version: str) -> str:
    """'vLLM line 0.34 (0.34-0.39)' for a version widep renders for, else what is wrong with it."""
    from widep.errors import UserError
    from widep.spec.vllm_versions import table_for

    try:
        t = table_for(version)
    except UserError:
        return f"vLLM {version}, a line widep does not render for"
    return f"vLLM {version}, line {t.line} ({t.versions[0]}-{t.versions[1]})"


def check_vllm(req: DoctorRequirements, facts: HostFacts) -> CheckResult:
    py = facts.python
    if py is None or py.error:
        return _r(
            "vllm",
            "fail",
            "python could not be probed: cannot see vLLM (see the python row)",
            "Fix the python row first.",
        )
    m = py.module("vllm")
    if m is None or not m.found:
        why = f" ({m.error})" if m and m.error else ""
        want = f"=={req.vllm_version}" if req.vllm_version else ""
        return _r(
            "vllm",
            "fail",
            f"vllm not found in {py.executable}{why}",
            f"pip install 'vllm{want}' in that environment, or point --python at the one that has it.",
        )
    where = f"{m.version or 'unknown version'}"
    if m.distribution and m.distribution != "vllm":
        where += f" (distribution {m.distribution})"
    where += f" at {m.origin}"
    if m.import_tried and not m.imported:
        return _r(
            "vllm",
            "fail",
            f"vllm {where} failed to import: {m.error}",
            "Reinstall vLLM in that environment; the error above names the missing piece.",
        )
    seen = "imported" if m.imported else "located"
    if m.version is not None:
        seen += f" (installed: {_render_line(m.version)}"
        seen += f"; render uses {_render_line(req.vllm_version)})" if req.vllm_version else ")"
    if req.vllm_version is None:
        return _r("vllm", "pass", f"vllm {where} {seen}; no version required")
    if m.version is None:
        return _r(
            "vllm",
            "warn",
            f"vllm {where} {seen}; its version is unknown, topology wants {req.vllm_version}",
            "Check `python -c 'import vllm; print(vllm.__version__)'` by hand.",
        )
    have, want = release_tuple(m.version), release_tuple(req.vllm_version)
    if have[: len(want)] == want:
        return _r("vllm", "pass", f"vllm {where} {seen}; topology wants {req.vllm_version}")
    if have[:2] == want[:2]:
        return _r(
            "vllm",
            "warn",
            f"vllm {where} {seen}; topology was rendered for {req.vllm_version} (same minor release)",
            f"Set vllm.version: {m.version} in the topology, or install vllm=={req.vllm_version}.",
        )
    return _r(
        "vllm",
        "fail",
        f"vllm {where} {seen}; topology was rendered for {req.vllm_version}: flags and "
        "environment variables differ between releases",
        f"Set vllm.version: {'.'.join(map(str, have[:3]))} in the topology and re-render, or install "
        f"vllm=={req.vllm_version}.",
    )


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
            out.append(
                _r(
                    name,
                    "fail",
                    f"{broken.name} found at {broken.origin} but failed to import: {broken.error}",
                    f"Rebuild {broken.name} against this torch/CUDA (vLLM's tools/ep_kernels scripts build "
                    "DeepEP and friends).",
                )
            )
            continue
        if alts[0] == CPU_EP_PLUGIN_MODULE:
            out.append(
                _r(
                    name,
                    "fail",
                    f"widep's vLLM plugin ({alts[0]}) not found in {py.executable}: vLLM 0.32 cannot answer on an "
                    "expert-parallel group on CPU without it",
                    "pip install widep into that environment (vLLM loads the plugin from its entry point).",
                )
            )
            continue
        out.append(
            _r(
                name,
                "fail",
                f"{' or '.join(alts)} not found in {py.executable}",
                f"Install {alts[0]} into that environment (the chosen backend imports it); vLLM's "
                "tools/ep_kernels/ has install scripts for the EP kernels.",
            )
        )
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
            return _r(
                "nvshmem",
                "fail",
                f"NVSHMEM_SYMMETRIC_SIZE={size_text!r} is not a size ({shown})",
                "Use NVSHMEM's size syntax, e.g. NVSHMEM_SYMMETRIC_SIZE=16G.",
            )
    transport = env.get("NVSHMEM_REMOTE_TRANSPORT")
    if transport is not None and transport.lower() not in ("ibrc", "ucx", "libfabric", "ibdevx", "ibgda", "none"):
        return _r(
            "nvshmem",
            "fail",
            f"NVSHMEM_REMOTE_TRANSPORT={transport!r} is not a transport ({shown})",
            "Valid: ibrc, ucx, libfabric, ibdevx, ibgda, none (llm-d uses ibgda).",
        )
    if size_text is None:
        return _r(
            "nvshmem",
            "warn",
            f"NVSHMEM_SYMMETRIC_SIZE unset: NVSHMEM's default heap is "
            f"{fmt_bytes(NVSHMEM_DEFAULT_SYMMETRIC_SIZE)} per GPU ({shown})",
            "llm-d's decode manifests set NVSHMEM_SYMMETRIC_SIZE=16G to prevent NVSHMEM OOM; set it in "
            "the topology's env if DeepEP buffers fail to allocate.",
        )
    return _r("nvshmem", "pass", shown)


def _param(params: Iterable[tuple[str, str]] | None, key: str) -> str | None:
    return next((v for k, v in params or () if k == key), None)


def check_ibgda(req: DoctorRequirements, facts: HostFacts) -> CheckResult:
    """GPU-initiated RDMA (IBGDA) needs NVIDIA driver options on the host."""
    if not (req.nvshmem and req.rdma):
        return _r("ibgda", "skip", "no NVSHMEM backend over RDMA chosen")
    rdma = facts.rdma
    if rdma is None or rdma.nvidia_params is None:
        return _r(
            "ibgda",
            "skip",
            "/proc/driver/nvidia/params unreadable (no NVIDIA driver loaded): cannot see the IBGDA driver options",
        )
    stream = _param(rdma.nvidia_params, "EnableStreamMemOPs")
    dwords = _param(rdma.nvidia_params, "RegistryDwords") or ""
    detail = f"EnableStreamMemOPs={stream}, RegistryDwords={dwords!r}"
    if stream != "1" or "PeerMappingOverride=1" not in dwords.replace(" ", ""):
        return _r(
            "ibgda",
            "warn",
            f"{detail}: IBGDA driver options not set",
            "As vLLM's tools/ep_kernels/configure_system_drivers.sh does: add `options nvidia "
            'NVreg_EnableStreamMemOPs=1 NVreg_RegistryDwords="PeerMappingOverride=1;"` to '
            "/etc/modprobe.d/nvidia.conf, update-initramfs -u, reboot.",
        )
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
            return _r(
                "rdma",
                "fail",
                detail,
                "Load the RDMA drivers (MLNX_OFED/DOCA or rdma-core with mlx5_ib); in Kubernetes request "
                "rdma/ib and mount the devices. `ibv_devinfo` should list the HCAs.",
            )
        return _r("rdma", "skip", f"{detail}; not needed")
    if not rdma.ports:
        detail = f"/sys/class/infiniband has no devices (RDMA core loaded, no HCA bound or exposed){tail}"
        if req.rdma:
            return _r(
                "rdma",
                "fail",
                detail,
                "Check `ibv_devinfo`: the HCA driver (mlx5_ib...) must bind the NICs; in a container "
                "the RDMA devices must be passed in (rdma/ib resource, /dev/infiniband).",
            )
        return _r("rdma", "skip", f"{detail}; not needed")
    active = [p for p in rdma.ports if (p.state or "").upper() == "ACTIVE"]
    listed = (
        ", ".join(
            f"{p.device}/{p.port} {p.state}/{p.phys_state} {p.link_layer or ''} {p.rate or ''}".strip()
            for p in rdma.ports
        )
        or "no ports"
    )
    detail = f"{len(active)} of {len(rdma.ports)} RDMA port(s) ACTIVE: {listed}{tail}"
    if rdma.error:
        detail += f"; {rdma.error}"
    if not req.rdma:
        return _r("rdma", "pass", f"{detail}; not needed")
    if not active:
        return _r(
            "rdma",
            "fail",
            detail,
            "Bring the links up (check cables/switch ports, `ibstat`, and for RoCE the netdev), then "
            "re-run the doctor.",
        )
    if len(active) < len(rdma.ports):
        return _r(
            "rdma",
            "warn",
            detail,
            "Some ports are down: DeepEP/NVSHMEM may pick a down HCA; pin the HCAs "
            "(NVSHMEM_HCA_PREFIX / DEEP_EP_DEVICE_TO_HCA_MAPPING) or fix the links.",
        )
    return _r("rdma", "pass", detail)


def check_memlock(req: DoctorRequirements, facts: HostFacts) -> CheckResult:
    ml = facts.memlock
    if ml is None:
        return _r("memlock", "skip", "not gathered")
    if ml.error:
        return _r("memlock", "fail" if req.memlock_unlimited_needed else "skip", ml.error, "Check `ulimit -l` by hand.")

    def show(v: int | None) -> str:
        return "unlimited" if v is None else fmt_bytes(v)

    detail = f"RLIMIT_MEMLOCK soft {show(ml.soft)}, hard {show(ml.hard)}"
    if ml.soft is None:
        return _r("memlock", "pass", detail)
    fix = (
        "Run `ulimit -l unlimited` before launching (needs hard limit unlimited: /etc/security/limits.conf "
        "`* - memlock unlimited`, systemd LimitMEMLOCK=infinity, docker --ulimit memlock=-1)."
    )
    if req.memlock_unlimited_needed:
        return _r("memlock", "fail", f"{detail}: RDMA memory registration needs it unlimited", fix)
    return _r("memlock", "pass", f"{detail}; unlimited not required")


def check_shm(req: DoctorRequirements, facts: HostFacts) -> CheckResult:
    shm = facts.shm
    if shm is None:
        return _r("shm", "skip", "not gathered")
    if shm.error or shm.free_bytes is None:
        return _r(
            "shm",
            "fail",
            f"cannot stat {shm.path}: {shm.error}",
            "Mount a tmpfs at /dev/shm (docker --shm-size, or an emptyDir medium: Memory in Kubernetes).",
        )
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
    detail = (
        f"{mem.hugepages_total} huge pages of {fmt_bytes(mem.hugepage_size_bytes)} reserved "
        f"({mem.hugepages_free} free), transparent huge pages: {mem.thp_mode or 'unknown'}"
    )
    if mem.mem_total_bytes and reserved > mem.mem_total_bytes // 4:
        return _r(
            "hugepages",
            "warn",
            f"{detail}: {fmt_bytes(reserved)} of {fmt_bytes(mem.mem_total_bytes)} is reserved for huge "
            "pages and unavailable to ordinary allocations (pinned buffers, CPU KV cache)",
            "Lower vm.nr_hugepages unless something on this node uses them.",
        )
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
        return _r(
            "ports",
            "fail",
            detail,
            "Stop what holds them (`ss -ltnp 'sport = :PORT'` names the process; often a rank of an "
            "earlier run), or move serving.port / rpc_port in the topology. An address that is not on "
            "this host means this is not the node the topology names.",
        )
    return _r("ports", "pass", detail)


def check_interfaces(req: DoctorRequirements, facts: HostFacts) -> CheckResult:
    ifs = facts.interfaces
    if not req.interfaces:
        present = ", ".join(ifs.names) if ifs and not ifs.error else "not listed"
        return _r("interfaces", "skip", f"no interfaces named (present: {present})")
    if ifs is None or ifs.error:
        return _r(
            "interfaces",
            "fail",
            f"cannot list interfaces: {ifs.error if ifs else 'not gathered'}",
            "Check `ip link` by hand.",
        )
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
        return _r(
            "interfaces",
            "fail",
            detail,
            "Set cluster.network.interface to an interface this node has (NCCL/Gloo/NVSHMEM bind to it), "
            "or bring the link up.",
        )
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
        return _r(
            "ifname-env",
            "fail",
            detail,
            "Set these variables to interfaces this node has (see `ip -br addr`), or unset them.",
        )
    return _r("ifname-env", "pass", detail)


def check_disk(req: DoctorRequirements, facts: HostFacts) -> CheckResult:
    disk = facts.disk
    if req.model_path is None:
        return _r("disk", "skip", "no model path given")
    if disk is None:
        return _r("disk", "skip", "not gathered")
    where = "local path" if disk.kind == "local" else "Hugging Face cache"
    have = (
        f"{fmt_bytes(disk.present_bytes)} present in {disk.directory} ({where})"
        if disk.exists
        else f"{disk.directory} does not exist ({where})"
    )
    free = f"{fmt_bytes(disk.free_bytes)} free on the filesystem of {disk.checked_path}"
    if disk.error:
        return _r("disk", "fail", f"{have}; cannot measure free space: {disk.error}", "Check the path by hand.")
    if disk.kind == "local" and not disk.exists and req.model_bytes is None:
        return _r(
            "disk",
            "fail",
            f"{have}; no size estimate to plan a download",
            "Give the path of a downloaded model, or a Hugging Face repo id.",
        )
    if req.model_bytes is None:
        return _r(
            "disk",
            "pass" if disk.present_bytes else "warn",
            f"{have}; {free}; no model size estimate: cannot tell whether a download fits",
            "Give --model-bytes (or a topology) so the doctor can compare.",
        )
    want = f"model needs ~{fmt_bytes(req.model_bytes)}"
    if disk.present_bytes >= req.model_bytes * 0.98:
        return _r("disk", "pass", f"{have}; {want}: already downloaded")
    missing = req.model_bytes - disk.present_bytes
    if disk.free_bytes is not None and disk.free_bytes >= missing * 1.05:
        return _r("disk", "pass", f"{have}; {free}; {want}, {fmt_bytes(missing)} still to download")
    return _r(
        "disk",
        "fail",
        f"{have}; {free}; {want}, {fmt_bytes(missing)} still to download",
        "Free space there, or point HF_HUB_CACHE / the model path at a larger filesystem.",
    )


def check_cpu(req: DoctorRequirements, facts: HostFacts) -> CheckResult:
    cpu, mem = facts.cpu, facts.memory
    if cpu is None or cpu.error:
        return _r(
            "cpu",
            "skip" if req.device == "cuda" else "fail",
            f"cannot read CPU topology: {cpu.error if cpu else 'not gathered'}",
            "Check `lscpu` by hand.",
        )
    numa = "; ".join(f"node{n}: {cl}" for n, cl in cpu.numa_nodes) or "no NUMA info"
    detail = (
        f"{len(cpu.usable_cpus)} of {cpu.logical_cpus} CPUs usable by this process, "
        f"{cpu.physical_cores or 'unknown'} physical cores, {numa}"
    )
    if cpu.model_name:
        detail += f" ({cpu.model_name})"
    if mem and mem.mem_available_bytes is not None:
        detail += f"; {fmt_bytes(mem.mem_available_bytes)} memory available"
    if req.device == "cuda":
        return _r("cpu", "skip", f"GPU topology; {detail}")
    problems = []
    if req.cpu_ranks and len(cpu.usable_cpus) < req.cpu_ranks:
        problems.append(f"{req.cpu_ranks} ranks need a CPU each")
    if (
        req.memory_bytes_min is not None
        and mem
        and mem.mem_available_bytes is not None
        and mem.mem_available_bytes < req.memory_bytes_min
    ):
        problems.append(f"ranks need {fmt_bytes(req.memory_bytes_min)} of memory")
    if problems:
        return _r(
            "cpu",
            "fail",
            f"{detail}; " + "; ".join(problems),
            "Run fewer CPU ranks on this node (or lower VLLM_CPU_KVCACHE_SPACE), or widen the CPU set.",
        )
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
