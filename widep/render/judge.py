"""vLLM's own argument parser as the judge of rendered command lines.

:func:`judge_argvs` runs ONE subprocess of a Python that has vLLM installed. For every argv (the
arguments after ``python -m vllm.entrypoints.openai.api_server``, or after ``vllm serve MODEL`` —
the positional model is accepted too) it:

1. builds vLLM's real server parser (``make_arg_parser(FlexibleArgumentParser())``) and parses the
   argv; a rejection (argparse exits with 2) is reported with the parser's own message;
2. runs the server's quick post-parse checks (``validate_parsed_serve_args``) where they exist;
3. converts the namespace with ``AsyncEngineArgs.from_cli_args``;
4. calls ``create_engine_config()``, which adds vLLM's cross-field checks. On a machine without the
   GPU a feature needs (EPLB on CPU, for instance) vLLM refuses there; the refusal is recorded in
   :attr:`ParserVerdict.refused_on_platform` rather than reported as an error of the argv, and where the
   feature can be switched off (see ``_PLATFORM_RETRIES``) the remaining checks are run without it.

Every verdict also carries the ``ParallelConfig`` fields that vLLM hashes and compares between the
DP ranks of a MoE group at startup (``ParallelConfig.compute_hash``: all fields except the ones it
lists as per-rank), taken from the engine arguments so that they exist even when the platform
refused the config. :func:`parallel_mismatches` compares them across ranks.

Module paths move between vLLM releases, so the child looks them up (known paths first, then a
search of ``vllm.entrypoints``) and reports which ones it used (:attr:`Judgement.modules`).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from widep.errors import UserError


@dataclass(frozen=True)
class ParserVerdict:
    """What vLLM's own argument handling said about one argv."""

    ok: bool
    """True when vLLM accepted the argv: it parsed, converted to engine arguments, and
    ``create_engine_config`` either passed or was refused only for lack of a GPU feature here."""
    error: str | None
    """vLLM's message when ``ok`` is False (the parser's ``error: …`` text for a parse failure)."""
    checks_ran: list[str]
    """Stages that ran to completion, in order: ``parse``, ``serve_args``, ``engine_args``,
    ``engine_config`` (or ``engine_config:without <field>`` after a platform refusal)."""
    parallel: dict[str, Any]
    """ParallelConfig fields that must be identical on every DP rank of a MoE group."""
    refused_on_platform: str | None = None
    """vLLM's message when ``create_engine_config`` refused a GPU-only feature on this platform.
    If the config still failed with that feature switched off, the second message is appended: it
    is not counted against the argv, since it may be an artefact of switching the feature off."""
    parallel_hash: str | None = None
    """``ParallelConfig.compute_hash()`` of the resolved config (the value vLLM compares at the DP
    handshake), when ``create_engine_config`` ran."""
    rewritten: dict[str, list[Any]] = field(default_factory=dict)
    """Parallel fields whose given value the resolved config changed: ``{field: [given, resolved]}``
    (the CPU platform turns off DBO, for example). Values left to vLLM (None) are not listed."""


@dataclass(frozen=True)
class Judgement:
    """One judge run: the vLLM it used and a verdict per argv."""

    vllm_version: str
    platform: str
    modules: dict[str, str]
    """Where each piece was found, e.g. ``{"make_arg_parser": "vllm.entrypoints.…cli_args"}``."""
    verdicts: list[ParserVerdict]


def judge_argvs(
    argvs: Sequence[Sequence[str]],
    python: str,
    *,
    envs: Sequence[Mapping[str, str] | None] | None = None,
    model_override: str | os.PathLike[str] | None = None,
    timeout: float = 600.0,
) -> list[ParserVerdict]:
    """Judge every argv with the vLLM installed for ``python``; see :func:`judge`."""
    return judge(argvs, python, envs=envs, model_override=model_override, timeout=timeout).verdicts


def judge(
    argvs: Sequence[Sequence[str]],
    python: str,
    *,
    envs: Sequence[Mapping[str, str] | None] | None = None,
    model_override: str | os.PathLike[str] | None = None,
    timeout: float = 600.0,
    extra_env: Mapping[str, str] | None = None,
) -> Judgement:
    """Run vLLM's parser and config checks on each argv in one subprocess of ``python``.

    ``envs[i]`` (optional) is the environment of rank ``i``: it is applied on top of the child's
    environment while argv ``i`` is judged. ``model_override`` replaces the model of every argv
    (``--model`` or the positional model) before the engine config is built, because
    ``create_engine_config`` reads the model's ``config.json``; point it at a local model such as
    the tiny MoE. ``extra_env`` is added to the child's environment (a judge environment's ``PYTHONPATH``,
    see :mod:`widep.render.judge_env`). With an override, ``VLLM_ALLOW_LONG_MAX_MODEL_LEN=1`` is set
    (a ``--max-model-len`` beyond the stand-in's context is not an error of the argv). The child runs offline
    (``HF_HUB_OFFLINE=1``), so a model that is not on local disk fails fast.
    """
    argv_list = [[str(a) for a in argv] for argv in argvs]
    if envs is None:
        env_list: list[dict[str, str]] = [{} for _ in argv_list]
    else:
        if len(envs) != len(argv_list):
            raise UserError(
                f"judge needs one environment per argv. Given: {len(envs)} environments "
                f"for {len(argv_list)} argvs. Valid: envs=None or {len(argv_list)} entries."
            )
        env_list = [{str(k): str(v) for k, v in (e or {}).items()} for e in envs]
    request = {
        "argvs": argv_list,
        "envs": env_list,
        "model_override": str(model_override) if model_override is not None else None,
    }
    child_env = dict(os.environ)
    child_env.update(extra_env or {})
    child_env.setdefault("HF_HUB_OFFLINE", "1")
    child_env.setdefault("TRANSFORMERS_OFFLINE", "1")
    child_env.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    child_env.setdefault("VLLM_NO_USAGE_STATS", "1")
    if model_override is not None:
        # The stand-in model's context length says nothing about the real model's.
        child_env.setdefault("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
    with tempfile.TemporaryDirectory(prefix="widep-judge-") as tmp:
        req_path = Path(tmp) / "request.json"
        out_path = Path(tmp) / "result.json"
        req_path.write_text(json.dumps(request))
        try:
            proc = subprocess.run(
                [python, "-c", _CHILD, str(req_path), str(out_path)],
                env=child_env,
                capture_output=True,
                text=True,
                timeout=timeout,
                cwd=tmp,
            )
        except FileNotFoundError as err:
            raise UserError(
                f"The Python given for vLLM does not exist. Given: {python!r}. "
                "Valid: the python of an environment with vLLM installed."
            ) from err
        except subprocess.TimeoutExpired as err:
            raise UserError(
                f"vLLM's argument judge did not finish in {timeout:.0f} s (python {python}).", exit_code=1
            ) from err
        if not out_path.exists():
            tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-15:])
            raise UserError(
                f"vLLM's argument judge failed (python {python}, exit {proc.returncode}):\n{tail}", exit_code=1
            )
        result = json.loads(out_path.read_text())
    if "fatal" in result:
        raise UserError(f"vLLM's argument judge could not run with python {python}: {result['fatal']}", exit_code=1)
    verdicts = [
        ParserVerdict(
            ok=v["ok"],
            error=v["error"],
            checks_ran=list(v["checks_ran"]),
            parallel=v["parallel"],
            refused_on_platform=v.get("refused_on_platform"),
            parallel_hash=v.get("parallel_hash"),
            rewritten=v.get("rewritten", {}),
        )
        for v in result["verdicts"]
    ]
    return Judgement(
        vllm_version=result["vllm_version"], platform=result["platform"], modules=result["modules"], verdicts=verdicts
    )


def parallel_mismatches(verdicts: Sequence[ParserVerdict]) -> dict[str, list[Any]]:
    """Parallel fields whose values differ between the verdicts (ranks of one DP group).

    Returns ``{field: [value of rank 0, value of rank 1, …]}`` for each differing field; empty
    when the ranks would pass vLLM's DP handshake check.
    """
    keys = sorted({k for v in verdicts for k in v.parallel})
    out: dict[str, list[Any]] = {}
    for key in keys:
        values = [v.parallel.get(key) for v in verdicts]
        if any(value != values[0] for value in values[1:]):
            out[key] = values
    return out


# The child script: standalone, runs under the vLLM python (which need not have widep installed).
_CHILD = r'''
import argparse, ast, contextlib, dataclasses, enum, importlib, inspect, io, json, os, pkgutil
import re, sys, textwrap, traceback

req_path, out_path = sys.argv[1], sys.argv[2]


def write(obj):
    with open(out_path + ".tmp", "w") as f:
        json.dump(obj, f, default=repr)
    os.replace(out_path + ".tmp", out_path)


def find(attr, candidates, search_pkg=None, name_hint=None):
    """(module path, object) of ``attr``: known modules first, then a search of search_pkg."""
    for mod in candidates:
        try:
            m = importlib.import_module(mod)
        except Exception:
            continue
        if hasattr(m, attr):
            return mod, getattr(m, attr)
    if search_pkg:
        pkg = importlib.import_module(search_pkg)
        for info in pkgutil.walk_packages(pkg.__path__, search_pkg + "."):
            if name_hint and name_hint not in info.name:
                continue
            try:
                m = importlib.import_module(info.name)
            except Exception:
                continue
            if hasattr(m, attr):
                return info.name, getattr(m, attr)
    raise LookupError(f"{attr} not found in {candidates} or under {search_pkg}")


# Errors of create_engine_config that mean "not on this platform", not "this argv is wrong".
PLATFORM_PATTERNS = [
    r"only supported on (CUDA|ROCm|XPU|GPU|TPU|NVIDIA|Hopper|Blackwell)",
    r"(CUDA|ROCm|XPU) devices",
    r"not (yet )?supported on (the )?(CPU|current platform|this platform)",
    r"requires (a )?(CUDA|GPU|NVIDIA)",
    # the CUDA wheel of 0.33+ judged on this CPU (widep.render.judge_env): its CPU platform wants triton-cpu
    r"on x86 CPUs requires Triton",
]
def eplb_off(ea):
    """Switch EPLB off, with what only EPLB allows (redundant experts; elastic EP, which needs EPLB)."""
    if not getattr(ea, "enable_eplb", False):
        return False
    ea.enable_eplb = False
    if getattr(ea, "enable_elastic_ep", False):
        ea.enable_elastic_ep = False
        ea.elastic_ep_max_dp_size = None
    cfg = getattr(ea, "eplb_config", None)
    if isinstance(cfg, dict):
        ea.eplb_config = dict(cfg, num_redundant_experts=0)
    elif cfg is not None and getattr(cfg, "num_redundant_experts", 0):
        ea.eplb_config = dataclasses.replace(cfg, num_redundant_experts=0)
    return True


# A platform refusal that matches one of these is retried with the feature switched off, so that
# the remaining cross-field checks still run: (pattern, name, switch-off function).
PLATFORM_RETRIES = [
    (r"load balancing|EPLB", "enable_eplb", eplb_off),
]


def jsonable(x):
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: jsonable(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if hasattr(x, "model_dump"):
        return jsonable(x.model_dump())
    if isinstance(x, enum.Enum):
        return x.value if isinstance(x.value, (str, int, float, bool)) else x.name
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [jsonable(v) for v in x]
    if x is None or isinstance(x, (str, int, float, bool)):
        return x
    return repr(x)


def changed(given, resolved):
    """True when the resolved value overrides a value that was given (None = left to vLLM)."""
    if given is None:
        return False
    if isinstance(given, dict) and isinstance(resolved, dict):
        return any(changed(v, resolved.get(k)) for k, v in given.items())
    return given != resolved


def hashed_parallel_fields(ParallelConfig):
    """ParallelConfig fields that compute_hash covers (all but its ignored_factors)."""
    names = [f.name for f in dataclasses.fields(ParallelConfig)]
    ignored = set()
    try:
        src = textwrap.dedent(inspect.getsource(ParallelConfig.compute_hash))
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "ignored_factors" for t in node.targets
            ) and isinstance(node.value, ast.Set):
                ignored = {ast.literal_eval(e) for e in node.value.elts}
    except Exception:
        ignored = set()
    if not ignored:  # older vLLM hashed an explicit list; fall back to the DP/EP-relevant fields
        keep = ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size",
                "enable_expert_parallel", "all2all_backend", "enable_eplb", "eplb_config",
                "num_redundant_experts", "enable_dbo", "dbo_decode_token_threshold",
                "dbo_prefill_token_threshold", "ubatch_size", "expert_placement_strategy",
                "decode_context_parallel_size", "prefill_context_parallel_size")
        return [n for n in names if n in keep]
    return [n for n in names if n not in ignored and not n.startswith("_")]


def parse_error(parser, argv):
    """Parse argv; return (namespace, None) or (None, the parser's message)."""
    messages = []
    original = parser.error

    def error(message):
        messages.append(message)
        original(message)

    parser.error = error
    buf = io.StringIO()
    try:
        with contextlib.redirect_stderr(buf), contextlib.redirect_stdout(io.StringIO()):
            return parser.parse_args(argv), None
    except SystemExit as exc:
        if messages:
            return None, f"error: {messages[-1]}"
        text = buf.getvalue().strip().splitlines()
        errs = [line for line in text if "error:" in line]
        if errs:
            return None, errs[-1][errs[-1].index("error:"):]
        return None, f"the parser exited with {exc.code} (--help or --version in the argv?)"


def main():
    req = json.load(open(req_path))
    try:
        import vllm
        modules = {}
        modules["FlexibleArgumentParser"], FAP = find(
            "FlexibleArgumentParser", ["vllm.utils.argparse_utils", "vllm.utils"])
        modules["make_arg_parser"], make_arg_parser = find(
            "make_arg_parser",
            ["vllm.entrypoints.launchers.cli_args", "vllm.entrypoints.common.cli_args",
             "vllm.entrypoints.openai.cli_args"],
            "vllm.entrypoints", "cli_args")
        mod = importlib.import_module(modules["make_arg_parser"])
        validate = getattr(mod, "validate_parsed_serve_args", None)
        if validate is not None:
            modules["validate_parsed_serve_args"] = modules["make_arg_parser"]
        modules["AsyncEngineArgs"], AsyncEngineArgs = find(
            "AsyncEngineArgs", ["vllm.engine.arg_utils", "vllm"])
        modules["ParallelConfig"], ParallelConfig = find(
            "ParallelConfig", ["vllm.config.parallel", "vllm.config"])
        try:
            from vllm.usage.usage_lib import UsageContext
            usage = UsageContext.OPENAI_API_SERVER
        except Exception:
            usage = None
        try:
            from vllm.platforms import current_platform
            platform = str(current_platform.device_type)
        except Exception:
            platform = "unknown"
        fields = hashed_parallel_fields(ParallelConfig)
    except Exception as exc:
        write({"fatal": f"{type(exc).__name__}: {exc}"})
        return

    if os.environ.get("WIDEP_JUDGE_ASSUME_TRITON") == "1":
        # judge environment (widep.render.judge_env): the CUDA wheel's CPU platform refuses x86 without
        # triton-cpu before any cross-field check; nothing runs a kernel here, so let the checks go on.
        try:
            import vllm.triton_utils as tu
            tu.HAS_TRITON = True
            modules["assumed"] = "vllm.triton_utils.HAS_TRITON=True (no kernel runs in the judge)"
        except Exception:
            pass
    cec_params = inspect.signature(AsyncEngineArgs.create_engine_config).parameters
    verdicts = []
    base_env = dict(os.environ)
    for argv, env in zip(req["argvs"], req["envs"]):
        os.environ.clear()
        os.environ.update(base_env)
        os.environ.update(env)
        try:
            verdicts.append(judge_one(argv, req["model_override"], FAP, make_arg_parser, validate,
                                      AsyncEngineArgs, fields, usage, cec_params))
        except Exception as exc:  # a crash of vLLM's own code: report it, keep judging
            verdicts.append({"ok": False, "error": f"{type(exc).__name__}: {exc}",
                             "checks_ran": [], "parallel": {}})
    os.environ.clear()
    os.environ.update(base_env)
    write({"vllm_version": getattr(vllm, "__version__", "unknown"), "platform": platform,
           "modules": modules, "verdicts": verdicts})


def judge_one(argv, model_override, FAP, make_arg_parser, validate, AsyncEngineArgs, fields,
              usage, cec_params):
    checks = []
    parser = make_arg_parser(FAP(prog="vllm serve"))
    ns, err = parse_error(parser, argv)
    if ns is None:
        return {"ok": False, "error": err, "checks_ran": checks, "parallel": {}}
    checks.append("parse")
    if getattr(ns, "model_tag", None):
        ns.model = ns.model_tag
    if model_override is not None:
        original = getattr(ns, "model", None)
        ns.model = model_override
        if hasattr(ns, "model_tag"):
            ns.model_tag = model_override
        if original is not None and getattr(ns, "tokenizer", None) == original:
            ns.tokenizer = model_override
    if validate is not None:
        try:
            validate(ns)
        except Exception as exc:
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "checks_ran": checks,
                    "parallel": {}}
        checks.append("serve_args")
    try:
        ea = AsyncEngineArgs.from_cli_args(ns)
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "checks_ran": checks,
                "parallel": {}}
    checks.append("engine_args")
    parallel = {f: jsonable(getattr(ea, f)) for f in fields if hasattr(ea, f)}
    out = {"ok": True, "error": None, "checks_ran": checks, "parallel": parallel}

    kwargs = {}
    if "usage_context" in cec_params and usage is not None:
        kwargs["usage_context"] = usage
    if "headless" in cec_params:
        kwargs["headless"] = bool(getattr(ns, "headless", False))
    stage = "engine_config"
    switched_off = []
    for _ in range(len(PLATFORM_RETRIES) + 1):
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                cfg = ea.create_engine_config(**kwargs)
        except Exception as exc:
            msg = f"{type(exc).__name__}: {exc}"
            platform = any(re.search(p, msg, re.I) for p in PLATFORM_PATTERNS)
            if switched_off:
                # Not judged: after switching a feature off, an error may be an artefact of that.
                out["refused_on_platform"] += (
                    f" | with {', '.join(switched_off)} off, create_engine_config still failed "
                    f"(not counted against the argv): {msg}")
                return out
            if not platform:
                out.update(ok=False, error=msg)
                return out
            out["refused_on_platform"] = msg
            retry = next(((name, fn) for p, name, fn in PLATFORM_RETRIES
                          if re.search(p, msg, re.I) and name not in switched_off), None)
            if retry is None or not retry[1](ea):
                return out
            switched_off.append(retry[0])
            stage = f"engine_config:without {','.join(switched_off)}"
            continue
        checks.append(stage)
        pc = cfg.parallel_config
        try:
            out["parallel_hash"] = pc.compute_hash()
        except Exception:
            pass
        rewritten = {}
        for f in fields:
            if f in parallel and hasattr(pc, f):
                resolved = jsonable(getattr(pc, f))
                if changed(parallel[f], resolved) and not (switched_off and
                                                           f in ("enable_eplb", "eplb_config")):
                    rewritten[f] = [parallel[f], resolved]
        out["rewritten"] = rewritten
        return out
    return out


main()
'''
