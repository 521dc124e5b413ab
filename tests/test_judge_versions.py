"""The 0.33 and 0.34 lines judged by their own wheels' parsers (widep.render.judge_env).

The judge environments are installed by scripts/dev setup (CI); on a machine without them these tests skip,
except under CI=true, where a missing judge environment is a failure.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from widep.errors import UserError
from widep.plan import plan as make_plan
from widep.plan import rules
from widep.render import judge_env
from widep.render.judge import judge
from widep.spec.topology import load_topology
from widep.spec.vllm_options import load_table
from widep.spec.vllm_versions import table_for

ROOT = Path(__file__).resolve().parent.parent
R1_DECODE = ROOT / "topologies" / "deepseek-r1-decode-2x8-h200.yaml"


def _need(version: str) -> dict[str, str]:
    if not judge_env.installed(version):
        if os.environ.get("CI") == "true":
            pytest.fail(f"no judge environment for vLLM {version}: scripts/dev setup installs it")
        pytest.skip(f"no judge environment for vLLM {version} (python -m widep.render.judge_env install {version})")
    return judge_env.judge_env(version)


def test_versions_select_their_own_line() -> None:
    assert table_for("0.32.0").line == "0.3x"
    assert table_for("0.33.0").line == "0.33"
    assert table_for("0.34.0").line == "0.34"
    assert table_for("0.34.0").eplb_auto_redundancy and not table_for("0.33.0").eplb_auto_redundancy
    assert table_for("0.33.0").bool_flag_style == "disable" and table_for("0.32.0").bool_flag_style == "no"


def test_a_backend_a_version_lacks_names_the_version_and_the_alternative() -> None:
    def refusal(version: str, backend: str) -> rules.Refusal | None:
        t = table_for(version)
        return rules.backend_runs(backend, version, t.line, t.all2all_backends, t.removed_backends)

    assert refusal("0.34.0", "mori") is None
    refused = refusal("0.33.0", "mori")
    assert refused is not None
    msg = refused.message
    assert "0.33.0" in msg and "mori_high_throughput" in msg and "0.34" in msg


def test_plan_refuses_mori_on_033_and_warns_that_mori_ht_is_deprecated_on_034() -> None:
    spec = load_topology(R1_DECODE)

    def with_backend(version: str, backend: str):
        off = {"enabled": False}  # this topology's DBO needs a DeepEP backend
        roles = [
            r.model_copy(update={"all2all_backend": backend, "dbo": r.dbo.model_copy(update=off)}) for r in spec.roles
        ]
        vllm = spec.vllm.model_copy(update={"version": version})
        return spec.model_copy(update={"roles": roles, "vllm": vllm})

    with pytest.raises(UserError) as err:
        make_plan(with_backend("0.33.0", "mori"))
    assert "vLLM 0.33.0" in str(err.value)
    p = make_plan(with_backend("0.34.0", "mori_high_throughput"))
    warned = [w for rp in p.roles for w in rp.warnings] + list(p.warnings)
    assert any("deprecated in vLLM 0.34.0" in w and "'mori'" in w for w in warned), warned


@pytest.mark.vllm
@pytest.mark.timeout(400)
@pytest.mark.parametrize("version", ["0.33.0", "0.34.0"])
def test_render_check_passes_by_the_versions_own_parser(version: str) -> None:
    """The done-when command: every rank of the DeepSeek-R1 decode topology, judged by vLLM <version>."""
    _need(version)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "widep", "render", str(R1_DECODE), "--vllm-version", version, "--check"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=380, env=env, cwd=ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert f"judged by vLLM {version} on cpu:" in out
    verdicts = [line for line in out.splitlines() if line.startswith("  decode/")]
    assert len(verdicts) == 16, out[-3000:]
    assert all(": ok; checks: parse, serve_args, engine_args, engine_config" in v for v in verdicts), verdicts


@pytest.mark.vllm
@pytest.mark.timeout(300)
def test_the_034_judge_tells_what_033_refuses(tiny_moe_dir) -> None:
    """One argv per fact the 0.33/0.34 lines differ in, judged by both wheels."""
    argvs = [
        ["--model", "m", "--enable-expert-parallel", "--all2all-backend", "mori"],
        ["--model", "m", "--no-enable-prefix-caching"],  # gone from the option table, still accepted
        ["--model", "m", "--disable-prefix-caching"],
        ["--model", "m", "--all2all-backend", "deepep_ll"],
    ]
    got = {}
    for version in ("0.33.0", "0.34.0"):
        j = judge(argvs, sys.executable, model_override=tiny_moe_dir, extra_env=_need(version))
        assert j.vllm_version == version
        got[version] = [v.ok for v in j.verdicts]
        assert "deepep_ll" in (j.verdicts[3].error or "")
    assert got["0.34.0"] == [True, True, True, False]
    assert got["0.33.0"] == [False, True, True, False]


@pytest.mark.vllm
@pytest.mark.timeout(300)
@pytest.mark.parametrize("version", ["0.33.0", "0.34.0"])
def test_shipped_option_table_is_the_wheels_parser(version: str) -> None:
    """Drift check: the option table widep ships for the line equals the one the wheel's parser gives."""
    env = {**os.environ, **_need(version)}
    env["PYTHONPATH"] = env["PYTHONPATH"] + os.pathsep + str(ROOT)
    code = (
        "import json; from widep.spec.vllm_options import installed_parser, generate_table; "
        "from widep.spec.vllm_versions import table_for; p, v = installed_parser(); "
        "print(json.dumps(generate_table(p, v, table_for(v).line)))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=280, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = json.loads(proc.stdout.strip().splitlines()[-1])
    assert table["vllm_version"] == version
    assert table == load_table(table_for(version).line), "regenerate: see widep/spec/vllm_options.py"


def test_doctor_names_the_installed_version_and_the_line_render_uses() -> None:
    from widep.doctor.checks import _render_line

    assert _render_line("0.32.0") == "vLLM 0.32.0, line 0.3x (0.20-0.32)"
    assert _render_line("0.34.0") == "vLLM 0.34.0, line 0.34 (0.34-0.39)"
    assert "does not render for" in _render_line("0.9.0")


# ---------------------------------------------------------------- the wide-EP choices of the schema, per version


def _topology(tmp_path: Path, version: str | None = None, mode: str | None = None, **role: object) -> Path:
    """The DeepSeek-R1 decode topology with ``role``'s fields replaced (and vllm.version / serving.dp_mode)."""
    import yaml

    d = yaml.safe_load(R1_DECODE.read_text())
    d["roles"][0].update(role)
    if version:
        d.setdefault("vllm", {})["version"] = version
    if mode:
        d.setdefault("serving", {})["dp_mode"] = mode
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


EPLB16 = {"enabled": True, "redundant_experts": 16}
REFUSED = [
    # (what, version, dp_mode, role fields, field named, the version and the alternative in the message)
    ("mori before 0.34", "0.33.0", None, {"all2all_backend": "mori", "dbo": {"enabled": False}},
     "roles[0].all2all_backend", ["vLLM 0.33.0", "mori_high_throughput", "vllm.version 0.34"]),
    ("passthrough is internal", "0.34.0", None, {"all2all_backend": "passthrough", "dbo": {"enabled": False}},
     "roles[0].all2all_backend", ["vLLM 0.34.0", "not selectable from the CLI", "allgather_reducescatter"]),
    ("DBO with deepep_v2", "0.34.0", None, {"all2all_backend": "deepep_v2"},
     "roles[0].dbo.enabled", ["vLLM 0.34.0", "deepep_low_latency", "dbo.enabled: false"]),
    ("DBO with mori", "0.34.0", None, {"all2all_backend": "mori"},
     "roles[0].dbo.enabled", ["vLLM 0.34.0", "nixl_ep"]),
    ("EPLB auto before 0.34", "0.33.0", None, {"eplb": {"enabled": True, "redundant_experts": "auto"}},
     "roles[0].eplb.redundant_experts", ["vLLM 0.33.0", "vllm.version 0.34", "0, 16, 32"]),
    ("scale_down before 0.34", "0.33.0", None, {"fault_tolerance": {"enabled": True, "on_fault": "scale_down"}},
     "roles[0].fault_tolerance.on_fault", ["vLLM 0.33.0", "Valid: retry", "vllm.version 0.34"]),
    ("fault tolerance behind one API server", "0.34.0", "internal", {"fault_tolerance": {"enabled": True}},
     "roles[0].fault_tolerance.enabled", ["vLLM 0.34.0", "serving.dp_mode external"]),
    ("fault tolerance before 0.20", "0.11.0", None, {"fault_tolerance": {"enabled": True}, "dbo": {"enabled": False}},
     "roles[0].fault_tolerance.enabled", ["vLLM 0.11.0", "vllm.version 0.32.0"]),
    ("elastic EP behind per-rank API servers on 0.32", "0.32.0", "external",
     {"eplb": EPLB16, "elastic_ep": {"enabled": True}},
     "serving.dp_mode", ["vLLM 0.32.0", "NotImplementedError", "internal", "vllm.version 0.33"]),
    ("elastic EP with hybrid LB", "0.34.0", "hybrid", {"eplb": EPLB16, "elastic_ep": {"enabled": True}},
     "serving.dp_mode", ["vLLM 0.34.0", "hybrid", "Valid: internal, external, multiport"]),
    ("elastic EP without EPLB", "0.34.0", None, {"elastic_ep": {"enabled": True}},
     "roles[0].elastic_ep.enabled", ["vLLM 0.34.0", "enable_eplb=True", "eplb.enabled true"]),
    ("elastic EP narrower than the group", "0.34.0", None,
     {"eplb": EPLB16, "elastic_ep": {"enabled": True, "max_dp_size": 8}},
     "roles[0].elastic_ep.max_dp_size", ["below the group's DP size 16", ">= 16"]),
]  # fmt: skip


@pytest.mark.parametrize(("what", "version", "mode", "role", "field", "said"), REFUSED, ids=[c[0] for c in REFUSED])
def test_plan_exits_2_naming_the_version_and_the_alternative(tmp_path, capsys, what, version, mode, role, field, said):
    from widep.cli import main

    rc = main(["plan", str(_topology(tmp_path, version, mode, **role))])
    err = capsys.readouterr()
    out = err.out + err.err
    assert rc == 2, out
    assert field + ":" in out, out
    for s in said:
        assert s in " ".join(out.split()), (s, out)


ACCEPTED = [
    # (version, dp_mode, role fields, flags rendered, flags not rendered)
    ("0.34.0", None, {"eplb": {"enabled": True, "redundant_experts": "auto"},
                      "fault_tolerance": {"enabled": True, "on_fault": "scale_down", "engine_recovery_timeout_s": 60},
                      "elastic_ep": {"enabled": True, "max_dp_size": 32}},
     ["--enable-eplb", "--enable-fault-tolerance", '{"engine_recovery_timeout_sec":60}', "--enable-elastic-ep",
      "--elastic-ep-max-dp-size", "32", "--data-parallel-rank"], ["num_redundant_experts"]),
    ("0.33.0", None, {"eplb": EPLB16, "fault_tolerance": {"enabled": True}, "elastic_ep": {"enabled": True}},
     ["--enable-fault-tolerance", "--enable-elastic-ep", "--data-parallel-rank"], ["--elastic-ep-max-dp-size"]),
    ("0.32.0", "internal", {"eplb": EPLB16, "elastic_ep": {"enabled": True}},
     ["--enable-elastic-ep", "--enable-eplb"], ["--enable-fault-tolerance", "--data-parallel-rank"]),
    ("0.34.0", None, {"all2all_backend": "mori", "dbo": {"enabled": False}}, ["mori"], ["--enable-dbo"]),
]  # fmt: skip


def _rank0(tmp_path: Path, version: str, mode: str | None, role: dict) -> tuple[object, list[str]]:
    from widep.render.vllm import RenderContext, render

    p = make_plan(load_topology(_topology(tmp_path, version, mode, **role)))
    return p, list(render(p, RenderContext(), rank=0)[0].argv)


@pytest.mark.parametrize(("version", "mode", "role", "flags", "absent"), ACCEPTED, ids=lambda x: str(x)[:20])
def test_render_emits_the_versions_flags(tmp_path, version, mode, role, flags, absent) -> None:
    p, argv = _rank0(tmp_path, version, mode, role)
    text = " ".join(argv)
    for f in flags:
        assert f in argv or f in text, (f, argv)
    for f in absent:
        assert f not in text, (f, argv)
    rp = p.roles[0]  # type: ignore[attr-defined]
    if role.get("eplb", {}).get("redundant_experts") == "auto":
        assert rp.redundant_experts == 0 and rp.as_dict()["redundant_experts_auto"]  # 256 experts over EP 16
    if role.get("fault_tolerance"):
        ft = rp.as_dict()["fault_tolerance"]
        assert ft["apply_path"] == table_for(version).fault_tolerance.apply_path


@pytest.mark.vllm
@pytest.mark.timeout(400)
@pytest.mark.parametrize(("version", "mode", "role"), [c[:3] for c in ACCEPTED[:3]], ids=lambda x: str(x)[:20])
def test_the_judges_accept_fault_tolerance_elastic_ep_and_eplb_auto(tmp_path, capsys, version, mode, role) -> None:
    """Rank 0 of each accepted case, judged by its own version's parser (0.32: the installed vLLM). On this CPU the
    judge switches EPLB (and elastic EP, which needs it) off for create_engine_config: 'refused on this platform'."""
    from widep.render.cli import judge_commands
    from widep.render.vllm import RenderContext, render

    if version != "0.32.0":
        _need(version)
    p = make_plan(load_topology(_topology(tmp_path, version, mode, **role)))
    rc = judge_commands(p, render(p, RenderContext(), rank=0), None)
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"judged by vLLM {version} on cpu:" in out, out
    assert re.search(r"decode/0(-7)?: ok; checks: parse, serve_args, engine_args", out), out


def test_plan_shows_the_versions_recovery_api_and_elastic_width(tmp_path, capsys) -> None:
    from widep.cli import main

    version, mode, role, _, _ = ACCEPTED[0]
    assert main(["plan", str(_topology(tmp_path, version, mode, **role))]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "fault tolerance (vLLM 0.34.0): a faulted engine waits 60 s for 'scale_down'" in out, out
    assert "POST /v1/fault_tolerance/apply" in out and "request_id" in out
    assert "elastic EP: DP 16, at most 32" in out and "idle, preparing, committing, failed, completed" in out
    assert "EPLB +0 redundant (auto)" in out
