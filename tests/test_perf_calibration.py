"""Calibration files: the published one, GPU measurements (profiling/results), errors for people."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import yaml

from widep.errors import UserError
from widep.perf.calibration import FORMAT, load_calibration, parse_calibration, published

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED_YAML = ROOT / "widep" / "perf" / "data" / "calibration-published.yaml"


def _doc() -> dict:
    return yaml.safe_load(PUBLISHED_YAML.read_text())


def test_published_loads_with_every_backend() -> None:
    cal = published()
    assert cal.name == "published"
    assert set(cal.backends) >= {"deepep_low_latency", "deepep_high_throughput", "allgather_reducescatter", "pplx"}
    ll = cal.a2a_for("deepep_low_latency")
    # DeepEP LL EP128: 192 us dispatch at 128 tokens x top-8 x 7392 B, less the fixed latency
    assert ll.internode_gbps(128, "dispatch") == pytest.approx(128 * 8 * 7392 / ((192 - ll.latency_us) * 1e-6) / 1e9)
    # held flat beyond the table, interpolated in log2(EP) inside it
    assert ll.internode_gbps(1024, "combine") == pytest.approx(ll.internode_gbps(256, "combine"))
    mid = ll.internode_gbps(24, "dispatch")
    assert (
        min(ll.internode_gbps(16, "dispatch"), ll.internode_gbps(32, "dispatch"))
        <= mid
        <= max(ll.internode_gbps(16, "dispatch"), ll.internode_gbps(32, "dispatch"))
    )
    assert cal.fingerprint() == published().fingerprint()


def test_json_and_yaml_of_the_same_figures_agree(tmp_path: Path) -> None:
    p = tmp_path / "cal.json"
    p.write_text(json.dumps(_doc()))
    cal = load_calibration(p)
    assert cal.fingerprint() == published().fingerprint()
    assert cal.source == str(p)


def test_changed_figure_changes_the_fingerprint(tmp_path: Path) -> None:
    doc = _doc()
    doc["hbm"]["weights_efficiency"] = 0.5
    p = tmp_path / "cal.yaml"
    p.write_text(yaml.safe_dump(doc))
    cal = load_calibration(p)
    assert cal.hbm_weights_efficiency == 0.5
    assert cal.fingerprint() != published().fingerprint()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(format="nope/1"), "format 'nope/1'"),
        (lambda d: d["hbm"].pop("weights_efficiency"), "missing 'hbm.weights_efficiency'"),
        (
            lambda d: d["hbm"].update(weights_efficiency=1.7),
            r"hbm.weights_efficiency must be a number in \[0.001, 1.0\]. Given: 1.7",
        ),
        (lambda d: d["a2a"]["pplx"].update(bytes_model="per_token"), "bytes_model 'per_token' is not valid"),
        (lambda d: d["a2a"]["pplx"]["internode"].update(ep=[16, 32]), "equal-length"),
        (lambda d: d["a2a"]["pplx"]["intranode"].update(dispatch_us=10), "must exceed latency_us"),
    ],
)
def test_bad_calibration_is_explained(edit, message: str) -> None:
    doc = _doc()
    edit(doc)
    with pytest.raises(UserError, match=message):
        parse_calibration(doc, "x.yaml")


def test_missing_file_is_explained() -> None:
    with pytest.raises(UserError, match="no such file 'nope.yaml'. Valid: 'published'"):
        load_calibration("nope.yaml")


COMMITTED = sorted((ROOT / "profiling" / "results").glob("calibration-*x*.json"))


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.name)
def test_committed_gpu_calibrations_load(path: Path) -> None:
    """Every calibration-<card>x<N>.json under profiling/results (written by make_calibration.py) loads."""
    doc = json.loads(path.read_text())
    cal = load_calibration(path)
    assert cal.measured["card"].lower() == doc["card"].lower()
    assert cal.name.startswith("measured-")
    assert cal.fingerprint() != published().fingerprint()
    if doc.get("hbm_gbps_effective"):
        assert 0 < cal.hbm_weights_efficiency <= 1
        assert "hbm_weights_efficiency" in cal.measured["replaced"]
    if not (doc.get("a2a", {}).get("deep_ep") or {}).get("importable"):
        assert cal.a2a == published().a2a  # NCCL stands in for nothing: DeepEP tables stay published


def _measured_doc() -> dict:
    """A widep-calibration/1 document with the fields make_calibration.py documents (values invented)."""
    return {
        "format": "widep-calibration/1",
        "card": "h200",
        "device_name": "NVIDIA H200",
        "gpus": 2,
        "hbm_gbps_effective": 4320.0,
        "hbm": {"paged_kv_read_gbps": {"bf16_576": {"64": {"bytes": [1, 2], "gbps": [3000.0, 4100.0]}}}},
        "matmul_peak_tflops": {"bf16": 700.0, "fp8": 1300.0},
        "gemm": {"fp8": {"impl": "fp8_grouped_rowwise", "tflops_at_tokens": {"1": 4.0, "64": 300.0, "1024": 990.0}}},
        "a2a": {"nccl": {}, "deep_ep": {"importable": False}},
    }


def test_measured_calibration_replaces_what_it_measured(tmp_path: Path) -> None:
    p = tmp_path / "calibration-h200x2.json"
    p.write_text(json.dumps(_measured_doc()))
    cal = load_calibration(p)
    assert cal.hbm_weights_efficiency == pytest.approx(4320 / 4800)
    assert cal.hbm_kv_read_efficiency == pytest.approx(4100 / 4800)
    assert cal.gemm_fp8_efficiency == pytest.approx(1300 / 1979)
    assert cal.gemm_bf16_efficiency == pytest.approx(700 / 989)
    assert cal.grouped_curve == ((1.0, 4.0 / 1979), (64.0, 300.0 / 1979), (1024.0, 990.0 / 1979))
    assert cal.attention_decode_efficiency == published().attention_decode_efficiency  # not measured: kept
    assert cal.measured["deep_ep_measured"] is False and "a2a_note" in cal.measured


def test_measured_calibration_of_unknown_card(tmp_path: Path) -> None:
    doc = _measured_doc() | {"card": "tpu-v9"}
    p = tmp_path / "c.json"
    p.write_text(json.dumps(doc))
    with pytest.raises(UserError, match="card 'tpu-v9' is not a GPU kind widep knows"):
        load_calibration(p)


def test_auto_picks_the_newest_measurement_of_the_gpu(tmp_path: Path) -> None:
    assert load_calibration("auto:H200", results_dir=tmp_path).name == "published"
    old, new = tmp_path / "calibration-h200x1.json", tmp_path / "calibration-h200x2.json"
    for path, gpus in ((old, 1), (new, 2)):
        path.write_text(json.dumps(_measured_doc() | {"gpus": gpus}))
    now = time.time()
    os.utime(old, (now - 100, now - 100))
    assert load_calibration("auto:H200", results_dir=tmp_path).name == "measured-h200x2"
    assert load_calibration("auto:H100", results_dir=tmp_path).name == "published"


def test_grouped_curve_drives_expert_time() -> None:
    """A measured grouped-GEMM curve replaces the tile-padded roofline for expert GEMMs."""
    import dataclasses

    import numpy as np

    from widep.perf.model import ArchConst, RoleBatch, RoleInput, step_time
    from widep.spec.hardware import get_gpu
    from widep.spec.models import load_preset

    a = ArchConst.of(load_preset("deepseek-r1"), "fp8", "bf16")
    r = RoleInput(
        kind="decode",
        gpu=get_gpu("H200"),
        tp=1,
        dp=16,
        ep=16,
        replicas=1,
        nodes=2,
        expert_parallel=True,
        physical_experts=256,
        redundant=0,
        eplb=False,
        dbo=False,
        dbo_decode_threshold=32,
        dbo_prefill_threshold=512,
        backend="deepep_low_latency",
        cuda_graphs=True,
        max_num_batched_tokens=8192,
        max_num_seqs=256,
        kv_tokens=10**6,
    )
    # without the kernel-true DeepGEMM terms (which take precedence), a measured curve prices the experts
    slow = dataclasses.replace(published(), expert_gemm=None, grouped_curve=((1.0, 0.01), (4096.0, 0.05)))
    fast = dataclasses.replace(published(), expert_gemm=None, grouped_curve=((1.0, 0.5), (4096.0, 0.9)))
    t_slow = step_time(RoleBatch.build(a, [r], slow), slow, 4096, 1, 100, 0, 0).experts
    t_fast = step_time(RoleBatch.build(a, [r], fast), fast, 4096, 1, 100, 0, 0).experts
    assert float(t_slow[0, 0]) > 5 * float(t_fast[0, 0])
    assert np.isfinite(t_fast).all()


def test_format_constant() -> None:
    assert _doc()["format"] == FORMAT


def test_calibration_document_round_trips_and_hardware_overrides(tmp_path) -> None:
    """What widep calibrate writes reads back to the same figures; measured hardware replaces the datasheet's."""
    import dataclasses

    import yaml

    from widep.perf.calibrate import calibration_document
    from widep.perf.calibration import load_calibration, published
    from widep.perf.model import ArchConst, RoleBatch, RoleInput, step_time
    from widep.spec.hardware import get_gpu
    from widep.spec.models import load_preset

    cal = published()
    path = tmp_path / "cal.yaml"
    path.write_text(yaml.safe_dump(calibration_document(cal), sort_keys=False))
    back = load_calibration(path)
    assert back.fingerprint() == cal.fingerprint()
    slow = dataclasses.replace(cal, hardware={"H200": {"hbm_tbps": 1.0}})
    path.write_text(yaml.safe_dump(calibration_document(slow), sort_keys=False))
    assert load_calibration(path).hardware == {"H200": {"hbm_tbps": 1.0}}
    arch = ArchConst.of(load_preset("deepseek-r1"), "fp8", "bf16")
    r = RoleInput(
        kind="decode",
        gpu=get_gpu("H200"),
        tp=1,
        dp=16,
        ep=16,
        replicas=1,
        nodes=2,
        expert_parallel=True,
        physical_experts=256,
        redundant=0,
        eplb=False,
        dbo=False,
        dbo_decode_threshold=32,
        dbo_prefill_threshold=512,
        backend="deepep_low_latency",
        cuda_graphs=True,
        max_num_batched_tokens=8192,
        max_num_seqs=256,
        kv_tokens=1_000_000,
    )
    fast = step_time(RoleBatch.build(arch, [r], cal), cal, 64, 1, 2000, 0, 0).total[0, 0]
    slowed = step_time(RoleBatch.build(arch, [r], slow), slow, 64, 1, 2000, 0, 0).total[0, 0]
    assert slowed > 2 * fast  # 1 TB/s instead of 4.8: the memory-bound decode step slows accordingly
    bad = calibration_document(cal) | {"hardware": {"H200": {"hbm_tbps": -1}}}
    path.write_text(yaml.safe_dump(bad, sort_keys=False))
    with pytest.raises(UserError, match="hardware.H200.hbm_tbps"):
        load_calibration(path)
