"""``widep lws``: LeaderWorkerSet manifests for Kubernetes.

Today the command validates manifests (``--validate FILE``, repeatable; a directory means its
``*.yaml``/``*.yml`` files; ``-`` reads standard input). Generating manifests from a topology
(the positional ``TOPOLOGY`` argument) needs the planner and is wired in later.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from widep.errors import UserError


def _expand(paths: tuple[str, ...]) -> list[str]:
    """Files to validate, in the order given; a directory contributes its YAML files, sorted."""
    out: list[str] = []
    for given in paths:
        if given == "-":
            out.append(given)
            continue
        p = Path(given)
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in (".yaml", ".yml"))
            if not files:
                raise UserError(f"no *.yaml or *.yml files in directory {given}. Given: --validate {given}. Valid: a YAML file or a directory containing some")
            out.extend(str(f) for f in files)
        elif p.is_file():
            out.append(given)
        else:
            raise UserError(f"manifest file not found. Given: --validate {given}. Valid: an existing YAML file, a directory of them, or '-' for standard input")
    return out


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _generate(topology: str) -> None:
    raise UserError(
        f"generating LeaderWorkerSet manifests needs the planner, which this build does not have yet. "
        f"Given: TOPOLOGY {topology}. Valid today: widep lws --validate FILE"
    )


@click.command("lws")
@click.argument("topology", required=False, metavar="[TOPOLOGY]")
@click.option(
    "--validate",
    "validate_paths",
    multiple=True,
    metavar="FILE",
    help="Check a manifest file (repeatable; a directory means its *.yaml files; '-' reads stdin) "
    "against the LWS CRD schema, the LWS webhook rules and core Kubernetes schemas.",
)
@click.option(
    "--crd",
    "crd_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="The LWS CRD YAML (default: $WIDEP_LWS_CRD, else ../shared/schemas/lws-crd-v0.10.0.yaml).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def lws_cmd(ctx: click.Context, topology: str | None, validate_paths: tuple[str, ...], crd_path: str | None, as_json: bool) -> None:
    """LeaderWorkerSet manifests: validate them (--validate), or generate them from TOPOLOGY.

    Each problem is printed as "FILE: doc N (Kind/name): path.to.field: message". Exit status:
    0 when every document passes (notes such as "not checked" do not fail), 1 when any error or
    warning is found, 2 for bad usage (missing file or CRD).
    """
    if topology is not None:
        _generate(topology)
        return
    if not validate_paths:
        raise UserError("nothing to do. Given: no TOPOLOGY and no --validate. Valid: widep lws --validate FILE [--validate FILE ...] [--crd PATH] [--json]")
    _validate(ctx, validate_paths, crd_path, as_json)


def _validate(ctx: click.Context, paths: tuple[str, ...], crd_path: str | None, as_json: bool) -> None:
    from widep.k8s import validate as v

    files = _expand(paths)
    crd = Path(crd_path) if crd_path else v.default_crd_path()
    start = time.perf_counter()
    results = []
    for name in files:
        if name == "-":
            count, problems = v.validate_text(sys.stdin.read(), crd)
        else:
            count, problems = v.validate_file_counted(name, crd)
        results.append((name, count, problems))
    elapsed = time.perf_counter() - start
    failing = sum(1 for _, _, probs in results for p in probs if p.failing)
    documents = sum(count for _, count, _ in results)
    if as_json:
        payload = {
            "ok": failing == 0,
            "crd": str(crd),
            "documents": documents,
            "seconds": round(elapsed, 3),
            "files": [
                {"file": name, "documents": count, "problems": [p.to_dict() for p in probs]}
                for name, count, probs in results
            ],
        }
        click.echo(json.dumps(payload, indent=2))
    else:
        for name, _, probs in results:
            for p in probs:
                click.echo(p.format(name))
        notes = sum(1 for _, _, probs in results for p in probs if not p.failing)
        if failing:
            click.echo(f"{_plural(failing, 'problem')} in {_plural(documents, 'document')}", err=True)
        else:
            extra = f" ({_plural(notes, 'note')})" if notes else ""
            click.echo(f"ok: {_plural(documents, 'document')}{extra}")
    ctx.exit(1 if failing else 0)
