"""Regenerate the checked-in LeaderWorkerSet manifests in ``lws/`` from ``topologies/``.

    python -m widep.k8s.regen            # rewrite lws/ (the only way these files change)
    python -m widep.k8s.regen --check    # exit 1 and list the files that are stale, missing or extra

Every curated topology gets ``lws/<topology>.yaml`` (pod-per-node, default options: a P/D topology gets
the vllm-router front door) and, where a pod per rank makes other pods and is allowed (external DP mode,
several ranks per node, no DeepEP), ``lws/<topology>.pod-per-rank.yaml``. A P/D topology also gets
``lws/<topology>.llm-d.yaml`` (``--front-door llm-d``) with llm-d's router chart values in
``lws/router-values/<topology>.llm-d.yaml``, and ``lws/kustomize/<topology>/`` (``widep lws --kustomize``: a
base plus one overlay per provider profile). Each file says at its top which ``widep lws`` command made it.
A test regenerates everything in memory and compares it byte for byte with the files.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from widep.errors import UserError
from widep.generated import stale_files

REGENERATE = "python -m widep.k8s.regen"
#: Sub-folder of lws/ with llm-d router chart values (not manifests: `widep lws --validate lws/` skips it).
VALUES_DIR = "router-values"
#: Sub-folder of lws/ with `widep lws --kustomize` trees of the P/D topologies.
KUSTOMIZE_DIR = "kustomize"
REPO = Path(__file__).resolve().parents[2]


def expected_files(topologies: Path, crd: Path | None = None) -> dict[str, str]:
    """File name in lws/ -> its content, for every topology file in ``topologies``."""
    from widep.k8s.generate import generate, generate_text
    from widep.k8s.lws import LWSOptions, sensible_placements
    from widep.plan import plan
    from widep.spec.topology import load_topology

    files = sorted(topologies.glob("*.yaml"))
    if not files:
        raise UserError(
            f"no topology files in {topologies}. Given: --topologies {topologies}. Valid: a folder of *.yaml topologies"
        )
    out: dict[str, str] = {}
    for f in files:
        shown = f"topologies/{f.name}"
        for placement in sensible_placements(plan(load_topology(f))):
            name = f.stem + ("" if placement == "pod-per-node" else f".{placement}") + ".yaml"
            text, _, _ = generate_text(
                str(f), LWSOptions(placement=placement), crd, shown_as=shown, regenerate=REGENERATE
            )
            out[name] = text
        p = plan(load_topology(f))
        if {rp.kind for rp in p.roles} >= {"prefill", "decode"}:
            from widep.k8s.kustomize import kustomize_files

            for rel, text in kustomize_files(str(f), LWSOptions(), crd, shown_as=shown, regenerate=REGENERATE).items():
                out[f"{KUSTOMIZE_DIR}/{f.stem}/{rel}"] = text
            name = f"{f.stem}.llm-d.yaml"
            try:
                text, _, _, values = generate(
                    str(f),
                    LWSOptions(front_door="llm-d"),
                    crd,
                    shown_as=shown,
                    regenerate=REGENERATE,
                    manifests_name=f"lws/{name}",
                )
            except UserError as err:
                if err.exit_code != 2:
                    raise
                continue  # llm-d's routing sidecar cannot front this decode role (the reason is the error)
            out[name] = text
            out[f"{VALUES_DIR}/{name}"] = values or ""
    return out


def _present(out_dir: Path) -> set[str]:
    if not out_dir.is_dir():
        return set()
    values = {f"{VALUES_DIR}/{p.name}" for p in (out_dir / VALUES_DIR).glob("*.yaml")}
    trees = {str(p.relative_to(out_dir)) for p in (out_dir / KUSTOMIZE_DIR).rglob("*.yaml")}
    return {p.name for p in out_dir.glob("*.yaml")} | values | trees


def stale(out_dir: Path, expected: dict[str, str]) -> list[str]:
    """Problems of ``out_dir`` against ``expected``: one line per stale, missing or extra file."""
    return stale_files(out_dir, expected, _present(out_dir))


@click.command()
@click.option(
    "--topologies", type=click.Path(file_okay=False, path_type=Path), default=REPO / "topologies", show_default=True
)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=REPO / "lws", show_default=True)
@click.option("--check", is_flag=True, help="Write nothing; exit 1 if any file would change.")
@click.option(
    "--crd", type=click.Path(dir_okay=False, path_type=Path), default=None, help="The LWS CRD (default as widep lws)."
)
def main(topologies: Path, out: Path, check: bool, crd: Path | None) -> None:
    """Regenerate (or --check) the LeaderWorkerSet manifests of every curated topology."""
    try:
        expected = expected_files(topologies, crd)
        problems = stale(out, expected)
    except UserError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(err.exit_code)
    if check:
        for line in problems:
            click.echo(line)
        click.echo(
            f"{len(expected)} files, {len(problems)} stale" if problems else f"ok: {len(expected)} files up to date",
            err=True,
        )
        sys.exit(1 if problems else 0)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in expected.items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            click.echo(f"wrote {path}")
    for name in sorted(_present(out) - set(expected)):
        (out / name).unlink()
        click.echo(f"removed {out / name}")


if __name__ == "__main__":
    main()
