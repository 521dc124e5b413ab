"""Which vLLM setting an ``extra_args`` token sets, judged the way vLLM's own parser judges it.

vLLM's server parser (a ``FlexibleArgumentParser``) accepts short aliases (``-tp``, ``-dp``, ``-dpl``,
``-dpa``), argparse prefix abbreviations (``--max-num-seq``, ``--tensor-parallel 8``), underscores for
dashes (``--max_num_seqs``) and dotted sub-keys of JSON options (``--eplb-config.window_size=5``). A
string match against widep's own flags misses all of those, so widep asks the same question vLLM does:
*which destination does this token set?*

widep's render is pure and must work without vLLM installed, so the parser's option table (option strings,
destination, arity) ships as data, one file per vLLM release line (``widep/spec/data/vllm-options-*.json``),
written by this module's generator from the installed vLLM::

    python -m widep.spec.vllm_options --write      # needs vLLM; rewrites the installed line's table
    PYTHONPATH=$(python -m widep.render.judge_env path 0.34.0) VLLM_TARGET_DEVICE=cpu \
        python -m widep.spec.vllm_options --write      # the 0.34 line's, from its judge environment

A stand-in ``argparse.ArgumentParser`` is rebuilt from the table, so argparse's own abbreviation rule
(``allow_abbrev``) applies exactly as it does inside vLLM. ``tests/test_hostile.py`` regenerates the
table from the installed vLLM parser and compares.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

DATA_DIR = "data"
LINES_WITH_TABLES = ("0.3x", "0.33", "0.34")
"""vLLM lines whose parser table ships (generated from a real install); other lines use the nearest one."""


def table_file(line: str) -> str:
    return f"vllm-options-{line}.json"


def generate_table(parser: argparse.ArgumentParser, vllm_version: str, line: str) -> dict[str, Any]:
    """The option table of a real vLLM parser: every optional action's strings, destination and arity."""
    options: list[dict[str, Any]] = []
    for action in parser._actions:
        if not action.option_strings:
            continue
        nargs = action.nargs
        options.append(
            {
                "strings": sorted(action.option_strings),
                "dest": action.dest,
                "nargs": nargs if nargs is None or isinstance(nargs, (int, str)) else str(nargs),
            }
        )
    options.sort(key=lambda o: o["strings"][0])
    return {
        "vllm_version": vllm_version,
        "line": line,
        "parser": "vllm.entrypoints.launchers.cli_args.make_arg_parser(FlexibleArgumentParser())",
        "regenerate": "python -m widep.spec.vllm_options --write",
        "allow_abbrev": bool(parser.allow_abbrev),
        "options": options,
    }


def installed_parser() -> tuple[argparse.ArgumentParser, str]:
    """vLLM's own server parser and version (imports vLLM; for the generator and its test only)."""
    import importlib

    import vllm

    for mod, attr in (
        ("vllm.entrypoints.launchers.cli_args", "make_arg_parser"),
        ("vllm.entrypoints.common.cli_args", "make_arg_parser"),  # 0.33+
        ("vllm.entrypoints.openai.cli_args", "make_arg_parser"),
    ):
        try:
            make = getattr(importlib.import_module(mod), attr)
            break
        except (ImportError, AttributeError):
            continue
    else:
        raise RuntimeError("cannot find vLLM's make_arg_parser")
    try:
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError:
        from vllm.utils import FlexibleArgumentParser  # type: ignore[attr-defined,no-redef,unused-ignore]  # older lines
    return make(FlexibleArgumentParser()), vllm.__version__


@cache
def load_table(line: str) -> dict[str, Any]:
    """The shipped table of a vLLM line (the 0.3x one, the installed CPU build's, when that line has none)."""
    use = line if line in LINES_WITH_TABLES else LINES_WITH_TABLES[0]
    path = resources.files("widep.spec") / DATA_DIR / table_file(use)
    return json.loads(path.read_text(encoding="utf-8"))


class _Refused(Exception):
    pass


class _Judge(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse calls this for ambiguous abbreviations
        raise _Refused(message)


class _Record(argparse.Action):
    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        namespace.seen.append((self.dest, option_string))


@cache
def _judge(line: str) -> _Judge:
    table = load_table(line)
    p = _Judge(add_help=False, allow_abbrev=table["allow_abbrev"])
    for opt in table["options"]:
        nargs = opt["nargs"]
        kwargs: dict[str, Any] = {"dest": opt["dest"]}
        kwargs["nargs"] = 0 if nargs == 0 else "?" if nargs in (None, "?") else nargs if nargs in ("*", "+") else "*"
        p.add_argument(*opt["strings"], action=_Record, **kwargs)
    return p


_DASHES = re.compile(r"(?<=--)[^.]*")


def _normalise(token: str) -> str:
    """What FlexibleArgumentParser hands argparse for ``token``: '_' -> '-' in the name, '--a.b' -> '--a'."""
    if not token.startswith("--"):
        if token.startswith("-O") and token != "-O":
            return "--optimization-level"
        return token
    name, eq, value = token.partition("=")
    name = _DASHES.sub(lambda m: m.group(0).replace("_", "-"), name, count=1)
    if "." in name:
        name = name.split(".", 1)[0]
    return name + eq + value


@dataclass(frozen=True)
class Setting:
    """One token of extra args that vLLM reads as an option."""

    index: int
    token: str
    dest: str
    option: str
    """The option string vLLM resolves it to (e.g. '-tp' -> '-tp', '--tensor-parallel' -> '--tensor-parallel-size')."""


def settings(args: list[str] | tuple[str, ...], line: str) -> tuple[list[Setting], list[tuple[int, str]]]:
    """(the options ``args`` set, (index, problem) for tokens vLLM's parser refuses outright)."""
    judge = _judge(line)
    out: list[Setting] = []
    refused: list[tuple[int, str]] = []
    for i, token in enumerate(args):
        if not token.startswith("-") or token in ("-", "--") or re.fullmatch(r"-\d[\d.eE+-]*", token):
            continue
        ns = argparse.Namespace(seen=[])
        try:
            judge.parse_known_args([_normalise(token), "0"], ns)
        except _Refused as err:
            refused.append((i, str(err)))
            continue
        for dest, option in ns.seen:
            out.append(Setting(i, token, dest, option or token))
    return out, refused


def table_version(line: str) -> str | None:
    """The vLLM release (MAJOR.MINOR) whose parser the shipped table of ``line`` was generated from (None: the
    line has no table of its own)."""
    if line not in LINES_WITH_TABLES:
        return None
    return ".".join(str(load_table(line)["vllm_version"]).split(".")[:2])


def unknown_options(args: list[str] | tuple[str, ...], line: str) -> list[tuple[int, str]]:
    """(index, token) of every token of ``args`` that looks like an option and names none of the table's:
    vLLM's parser would exit with 'unrecognized arguments'. Only meaningful for the version the table is of."""
    judge = _judge(line)
    out: list[tuple[int, str]] = []
    for i, token in enumerate(args):
        if not token.startswith("-") or token in ("-", "--") or re.fullmatch(r"-\d[\d.eE+-]*", token):
            continue
        ns = argparse.Namespace(seen=[])
        try:
            judge.parse_known_args([_normalise(token), "0"], ns)
        except _Refused:
            continue  # reported by settings()
        if not ns.seen:
            out.append((i, token))
    return out


def dest_of(flag: str, line: str) -> str | None:
    """The destination of one exact option string in a line's table."""
    for opt in load_table(line)["options"]:
        if flag in opt["strings"]:
            return opt["dest"]
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Write the option table of the installed vLLM's server parser.")
    ap.add_argument("--write", action="store_true", help="rewrite widep/spec/data/vllm-options-<line>.json")
    ns = ap.parse_args(argv)
    from widep.spec.vllm_versions import table_for

    parser, version = installed_parser()
    line = table_for(version).line
    table = generate_table(parser, version, line)
    text = json.dumps(table, indent=1, sort_keys=False) + "\n"
    if ns.write:
        from pathlib import Path

        path = Path(__file__).parent / DATA_DIR / table_file(line)
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path} ({len(table['options'])} options, vLLM {version})")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
