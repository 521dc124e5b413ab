"""``widep lws``: LeaderWorkerSet manifests for Kubernetes.

``widep lws TOPOLOGY`` generates one LeaderWorkerSet and one Service per role (and, with
``--inference-pool``, an InferencePool per role) with :mod:`widep.k8s.lws`, validates them with
:mod:`widep.k8s.validate` (the real LWS CRD schema, the LWS webhook rules, core Kubernetes schemas)
and prints YAML; manifests that do not validate are never printed. ``--validate FILE`` (repeatable;
a directory means its ``*.yaml``/``*.yml`` files; ``-`` reads standard input) checks any manifest.
The checked-in examples in ``lws/`` are rewritten only by ``python -m widep.k8s.regen``.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from widep.errors import UserError

if TYPE_CHECKING:
    from widep.k8s.lws import LWSOptions


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


def command_line(topology: str, opts: LWSOptions) -> str:
    """The ``widep lws`` command that reproduces ``opts`` (defaults left out), for file headers."""
    from widep.k8s.lws import LWSOptions

    d = LWSOptions()
    parts = ["widep lws", topology]
    flags = [
        ("--placement", opts.placement, d.placement),
        ("--namespace", opts.namespace, d.namespace),
        ("--image", opts.image, d.image),
        ("--router-image", opts.router_image, d.router_image),
        ("--gpu-resource", opts.gpu_resource, d.gpu_resource),
        ("--rdma-resource", opts.rdma_resource, d.rdma_resource),
        ("--exclusive-topology", opts.exclusive_topology, d.exclusive_topology),
        ("--model-path", opts.model_path, d.model_path),
        ("--model-cache", opts.model_cache, d.model_cache),
        ("--gpu-product-label", opts.gpu_product_label, d.gpu_product_label),
        ("--cpu", opts.cpu, d.cpu),
        ("--memory", opts.memory, d.memory),
        ("--shm-size", opts.shm_size, d.shm_size),
        ("--termination-grace", opts.termination_grace_s, d.termination_grace_s),
        ("--epp-port", opts.epp_port, d.epp_port),
    ]
    for flag, value, default in flags:
        if value != default:
            parts.append(f"{flag} {shlex.quote(str(value or ''))}")
    parts += [f"--gpu-product {shlex.quote(p)}" for p in opts.gpu_products]
    if opts.inference_pool:
        parts.append("--inference-pool")
    return " ".join(parts)


def generate_text(topology: str, opts: LWSOptions, crd: Path | None = None, *,
                  shown_as: str | None = None, regenerate: str | None = None) -> tuple[str, list, int]:
    """Plan TOPOLOGY, render its manifests and validate them: (YAML text, notes, object count).

    Raises UserError (exit status 1) listing every problem when the generated manifests do not
    validate: widep never hands out manifests its own validator rejects.
    """
    from widep.k8s import validate as v
    from widep.k8s.lws import dump_manifests, header_lines, render_lws
    from widep.plan import plan as make_plan
    from widep.spec.topology import load_topology

    p = make_plan(load_topology(topology))
    docs = render_lws(p, **{f: getattr(opts, f) for f in opts.__dataclass_fields__})
    header = header_lines(p, command_line(shown_as or topology, opts), regenerate,
                          image=opts.image, model_path=opts.model_path)
    text = dump_manifests(docs, header)
    _, problems = v.validate_text(text, crd if crd is not None else v.default_crd_path())
    failing = [pr for pr in problems if pr.failing]
    if failing:
        lines = "\n  ".join(pr.format("generated") for pr in failing)
        raise UserError(
            f"widep generated manifests for {topology} that its validator rejects (a widep bug; nothing was written):\n  {lines}",
            exit_code=1,
        )
    return text, [pr for pr in problems if not pr.failing], len(docs)


@click.command("lws")
@click.argument("topology", required=False, metavar="[TOPOLOGY]")
@click.option("--placement", type=click.Choice(["pod-per-node", "pod-per-rank"]), default="pod-per-node", show_default=True,
              help="pod-per-node: a pod holds a node's GPUs and starts its ranks; pod-per-rank: one API server per pod.")
@click.option("--namespace", default=None, help="metadata.namespace of every object (default: none, use kubectl -n).")
@click.option("--image", default=None, help="Container image (default: the topology's vllm.image).")
@click.option("--router-image", default=None, help="Image of the vllm-router Deployment when the topology has a router (default: --image).")
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False), default=None, help="Write the YAML here instead of stdout.")
@click.option("--gpu-resource", default="nvidia.com/gpu", show_default=True, help="Extended resource name of a GPU.")
@click.option("--rdma-resource", default="rdma/ib", show_default=True,
              help="RDMA device-plugin resource, one per pod when cluster.network.rdma ('' for none).")
@click.option("--exclusive-topology", default=None, metavar="KEY",
              help="Node label key for the LWS exclusive-topology annotation (one group per domain).")
@click.option("--inference-pool", is_flag=True, help="Also emit an InferencePool (inference.networking.k8s.io/v1) per role.")
@click.option("--epp-port", type=int, default=9002, show_default=True, help="Service port of each pool's endpoint picker <pool>-epp.")
@click.option("--model-path", default=None, help="What vLLM loads in the pods (default: the topology's model).")
@click.option("--model-cache", default="hostpath:/mnt/local/hf-cache", show_default=True,
              help="Model cache volume at /var/cache/huggingface: hostpath:PATH, pvc:CLAIM or emptydir.")
@click.option("--gpu-product-label", default="nvidia.com/gpu.product", show_default=True,
              help="Node label with the GPU product, for required node affinity ('' for none).")
@click.option("--gpu-product", "gpu_products", multiple=True, metavar="VALUE",
              help="Accepted values of that label (repeatable; default from cluster.gpu, e.g. NVIDIA-H200).")
@click.option("--cpu", default=None, help="CPU request per pod (default: none on GPUs, the rank slots on CPU).")
@click.option("--memory", default=None, help="Memory request and limit per pod (default: none).")
@click.option("--shm-size", default=None, help="sizeLimit of the memory-backed /dev/shm (default: 1Gi per rank, at least 2Gi).")
@click.option("--termination-grace", "termination_grace_s", type=int, default=120, show_default=True,
              help="terminationGracePeriodSeconds.")
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
def lws_cmd(ctx: click.Context, topology: str | None, placement: str, namespace: str | None, image: str | None,
            router_image: str | None, output: str | None, gpu_resource: str, rdma_resource: str, exclusive_topology: str | None,
            inference_pool: bool, epp_port: int, model_path: str | None, model_cache: str, gpu_product_label: str,
            gpu_products: tuple[str, ...], cpu: str | None, memory: str | None, shm_size: str | None,
            termination_grace_s: int, validate_paths: tuple[str, ...], crd_path: str | None, as_json: bool) -> None:
    """LeaderWorkerSet manifests: generate them from TOPOLOGY, or validate any (--validate).

    Generated manifests are validated before they are printed. Each validation problem is printed
    as "FILE: doc N (Kind/name): path.to.field: message". Exit status: 0 when every document
    passes (notes such as "not checked" do not fail), 1 when any error or warning is found, 2 for
    bad usage (missing file or CRD, invalid topology or flags).
    """
    if topology is not None:
        if validate_paths:
            raise UserError(f"give a TOPOLOGY to generate or --validate FILE to check, not both. Given: {topology} and --validate {' '.join(validate_paths)}. Valid: widep lws TOPOLOGY, or widep lws --validate FILE")
        from widep.k8s.lws import LWSOptions

        opts = LWSOptions(
            image=image, router_image=router_image, namespace=namespace, placement=placement, gpu_resource=gpu_resource,
            rdma_resource=rdma_resource or None, exclusive_topology=exclusive_topology, inference_pool=inference_pool,
            epp_port=epp_port, model_path=model_path, model_cache=model_cache,
            gpu_product_label=gpu_product_label or None, gpu_products=tuple(gpu_products), cpu=cpu, memory=memory,
            shm_size=shm_size, termination_grace_s=termination_grace_s,
        )
        _check_flags(opts)
        if output and not Path(output).parent.is_dir():
            raise UserError(f"-o/--output: the folder {str(Path(output).parent)!r} does not exist. Given: -o {output}. "
                            "Valid: a file in an existing folder")
        text, notes, count = generate_text(topology, opts, Path(crd_path) if crd_path else None)
        for note in notes:
            click.echo(note.format(output or "stdout"), err=True)
        if output:
            Path(output).write_text(text, encoding="utf-8")
            click.echo(f"wrote {output}: {_plural(count, 'object')}, validated", err=True)
        else:
            click.echo(text, nl=False)
        return
    if not validate_paths:
        raise UserError("nothing to do. Given: no TOPOLOGY and no --validate. Valid: widep lws TOPOLOGY [options], or widep lws --validate FILE [--validate FILE ...] [--crd PATH] [--json]")
    _validate(ctx, validate_paths, crd_path, as_json)


def _check_flags(opts: LWSOptions) -> None:
    """Control characters in any string flag (a trailing newline pasted with a value) are refused up front."""
    from widep.render.quoting import control_problem

    for name in opts.__dataclass_fields__:
        value = getattr(opts, name)
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, str) and (why := control_problem(v)):
                flag = "--gpu-product" if name == "gpu_products" else "--" + name.replace("_", "-")
                raise UserError(f"{flag}: {why}. Given: {v!r}.")


def _validate(ctx: click.Context, paths: tuple[str, ...], crd_path: str | None, as_json: bool) -> None:
    from widep.k8s import validate as v

    files = _expand(paths)
    crd = Path(crd_path) if crd_path else v.default_crd_path()
    start = time.perf_counter()
    results = []
    for name in files:
        if name == "-":
            from widep.spec.safeyaml import decode_text

            count, problems = v.validate_text(decode_text(sys.stdin.buffer.read(), "--validate -: standard input"), crd)
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
