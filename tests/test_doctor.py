"""widep doctor: real host facts on this machine (no GPU, no RDMA here), pure checks on constructed facts.

Tests that gather facts look at this machine for real: /dev/shm, memlock, /proc/meminfo, CPUs,
interfaces, sockets bound by the test, the real Python, and the absence of nvidia-smi. Facts
about GPUs and RDMA are constructed (or read from nvidia-smi output captured on a real H100
through the device tool) because this machine has neither; each such test says so.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from widep.cli import main
from widep.doctor import check_host, requirements_from_plan
from widep.doctor.checks import ifname_matches, run_checks, summarize
from widep.doctor.cli import interpreter_of_script, pick_node
from widep.doctor.facts import (
    CheckResult,
    DoctorRequirements,
    GpuFacts,
    GpuInfo,
    HostFacts,
    PythonFacts,
    RdmaFacts,
    RdmaPort,
    gpu_kind_matches,
    parse_nvidia_smi_xml,
    parse_nvshmem_size,
    parse_port_spec,
    parse_size,
)
from widep.doctor.gather import gather_host_facts
from widep.errors import UserError
from widep.plan import plan
from widep.spec.topology import load_topology, parse_topology

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data" / "doctor"
TOPOLOGIES = REPO / "topologies"
GiB = 1 << 30
MiB = 1 << 20

ALL_CHECKS = {
    "gpus",
    "gpu-memory",
    "driver",
    "torch-cuda",
    "python",
    "vllm",
    "nvshmem",
    "ibgda",
    "rdma",
    "memlock",
    "shm",
    "hugepages",
    "ports",
    "interfaces",
    "ifname-env",
    "disk",
    "cpu",
}


def by_name(results: list[CheckResult]) -> dict[str, CheckResult]:
    names = [r.name for r in results]
    assert len(names) == len(set(names)), names
    return {r.name: r for r in results}


def pynvml_importable() -> bool:
    return importlib.util.find_spec("pynvml") is not None


@pytest.fixture(scope="module")
def host_facts() -> HostFacts:
    """Facts of this machine, gathered once; tests replace the GPU/RDMA parts they construct."""
    return gather_host_facts(DoctorRequirements())


# ---------------------------------------------------------------------------------------------
# Real host facts


def test_every_check_runs_and_explains_itself(host_facts: HostFacts) -> None:
    req = DoctorRequirements(gpus_needed=1, needed_modules=("json",))
    results = run_checks(req, host_facts)
    rows = by_name(results)
    assert set(rows) == ALL_CHECKS | {"module:json"}
    for r in results:
        assert r.status in ("pass", "warn", "fail", "skip")
        assert r.detail.strip(), r
        assert (r.fix == "") == (r.status == "pass") or r.status == "skip", r
        if r.status in ("warn", "fail"):
            assert r.fix.strip(), r


def test_gpu_checks_say_nvidia_smi_is_missing_and_fail_when_gpus_are_needed() -> None:
    """Runs with a PATH that has no nvidia-smi (this machine has none anyway)."""
    if pynvml_importable():
        pytest.skip("pynvml is importable here, so NVML (not nvidia-smi) would answer")
    env = dict(os.environ, PATH="/nonexistent-widep-bin")
    req = DoctorRequirements(gpus_needed=8, gpu_kind="H200")
    facts = gather_host_facts(req, env=env)
    assert facts.gpu is not None and not facts.gpu.seen
    assert facts.gpu.attempts[0] == "nvidia-smi not found on PATH"
    assert "pynvml not importable" in facts.gpu.attempts[1]
    rows = by_name(run_checks(req, facts))
    assert rows["gpus"].status == "fail"
    assert "nvidia-smi not found on PATH" in rows["gpus"].detail and "cannot see GPUs" in rows["gpus"].detail
    assert "8 needed" in rows["gpus"].detail
    assert rows["driver"].status == "fail" and "cannot read driver or CUDA versions" in rows["driver"].detail
    assert rows["gpu-memory"].status == "skip" and "cannot see their memory" in rows["gpu-memory"].detail

    cpu = replace(req, device="cpu", gpus_needed=0, gpu_kind=None)
    rows = by_name(run_checks(cpu, facts))
    assert rows["gpus"].status == "skip"
    assert rows["gpus"].detail.startswith("CPU topology: no GPUs needed (nvidia-smi not found on PATH")
    assert {rows[n].status for n in ("gpu-memory", "driver", "torch-cuda")} == {"skip"}


def test_a_port_held_by_a_real_socket_is_reported_taken() -> None:
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen(1)
    taken = held.getsockname()[1]
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    free = probe.getsockname()[1]
    probe.close()
    foreign = "203.0.113.77"  # TEST-NET-3: not an address of this host
    try:
        req = DoctorRequirements(ports=(("127.0.0.1", taken), ("127.0.0.1", free), (foreign, free)))
        facts = gather_host_facts(req)
        by_port = {(p.host, p.port): p for p in facts.ports}
        assert by_port[("127.0.0.1", taken)].free is False
        assert by_port[("127.0.0.1", taken)].error == "address already in use"
        assert by_port[("127.0.0.1", free)].free is True
        assert by_port[(foreign, free)].free is None
        assert "not an address of this host" in (by_port[(foreign, free)].error or "")
        row = by_name(run_checks(req, facts))["ports"]
        assert row.status == "fail"
        assert f"taken: 127.0.0.1:{taken} (address already in use)" in row.detail
        assert f"1 of 3 free: 127.0.0.1:{free}" in row.detail
        assert "ss -ltnp" in row.fix
    finally:
        held.close()
    # released: the same port is now free
    facts = gather_host_facts(DoctorRequirements(ports=(("127.0.0.1", taken),)))
    assert facts.ports[0].free is True


def test_missing_and_present_interfaces() -> None:
    names = [n for _, n in socket.if_nameindex()]
    assert "lo" in names
    req = DoctorRequirements(interfaces=("lo", "widep-nope0"))
    facts = gather_host_facts(req)
    assert facts.interfaces is not None and set(facts.interfaces.names) == set(names)
    lo = facts.interfaces.get("lo")
    assert lo is not None and "127.0.0.1" in lo.addresses
    row = by_name(run_checks(req, facts))["interfaces"]
    assert row.status == "fail"
    assert "missing: widep-nope0" in row.detail and "ok: lo" in row.detail
    assert row.detail.endswith(f"(present: {', '.join(names)})")
    assert by_name(run_checks(DoctorRequirements(interfaces=("lo",)), facts))["interfaces"].status == "pass"


def test_memlock_is_read_for_real(host_facts: HostFacts) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    inf = resource.RLIM_INFINITY
    assert host_facts.memlock is not None
    assert host_facts.memlock.soft == (None if soft == inf else soft)
    assert host_facts.memlock.hard == (None if hard == inf else hard)
    row = by_name(run_checks(DoctorRequirements(memlock_unlimited_needed=True), host_facts))["memlock"]
    assert row.status == ("pass" if soft == inf else "fail")
    if soft != inf:
        assert "RDMA memory registration needs it unlimited" in row.detail and "ulimit -l unlimited" in row.fix
    assert by_name(run_checks(DoctorRequirements(), host_facts))["memlock"].status == "pass"


def test_shm_is_read_for_real_and_leftover_segments_are_counted() -> None:
    st = os.statvfs("/dev/shm")
    leftover = Path("/dev/shm") / f"nccl-widep-doctor-test-{os.getpid()}"
    leftover.write_bytes(b"\0" * MiB)
    try:
        facts = gather_host_facts(DoctorRequirements())
    finally:
        leftover.unlink()
    shm = facts.shm
    assert shm is not None and shm.error is None
    assert shm.total_bytes == st.f_blocks * st.f_frsize
    assert shm.leftover_files >= 1 and shm.leftover_bytes >= MiB
    too_much = DoctorRequirements(shm_bytes_min=shm.total_bytes + 1)
    row = by_name(run_checks(too_much, facts))["shm"]
    assert row.status == "fail" and "find /dev/shm -type f -delete" in row.fix
    assert "NCCL/PSM/vLLM segment(s) left there" in row.detail
    assert by_name(run_checks(DoctorRequirements(shm_bytes_min=1), facts))["shm"].status == "pass"


def test_missing_shm_mount_fails(tmp_path: Path) -> None:
    facts = gather_host_facts(DoctorRequirements(), shm_path=str(tmp_path / "no-shm"))
    row = by_name(run_checks(DoctorRequirements(), facts))["shm"]
    assert row.status == "fail" and "cannot stat" in row.detail and "No such file" in row.detail


def test_hugepages_and_cpus_are_read_for_real(host_facts: HostFacts) -> None:
    meminfo = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        meminfo[key] = int(rest.split()[0])
    mem = host_facts.memory
    assert mem is not None
    assert mem.hugepages_total == meminfo["HugePages_Total"]
    assert mem.hugepage_size_bytes == meminfo["Hugepagesize"] * 1024
    assert mem.mem_total_bytes == meminfo["MemTotal"] * 1024
    row = by_name(run_checks(DoctorRequirements(), host_facts))["hugepages"]
    assert row.status in ("pass", "warn") and f"{meminfo['HugePages_Total']} huge pages" in row.detail

    cpu = host_facts.cpu
    assert cpu is not None and set(cpu.usable_cpus) == os.sched_getaffinity(0)
    usable = len(cpu.usable_cpus)
    ok = by_name(run_checks(DoctorRequirements(device="cpu", cpu_ranks=usable), host_facts))["cpu"]
    assert ok.status == "pass" and f"{usable} of {os.cpu_count()} CPUs usable" in ok.detail
    over = by_name(run_checks(DoctorRequirements(device="cpu", cpu_ranks=usable + 1), host_facts))["cpu"]
    assert over.status == "fail" and f"{usable + 1} ranks need a CPU each" in over.detail
    huge = DoctorRequirements(device="cpu", memory_bytes_min=(mem.mem_total_bytes or 0) * 2)
    assert by_name(run_checks(huge, host_facts))["cpu"].status == "fail"
    assert by_name(run_checks(DoctorRequirements(), host_facts))["cpu"].status == "skip"


def test_disk_for_a_local_model_and_the_hub_cache(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "model-00001.safetensors").write_bytes(b"\0" * (3 * MiB))
    req = DoctorRequirements(model_path=str(model), model_bytes=3 * MiB)
    row = by_name(run_checks(req, gather_host_facts(req)))["disk"]
    assert row.status == "pass" and "3.0 MiB present" in row.detail and "already downloaded" in row.detail

    free = shutil.disk_usage(tmp_path).free
    hub = tmp_path / "hub"
    env = dict(os.environ, HF_HUB_CACHE=str(hub))
    big = DoctorRequirements(model_path="acme/huge-moe", model_bytes=free * 4)
    facts = gather_host_facts(big, env=env)
    assert facts.disk is not None and facts.disk.kind == "hub-cache"
    assert facts.disk.directory == str(hub / "models--acme--huge-moe") and not facts.disk.exists
    assert facts.disk.checked_path == str(tmp_path)
    row = by_name(run_checks(big, facts))["disk"]
    assert row.status == "fail" and "Hugging Face cache" in row.detail and "still to download" in row.detail

    blobs = hub / "models--acme--small-moe" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / "abc123").write_bytes(b"\0" * MiB)
    small = DoctorRequirements(model_path="acme/small-moe", model_bytes=2 * MiB)
    facts = gather_host_facts(small, env=env)
    assert facts.disk is not None and facts.disk.present_bytes == MiB
    row = by_name(run_checks(small, facts))["disk"]
    assert row.status == "pass" and "1.0 MiB still to download" in row.detail

    nowhere = DoctorRequirements(model_path=str(tmp_path / "not" / "there" / "x"))
    row = by_name(run_checks(nowhere, gather_host_facts(nowhere)))["disk"]
    assert row.status == "fail" and "does not exist" in row.detail


def test_python_probe_locates_vllm_and_modules_without_importing() -> None:
    req = DoctorRequirements(needed_modules=("json", "widep_no_such_module", "widep_no_such_module|json"))
    facts = gather_host_facts(req, python=sys.executable)
    py = facts.python
    assert py is not None and py.error is None
    assert py.executable == sys.executable and py.version == ".".join(map(str, sys.version_info[:3]))
    rows = by_name(run_checks(req, facts))
    assert rows["python"].status == "pass" and "located, not imported" in rows["python"].detail
    assert rows["module:json"].status == "pass" and "located (not imported)" in rows["module:json"].detail
    missing = rows["module:widep_no_such_module"]
    assert missing.status == "fail" and missing.detail == f"widep_no_such_module not found in {sys.executable}"
    either = rows["module:widep_no_such_module|json"]  # "a|b": json satisfies it
    assert either.status == "pass" and "(for widep_no_such_module|json)" in either.detail

    spec = importlib.util.find_spec("vllm")
    vllm_row = rows["vllm"]
    if spec is None:
        assert vllm_row.status == "fail" and "vllm not found" in vllm_row.detail
    else:
        dists = importlib.metadata.packages_distributions().get("vllm", [])
        version = importlib.metadata.version(dists[0])
        assert vllm_row.status == "pass" and vllm_row.detail.startswith(f"vllm {version}")
        assert py.module("vllm").imported is False  # located only: importing vLLM takes seconds
        wrong = by_name(run_checks(replace(req, vllm_version="0.1.0"), facts))["vllm"]
        assert wrong.status == "fail" and "rendered for 0.1.0" in wrong.detail


def test_python_probe_import_mode_reports_import_errors(tmp_path: Path) -> None:
    """The interpreter is this one started with -S (no site-packages) through a wrapper script, so
    that import mode does not spend seconds importing vLLM; PYTHONPATH still reaches the module."""
    pkg = tmp_path / "widep_broken_mod"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('libfoo.so.1: cannot open shared object file')\n")
    python = tmp_path / "python-nosite"
    python.write_text(f"#!/bin/sh\nexec '{sys.executable}' -S \"$@\"\n")
    python.chmod(0o755)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    req = DoctorRequirements(needed_modules=("widep_broken_mod", "json"))
    located = gather_host_facts(req, python=str(python), env=env)
    assert by_name(run_checks(req, located))["module:widep_broken_mod"].status == "pass"
    imported = gather_host_facts(req, python=str(python), env=env, import_modules=True)
    assert imported.python is not None and imported.python.module("vllm") is not None
    assert imported.python.module("vllm").found is False  # no site-packages: nothing slow to import
    rows = by_name(run_checks(req, imported))
    assert rows["module:widep_broken_mod"].status == "fail"
    assert "failed to import: ImportError: libfoo.so.1" in rows["module:widep_broken_mod"].detail
    assert rows["module:json"].status == "pass" and " imported at " in rows["module:json"].detail


def test_cpu_ep_needs_widep_plugin_where_vllm_runs(tmp_path: Path) -> None:
    """An interpreter without widep (this one with -S, from a directory without the source tree): the CPU EP
    topology's plugin row fails and says what to install."""
    python = tmp_path / "python-nosite"
    python.write_text(f"#!/bin/sh\ncd '{tmp_path}' && exec '{sys.executable}' -S \"$@\"\n")
    python.chmod(0o755)
    req = _req("tiny-moe-cpu-dp2", 0)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    row = by_name(run_checks(req, gather_host_facts(req, python=str(python), env=env)))["module:widep.vllm_cpu_ep"]
    assert row.status == "fail" and "widep's vLLM plugin (widep.vllm_cpu_ep) not found" in row.detail
    assert "pip install widep" in row.fix


def test_python_that_is_missing_or_hangs(tmp_path: Path) -> None:
    req = DoctorRequirements(needed_modules=("deep_ep",))
    facts = gather_host_facts(req, python=str(tmp_path / "bin" / "python3"))
    rows = by_name(run_checks(req, facts))
    assert rows["python"].status == "fail" and "not found" in rows["python"].detail
    assert rows["vllm"].status == "fail" and "cannot see vLLM" in rows["vllm"].detail
    assert rows["module:deep_ep"].status == "fail" and "cannot see deep_ep" in rows["module:deep_ep"].detail

    slow = tmp_path / "slow-python"
    slow.write_text("#!/bin/sh\nsleep 30\n")
    slow.chmod(0o755)
    t0 = time.perf_counter()
    facts = gather_host_facts(req, python=str(slow), timeout_s=0.5)
    assert time.perf_counter() - t0 < 5
    assert facts.python is not None and facts.python.error == f"{slow} did not finish within 0.5 s"


def _fake_nvidia_smi(bin_dir: Path, body: str) -> dict[str, str]:
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\n" + body + "\n")
    smi.chmod(0o755)
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ.get('PATH', '')}")


def test_nvidia_smi_output_hang_and_error_are_reported(tmp_path: Path) -> None:
    """A stand-in nvidia-smi (shell script), because the real one cannot run here: it replays the
    ``nvidia-smi -q -x`` output captured on an H100 through the device tool, hangs, or fails the way
    nvidia-smi does without a driver. The parsing and subprocess handling under test are real."""
    capture = DATA / "nvidia-smi-q-x-h100x1-busy.xml"
    env = _fake_nvidia_smi(tmp_path / "ok", f"cat '{capture}'")
    req = DoctorRequirements(gpus_needed=1, gpu_kind="H100")
    facts = gather_host_facts(req, env=env)
    assert facts.gpu is not None and facts.gpu.source == "nvidia-smi"
    assert facts.gpu.attempts == ("nvidia-smi: ok",)
    rows = by_name(run_checks(req, facts))
    assert rows["gpus"].status == "pass" and "NVIDIA H100 80GB HBM3" in rows["gpus"].detail
    assert rows["driver"].detail == "driver 580.159.04, CUDA 13.0 (via nvidia-smi)"
    assert rows["gpu-memory"].status == "warn" and "pid 516 python3 4614 MiB" in rows["gpu-memory"].detail

    env = _fake_nvidia_smi(tmp_path / "hang", "sleep 30")
    t0 = time.perf_counter()
    facts = gather_host_facts(req, env=env, timeout_s=0.5)
    assert time.perf_counter() - t0 < 5
    assert facts.gpu is not None and not facts.gpu.seen
    assert facts.gpu.attempts[0].startswith("nvidia-smi did not answer within 0.5 s")
    assert by_name(run_checks(req, facts))["gpus"].status == "fail"

    msg = "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."
    env = _fake_nvidia_smi(tmp_path / "nodriver", f'echo "{msg}"; exit 9')
    facts = gather_host_facts(req, env=env)
    assert facts.gpu is not None and facts.gpu.attempts[0] == f"nvidia-smi exited 9: {msg}"
    assert msg in by_name(run_checks(req, facts))["gpus"].detail


def test_rdma_sysfs_layout_is_read(tmp_path: Path) -> None:
    """A sysfs/procfs tree built in tmp_path with the kernel's layout, because this machine has no
    RDMA devices and no NVIDIA driver; the reader walking it is the real one."""
    sys_root, proc_root = tmp_path / "sys", tmp_path / "proc"
    ports = {("mlx5_0", 1): ("4: ACTIVE", "5: LinkUp"), ("mlx5_1", 1): ("1: DOWN", "3: Disabled")}
    for (dev, port), (state, phys) in ports.items():
        d = sys_root / "class/infiniband" / dev / "ports" / str(port)
        d.mkdir(parents=True)
        (d / "state").write_text(state + "\n")
        (d / "phys_state").write_text(phys + "\n")
        (d / "link_layer").write_text("InfiniBand\n")
        (d / "rate").write_text("400 Gb/sec (4X NDR)\n")
    (sys_root / "module/nvidia_peermem").mkdir(parents=True)
    (proc_root / "driver/nvidia").mkdir(parents=True)
    (proc_root / "driver/nvidia/params").write_text('EnableStreamMemOPs: 1\nRegistryDwords: "PeerMappingOverride=1;"\n')
    req = DoctorRequirements(rdma=True, nvshmem=True, memlock_unlimited_needed=True)
    facts = gather_host_facts(req, sys_root=str(sys_root), proc_root=str(proc_root), dev_root=str(tmp_path))
    rdma = facts.rdma
    assert rdma is not None and rdma.sysfs_present and rdma.peermem_loaded and rdma.gdrcopy_present is False
    assert [(p.device, p.port, p.state, p.phys_state) for p in rdma.ports] == [
        ("mlx5_0", 1, "ACTIVE", "LinkUp"),
        ("mlx5_1", 1, "DOWN", "Disabled"),
    ]
    rows = by_name(run_checks(req, facts))
    assert rows["rdma"].status == "warn" and rows["rdma"].detail.startswith("1 of 2 RDMA port(s) ACTIVE")
    assert "nvidia_peermem loaded" in rows["rdma"].detail
    assert rows["ibgda"].status == "pass"


# ---------------------------------------------------------------------------------------------
# Pure checks on constructed GPU / RDMA facts (no GPU or RDMA exists on this machine)


def _gpus(n: int, name: str = "NVIDIA H200", total: int = 143771, used: int = 0, **kw: object) -> GpuFacts:
    return GpuFacts(
        source="nvidia-smi",
        gpus=tuple(
            GpuInfo(index=i, name=name, uuid=f"GPU-{i:08d}", memory_total_mib=total, memory_used_mib=used, **kw)
            for i in range(n)
        ),  # type: ignore[arg-type]
        driver_version="570.86.15",
        cuda_version="12.8",
        attempts=("nvidia-smi: ok",),
    )


def test_gpu_count_kind_and_memory_on_constructed_facts(host_facts: HostFacts) -> None:
    """Constructed GPU facts: there is no GPU on this machine."""
    req = DoctorRequirements(gpus_needed=8, gpu_kind="H200", gpu_memory_bytes=int(139.8 * GiB))
    rows = by_name(run_checks(req, replace(host_facts, gpu=_gpus(8))))
    assert rows["gpus"].status == "pass" and rows["gpus"].detail.startswith("8 GPU(s): NVIDIA H200")
    assert rows["driver"].status == "pass"

    short = by_name(run_checks(req, replace(host_facts, gpu=_gpus(4))))["gpus"]
    assert short.status == "fail" and "8 needed" in short.detail

    h100 = by_name(run_checks(req, replace(host_facts, gpu=_gpus(8, "NVIDIA H100 80GB HBM3", 81559))))["gpus"]
    assert h100.status == "fail"
    assert "planned for H200, found NVIDIA H100 80GB HBM3" in h100.detail
    assert "the plan budgets 139.8 GiB per GPU, GPU 0 has 79.6 GiB" in h100.detail

    env = host_facts.env + (("CUDA_VISIBLE_DEVICES", "0,1"),)
    cvd = by_name(run_checks(req, replace(host_facts, gpu=_gpus(8), env=env)))["gpus"]
    assert cvd.status == "warn" and "leaves 2 of 8 needed" in cvd.detail

    busy = _gpus(8, used=30000, processes=((4242, "python3", 29990),))
    row = by_name(run_checks(req, replace(host_facts, gpu=busy)))["gpu-memory"]
    assert row.status == "warn" and "GPU 0: 30000 of 143771 MiB used by pid 4242 python3 29990 MiB" in row.detail

    fabric = _gpus(8, fabric_state="In Progress", fabric_status="N/A")
    row = by_name(run_checks(req, replace(host_facts, gpu=fabric)))["driver"]
    assert row.status == "fail" and "NVSwitch fabric not ready" in row.detail and "fabricmanager" in row.fix


def test_real_nvidia_smi_capture_parses() -> None:
    """nvidia-smi -q -x captured on an H100 (device tool), serial numbers and UUIDs redacted."""
    gpus, driver, cuda = parse_nvidia_smi_xml((DATA / "nvidia-smi-q-x-h100x1.xml").read_text())
    assert (driver, cuda) == ("580.159.04", "13.0")
    assert len(gpus) == 1 and gpus[0].name == "NVIDIA H100 80GB HBM3"
    assert (gpus[0].memory_total_mib, gpus[0].memory_used_mib, gpus[0].processes) == (81559, 0, ())
    assert gpus[0].fabric_state is None  # "N/A" on this machine (no NVSwitch fabric)
    assert gpus[0].pci_bus_id == "00000000:00:06.0"
    busy, _, _ = parse_nvidia_smi_xml((DATA / "nvidia-smi-q-x-h100x1-busy.xml").read_text())
    assert busy[0].memory_used_mib == 4623 and busy[0].processes == ((516, "python3", 4614),)


@pytest.mark.parametrize(
    ("torch_cuda", "driver_cuda", "status"),
    [("12.8", "12.8", "pass"), ("12.4", "12.8", "pass"), ("12.8", "12.4", "warn"), ("13.0", "12.8", "fail")],
)
def test_torch_cuda_against_driver(host_facts: HostFacts, torch_cuda: str, driver_cuda: str, status: str) -> None:
    """Constructed GPU and torch facts: no GPU or CUDA torch on this machine."""
    gpu = replace(_gpus(1), cuda_version=driver_cuda)
    py = PythonFacts(
        requested="python", executable="/x/python", version="3.12.3", torch_version="2.9.0", torch_cuda=torch_cuda
    )
    row = by_name(run_checks(DoctorRequirements(gpus_needed=1), replace(host_facts, gpu=gpu, python=py)))["torch-cuda"]
    assert row.status == status


@pytest.mark.parametrize(
    ("have", "want", "status"),
    [
        ("0.32.0", "0.32.0", "pass"),
        ("0.32.0+cpu", "0.32.0", "pass"),
        ("0.32.1", "0.32", "pass"),
        ("0.32.1", "0.32.0", "warn"),
        ("0.31.0", "0.32.0", "fail"),
        ("0.10.2", "0.32.0", "fail"),
    ],
)
def test_vllm_version_against_topology(host_facts: HostFacts, have: str, want: str, status: str) -> None:
    from widep.doctor.facts import ModuleFacts

    py = PythonFacts(
        requested="python",
        executable="/x/python",
        version="3.12.3",
        modules=(ModuleFacts("vllm", True, "/x/vllm/__init__.py", have, "vllm"),),
    )
    row = by_name(run_checks(DoctorRequirements(vllm_version=want), replace(host_facts, python=py)))["vllm"]
    assert row.status == status, row


def test_nvshmem_settings(host_facts: HostFacts) -> None:
    assert parse_nvshmem_size("20m") == 20971520
    assert parse_nvshmem_size("3.1M") == 3250586
    assert parse_nvshmem_size(".5m") == 524288
    assert parse_nvshmem_size("20kk") == 20480  # one multiplier; the rest is ignored
    assert parse_nvshmem_size("16G") == 16 * GiB
    assert parse_nvshmem_size("lots") is None
    req = DoctorRequirements(nvshmem=True)
    base = tuple((k, v) for k, v in host_facts.env if not k.startswith("NVSHMEM_"))

    def row(*env: tuple[str, str]) -> CheckResult:
        return by_name(run_checks(req, replace(host_facts, env=base + env)))["nvshmem"]

    assert row().status == "warn" and "NVSHMEM_SYMMETRIC_SIZE unset" in row().detail
    assert row(("NVSHMEM_SYMMETRIC_SIZE", "16G")).status == "pass"
    assert row(("NVSHMEM_SYMMETRIC_SIZE", "lots")).status == "fail"
    bad = row(("NVSHMEM_SYMMETRIC_SIZE", "16G"), ("NVSHMEM_REMOTE_TRANSPORT", "ibgdaa"))
    assert bad.status == "fail" and "not a transport" in bad.detail
    off = by_name(run_checks(DoctorRequirements(), host_facts))["nvshmem"]
    assert off.status == "skip"


def test_rdma_and_ibgda_on_constructed_facts(host_facts: HostFacts) -> None:
    """Constructed RDMA facts: this machine has no RDMA devices."""
    req = DoctorRequirements(rdma=True, nvshmem=True)
    up = RdmaFacts(
        True,
        (RdmaPort("mlx5_0", 1, "ACTIVE", "LinkUp", "InfiniBand", "400 Gb/sec (4X NDR)"),),
        nvidia_params=(("EnableStreamMemOPs", "0"), ("RegistryDwords", "")),
    )
    rows = by_name(run_checks(req, replace(host_facts, rdma=up)))
    assert rows["rdma"].status == "pass"
    assert rows["ibgda"].status == "warn" and "NVreg_EnableStreamMemOPs=1" in rows["ibgda"].fix
    down = RdmaFacts(True, (RdmaPort("mlx5_0", 1, "DOWN", "Polling"),))
    assert by_name(run_checks(req, replace(host_facts, rdma=down)))["rdma"].status == "fail"
    empty = RdmaFacts(True, ())
    row = by_name(run_checks(req, replace(host_facts, rdma=empty)))["rdma"]
    assert row.status == "fail" and "has no devices" in row.detail
    absent = RdmaFacts(False)
    row = by_name(run_checks(req, replace(host_facts, rdma=absent)))["rdma"]
    assert row.status == "fail" and "/sys/class/infiniband absent" in row.detail
    assert by_name(run_checks(DoctorRequirements(), replace(host_facts, rdma=absent)))["rdma"].status == "skip"
    no_driver = by_name(run_checks(req, replace(host_facts, rdma=absent)))["ibgda"]
    assert no_driver.status == "skip" and "cannot see the IBGDA driver options" in no_driver.detail


def test_socket_ifname_variables(host_facts: HostFacts) -> None:
    names = ["lo", "eth0", "ib0", "docker0"]
    assert ifname_matches("eth", names, prefix=True) == ["eth0"]
    assert ifname_matches("=eth", names, prefix=True) == []
    assert ifname_matches("^lo,docker", names, prefix=True) == ["eth0", "ib0"]
    assert ifname_matches("eth", names, prefix=False) == []
    present = host_facts.interfaces.names if host_facts.interfaces else ()
    base = tuple((k, v) for k, v in host_facts.env if not k.endswith("SOCKET_IFNAME"))
    good = replace(host_facts, env=base + (("NCCL_SOCKET_IFNAME", "lo"),))
    assert by_name(run_checks(DoctorRequirements(), good))["ifname-env"].status == "pass"
    bad = replace(host_facts, env=base + (("GLOO_SOCKET_IFNAME", "widep-nope0"),))
    row = by_name(run_checks(DoctorRequirements(), bad))["ifname-env"]
    assert row.status == "fail" and "GLOO_SOCKET_IFNAME='widep-nope0' → no interface" in row.detail
    assert f"present: {', '.join(present)}" in row.detail


def test_gpu_kind_matching() -> None:
    assert gpu_kind_matches("H100", "NVIDIA H100 80GB HBM3")
    assert gpu_kind_matches("h200", "NVIDIA H200")
    assert gpu_kind_matches("GB200", "NVIDIA GB200")
    assert not gpu_kind_matches("H200", "NVIDIA H100 80GB HBM3")
    assert not gpu_kind_matches("B200", "NVIDIA GB200")


def test_summarize_and_requirement_errors() -> None:
    rows = [CheckResult("a", "pass", "x"), CheckResult("b", "warn", "y", "f"), CheckResult("c", "skip", "z")]
    assert summarize(rows) == 0
    assert summarize(rows + [CheckResult("d", "fail", "w", "f")]) == 1
    with pytest.raises(UserError, match=r"device: Given: 'tpu'\. Valid: 'cuda' or 'cpu'\."):
        DoctorRequirements(device="tpu")  # type: ignore[arg-type]
    with pytest.raises(UserError, match=r"gpus_needed: Given: -1\. Valid: an integer >= 0\."):
        DoctorRequirements(gpus_needed=-1)
    with pytest.raises(UserError, match=r"ports: Given: h:70000"):
        DoctorRequirements(ports=(("h", 70000),))
    assert parse_port_spec("127.0.0.1:8000") == ("127.0.0.1", 8000)
    assert parse_port_spec("[::1]:8000") == ("::1", 8000)
    assert parse_port_spec("8000") == ("0.0.0.0", 8000)
    with pytest.raises(UserError, match=r"--port: Given: 'abc'\. Valid: HOST:PORT"):
        parse_port_spec("abc")
    assert parse_size("16G") == 16 * GiB and parse_size("700GB") == 700 * 10**9 and parse_size("1.5GiB") == 3 * GiB // 2
    with pytest.raises(UserError, match=r"--shm-min: Given: '2 parsecs'"):
        parse_size("2 parsecs", field_name="--shm-min")


# ---------------------------------------------------------------------------------------------
# Requirements from committed topologies


def _req(name: str, node: int) -> DoctorRequirements:
    return requirements_from_plan(plan(load_topology(TOPOLOGIES / f"{name}.yaml")), node)


def test_requirements_from_pd_topology() -> None:
    p = plan(load_topology(TOPOLOGIES / "deepseek-r1-pd-3x8-h200.yaml"))
    prefill = requirements_from_plan(p, 0)
    assert (prefill.device, prefill.gpus_needed, prefill.gpu_kind) == ("cuda", 8, "H200")
    assert prefill.gpu_memory_bytes == int(p.gpu.memory_gib * GiB)
    assert prefill.needed_modules == ("deep_ep", "deep_gemm|vllm.third_party.deep_gemm", "nixl")
    assert prefill.rdma and prefill.memlock_unlimited_needed and prefill.nvshmem
    assert prefill.interfaces == ("eth0",) and prefill.vllm_version == "0.34.0"
    assert prefill.model_path == "deepseek-ai/DeepSeek-R1"
    assert 600 * GiB < (prefill.model_bytes or 0) < 700 * GiB
    assert prefill.shm_bytes_min == 2 * GiB  # 1 GiB + 128 MiB x 8 local ranks
    http = {port for host, port in prefill.ports if host == "0.0.0.0"}
    assert http == set(range(8000, 8008)) | {p.spec.serving.control_port}  # + widep's group control
    assert ("10.0.0.10", 29550) in prefill.ports  # the prefill group's DP handshake on its leader
    assert {port for host, port in prefill.ports if host == "10.0.0.10"} == set(range(5600, 5608)) | {29550}

    leader, follower = requirements_from_plan(p, 1), requirements_from_plan(p, 2)
    assert ("10.0.0.11", 29550) in leader.ports
    assert ("0.0.0.0", p.spec.serving.control_port + 1) in leader.ports  # decode is role 1
    assert not any(port in (29550, p.spec.serving.control_port + 1) for _, port in follower.ports)
    assert {port for host, port in follower.ports if host == "10.0.0.12"} == set(range(5608, 5616))

    with pytest.raises(UserError, match=r"--node: Given: 3\. Valid for topology deepseek-r1-pd-3x8-h200: 0 \(h200-0\)"):
        requirements_from_plan(p, 3)


def test_requirements_from_cpu_and_single_node_topologies() -> None:
    dp2 = _req("tiny-moe-cpu-dp2", 1)
    assert (dp2.device, dp2.gpus_needed, dp2.cpu_ranks) == ("cpu", 0, 1)
    assert dp2.ports == (("127.0.0.2", 8100),)  # host: node → the pretend node's own address
    assert dp2.model_path is None and not dp2.rdma
    assert dp2.needed_modules == ("widep.vllm_cpu_ep",)  # EP on CPU answers only through widep's vLLM plugin
    assert _req("tiny-moe-cpu", 0).needed_modules == ()  # one rank, no EP: no plugin needed
    assert dp2.memory_bytes_min is not None and dp2.memory_bytes_min > GiB  # weights + 1 GiB KV
    leader = _req("tiny-moe-cpu-dp2", 0)
    control = plan(load_topology(TOPOLOGIES / "tiny-moe-cpu-dp2.yaml")).roles[0].control_port
    assert leader.ports == (("127.0.0.1", 8100), ("127.0.0.1", 29650), ("127.0.0.1", control))

    qwen = _req("qwen3-30b-a3b-1x2-h100", 0)
    assert (qwen.gpus_needed, qwen.gpu_kind, qwen.needed_modules, qwen.rdma) == (2, "H100", (), False)

    single = _req("deepseek-r1-decode-2x8-h200", 0)
    assert single.needed_modules == ("deep_ep", "deep_gemm|vllm.third_party.deep_gemm")
    assert single.rdma  # the DeepEP group spans two nodes


def test_a_node_without_ranks_is_refused() -> None:
    spec = parse_topology(
        {
            "name": "idle-node",
            "model": {"preset": "tiny-moe"},
            "cluster": {"gpu": "CPU", "gpus_per_node": 1, "nodes": [{"name": "a"}, {"name": "b"}]},
            "roles": [
                {
                    "name": "serve",
                    "nodes": ["a"],
                    "enforce_eager": True,
                    "max_model_len": 1024,
                    "max_num_batched_tokens": 2048,
                    "max_num_seqs": 16,
                }
            ],
        }
    )
    with pytest.raises(
        UserError, match=r"--node: Given: 1 \(b\), which runs no rank of topology idle-node\. Valid: 0 \(a\)"
    ):
        requirements_from_plan(plan(spec), 1)


def test_check_host_runs_the_same_checks() -> None:
    req = _req("tiny-moe-cpu-dp2", 1)
    results, facts = check_host(req, python=sys.executable)
    assert {r.name for r in results} == ALL_CHECKS | {"module:widep.vllm_cpu_ep"}
    assert by_name(results)["module:widep.vllm_cpu_ep"].status == "pass"  # this interpreter has widep
    assert facts.ports and facts.ports[0].host == "127.0.0.2"


# ---------------------------------------------------------------------------------------------
# CLI


def test_pick_node_and_vllm_script_interpreter(tmp_path: Path) -> None:
    nodes = [("h200-0", "10.0.0.10"), ("h200-1", "10.0.0.11")]
    assert pick_node(nodes, "h200-1.cluster.local", set()) == 1
    assert pick_node(nodes, "other", {"10.0.0.10"}) == 0
    assert pick_node([("solo", None)], "anything", set()) == 0
    with pytest.raises(
        UserError, match=r"cannot tell which node this host is: host name 'vm'.*--node 0 \(h200-0, 10\.0\.0\.10\)"
    ):
        pick_node(nodes, "vm", {"192.0.2.2"})
    script = tmp_path / "vllm"
    script.write_text("#!/opt/venv/bin/python3.12\nimport sys\n")
    assert interpreter_of_script(str(script)) == "/opt/venv/bin/python3.12"
    script.write_text("#!/usr/bin/env sh\n")
    assert interpreter_of_script(str(script)) == shutil.which("sh")
    assert interpreter_of_script(None) is None


def test_cli_json_reports_a_taken_port_and_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen(1)
    port = held.getsockname()[1]
    try:
        rc = main(
            [
                "doctor",
                "--device",
                "cpu",
                "--python",
                sys.executable,
                "--port",
                f"127.0.0.1:{port}",
                "--iface",
                "lo",
                "--json",
            ]
        )
    finally:
        held.close()
    doc = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r for r in doc["results"]}
    assert rc == 1 == doc["summary"]["exit_code"]
    assert rows["ports"]["status"] == "fail" and f"127.0.0.1:{port} (address already in use)" in rows["ports"]["detail"]
    assert rows["interfaces"]["status"] == "pass"
    assert doc["requirements"]["ports"] == [["127.0.0.1", port]]
    assert doc["facts"]["python"]["executable"] == sys.executable
    assert sum(doc["summary"][s] for s in ("pass", "warn", "fail", "skip")) == len(doc["results"])


def test_cli_table_and_user_errors(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["doctor", "--device", "cpu", "--python", sys.executable, "--iface", "widep-nope0"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "FAIL" in out and "missing: widep-nope0" in out and "FAIL: fix the failed checks" in out
    assert main(["doctor", "--port", "abc"]) == 2
    assert "--port: Given: 'abc'. Valid: HOST:PORT" in capsys.readouterr().err
    assert main(["doctor", "--node", "1"]) == 2
    assert "--node: Given: 1 without a topology" in capsys.readouterr().err
    assert main(["doctor", "--shm-min", "lots"]) == 2
    assert "--shm-min: Given: 'lots'" in capsys.readouterr().err


def test_whole_doctor_run_takes_under_two_seconds() -> None:
    """A fresh process, as a user runs it: interpreter start, topology plan, facts, checks, JSON."""
    argv = [
        sys.executable,
        "-m",
        "widep.cli",
        "doctor",
        str(TOPOLOGIES / "tiny-moe-cpu-dp2.yaml"),
        "--node",
        "1",
        "--python",
        sys.executable,
        "--json",
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO)
    wall = time.perf_counter() - t0
    doc = json.loads(proc.stdout)
    assert proc.returncode == doc["summary"]["exit_code"], proc.stderr
    assert {r["name"] for r in doc["results"]} == ALL_CHECKS | {"module:widep.vllm_cpu_ep"}
    print(
        f"\nwhole doctor run: {wall:.2f} s wall (facts {doc['summary']['gather_seconds']:.2f} s, "
        f"in-process total {doc['summary']['total_seconds']:.2f} s)"
    )
    assert wall < 2.0, f"doctor took {wall:.2f} s"
