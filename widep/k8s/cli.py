"""``widep lws``: LeaderWorkerSet manifests for Kubernetes.

``widep lws TOPOLOGY`` generates one LeaderWorkerSet and one Service per role, the front door
(:mod:`widep.k8s.frontdoor`; every P/D topology gets one) and, with ``--inference-pool`` outside P/D, an
InferencePool per role, with :mod:`widep.k8s.lws`; ``--kustomize DIR`` writes them as a base plus one
overlay per provider profile (:mod:`widep.k8s.kustomize`). It validates them with
:mod:`widep.k8s.validate` (the real LWS CRD schema, the LWS webhook rules, core Kubernetes schemas)
and prints YAML; manifests that do not validate are never printed. ``--validate FILE`` (repeatable;
a directory means its ``*.yaml``/``*.yml`` files; ``-`` reads standard input) checks any manifest.
The checked-in examples in ``lws/`` are rewritten only by ``python -m widep.k8s.regen``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from widep.errors import UserError
from widep.k8s.frontdoor import ROUTER_IMAGE, ROUTING_SIDECAR_IMAGE
from widep.k8s.generate import generate
from widep.k8s.providers import PROVIDERS

if TYPE_CHECKING:
    from widep.k8s.lws import LWSOptions

PROVIDER_NAMES = tuple(PROVIDERS)


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
                raise UserError(
                    f"no *.yaml or *.yml files in directory {given}. Given: --validate {given}. Valid: a YAML file or "
                    "a directory containing some"
                )
            out.extend(str(f) for f in files)
        elif p.is_file():
            out.append(given)
        else:
            raise UserError(
                f"manifest file not found. Given: --validate {given}. Valid: an existing YAML file, a directory of "
                "them, or '-' for standard input"
            )
    return out


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


@click.command("lws")
@click.argument("topology", required=False, metavar="[TOPOLOGY]")
@click.option(
    "--provider",
    type=click.Choice(list(PROVIDER_NAMES)),
    default="generic",
    show_default=True,
    help="Cluster profile: RDMA resource/annotations, HCA variables, privileges, node selection, cache paths.",
)
@click.option(
    "--front-door",
    type=click.Choice(["auto", "router", "llm-d", "none"]),
    default="auto",
    show_default=True,
    help="What routes requests: auto = vllm-router for P/D topologies (and where the topology has a router), "
    "router, llm-d (one InferencePool + routing sidecar + EPP values), none.",
)
@click.option(
    "--router-values",
    type=click.Path(dir_okay=False),
    default=None,
    help="With --front-door llm-d: write llm-d's router chart values here (default: beside -o FILE).",
)
@click.option(
    "--routing-sidecar-image",
    default=ROUTING_SIDECAR_IMAGE,
    show_default=True,
    help="llm-d routing sidecar image (--front-door llm-d).",
)
@click.option(
    "--jit-cache",
    default=None,
    help="Compile/JIT cache volume at /var/cache/vllm: hostpath:PATH, pvc:CLAIM "
    "or emptydir (default: the provider's hostPath, which survives group recreation).",
)
@click.option("--ephemeral-storage", default=None, help="Ephemeral-storage request and limit per pod (default: sized).")
@click.option(
    "--start-budget",
    "start_budget_s",
    type=int,
    default=None,
    help="Seconds a pod may take to start (default: from model size and role, or vllm.ready_timeout_s).",
)
@click.option(
    "--kustomize",
    "kustomize_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Write a kustomize base plus one overlay per provider profile into this directory.",
)
@click.option(
    "--placement",
    type=click.Choice(["pod-per-node", "pod-per-rank"]),
    default="pod-per-node",
    show_default=True,
    help="pod-per-node: a pod holds a node's GPUs and starts its ranks; pod-per-rank: one API server per pod.",
)
@click.option("--namespace", default=None, help="metadata.namespace of every object (default: none, use kubectl -n).")
@click.option("--image", default=None, help="Container image (default: the topology's vllm.image).")
@click.option(
    "--router-image",
    default=ROUTER_IMAGE,
    show_default=True,
    help="Image of the vllm-router Deployment; it must contain vllm-router (pip install vllm-router).",
)
@click.option(
    "-o",
    "--output",
    "output",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write the YAML here instead of stdout.",
)
@click.option("--gpu-resource", default="nvidia.com/gpu", show_default=True, help="Extended resource name of a GPU.")
@click.option(
    "--rdma-resource",
    default=None,
    help="RDMA device-plugin resource, one per pod of roles that use RDMA (default: the provider's own "
    "wiring, else cluster.network.rdma_resource; '' or none for none). Required (here or in the topology) "
    "where DeepEP spans pods under --provider generic.",
)
@click.option(
    "--exclusive-topology",
    default=None,
    metavar="KEY",
    help="Node label key for the LWS exclusive-topology annotation (one group per domain).",
)
@click.option(
    "--inference-pool", is_flag=True, help="Also emit an InferencePool (inference.networking.k8s.io/v1) per role."
)
@click.option(
    "--epp-port",
    type=int,
    default=9002,
    show_default=True,
    help="Service port of each pool's endpoint picker <pool>-epp.",
)
@click.option("--model-path", default=None, help="What vLLM loads in the pods (default: the topology's model).")
@click.option(
    "--model-cache",
    default=None,
    help="Model cache volume at /var/cache/huggingface: hostpath:PATH, hostpath-ro:PATH, pvc:CLAIM, "
    "pvc-ro:CLAIM or emptydir (default: the provider's hostPath).",
)
@click.option(
    "--gpu-product-label",
    default=None,
    help="Node label with the GPU product, for node affinity (default: the provider's; '' for none).",
)
@click.option(
    "--gpu-product",
    "gpu_products",
    multiple=True,
    metavar="VALUE",
    help="Accepted values of that label (repeatable; default from cluster.gpu, e.g. NVIDIA-H200).",
)
@click.option("--cpu", default=None, help="CPU request and limit per pod (default: 4 per GPU, 1 per CPU slot).")
@click.option(
    "--memory",
    default=None,
    help="Memory request and limit per pod (default: the ranks' weights + 8 GiB per rank + /dev/shm).",
)
@click.option(
    "--shm-size", default=None, help="sizeLimit of the memory-backed /dev/shm (default: 1Gi per rank, at least 2Gi)."
)
@click.option(
    "--termination-grace",
    "termination_grace_s",
    type=int,
    default=120,
    show_default=True,
    help="terminationGracePeriodSeconds.",
)
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
    help="The LWS CRD YAML (default: $WIDEP_LWS_CRD, else the copy shipped inside widep).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option(
    "--explain",
    is_flag=True,
    help="With TOPOLOGY: print what to apply in which order, what a pod failure costs and what only a cluster can "
    "verify (with the command that does), instead of the manifests.",
)
@click.pass_context
def lws_cmd(
    ctx: click.Context,
    topology: str | None,
    provider: str,
    front_door: str,
    router_values: str | None,
    routing_sidecar_image: str,
    jit_cache: str | None,
    ephemeral_storage: str | None,
    start_budget_s: int | None,
    kustomize_dir: str | None,
    placement: str,
    namespace: str | None,
    image: str | None,
    router_image: str,
    output: str | None,
    gpu_resource: str,
    rdma_resource: str | None,
    exclusive_topology: str | None,
    inference_pool: bool,
    epp_port: int,
    model_path: str | None,
    model_cache: str | None,
    gpu_product_label: str | None,
    gpu_products: tuple[str, ...],
    cpu: str | None,
    memory: str | None,
    shm_size: str | None,
    termination_grace_s: int,
    validate_paths: tuple[str, ...],
    crd_path: str | None,
    as_json: bool,
    explain: bool,
) -> None:
    """LeaderWorkerSet manifests: generate them from TOPOLOGY, or validate any (--validate).

    Generated manifests are validated before they are printed. Each validation problem is printed
    as "FILE: doc N (Kind/name): path.to.field: message". Exit status: 0 when every document
    passes (notes such as "not checked" do not fail), 1 when any error or warning is found, 2 for
    bad usage (missing file or CRD, invalid topology or flags).
    """
    if topology is not None:
        if validate_paths:
            raise UserError(
                f"give a TOPOLOGY to generate or --validate FILE to check, not both. Given: {topology} and --validate "
                f"{' '.join(validate_paths)}. Valid: widep lws TOPOLOGY, or widep lws --validate FILE"
            )
        from widep.k8s.lws import LWSOptions

        opts = LWSOptions(
            image=image,
            router_image=router_image,
            namespace=namespace,
            placement=placement,
            gpu_resource=gpu_resource,
            rdma_resource=rdma_resource,
            exclusive_topology=exclusive_topology,
            inference_pool=inference_pool,
            epp_port=epp_port,
            model_path=model_path,
            model_cache=model_cache,
            gpu_product_label=gpu_product_label,
            gpu_products=tuple(gpu_products),
            cpu=cpu,
            memory=memory,
            shm_size=shm_size,
            termination_grace_s=termination_grace_s,
            provider=provider,
            front_door=front_door,
            routing_sidecar_image=routing_sidecar_image,
            jit_cache=jit_cache,
            ephemeral_storage=ephemeral_storage,
            start_budget_s=start_budget_s,
        )
        _check_flags(opts)
        from widep.render.quoting import control_problem

        for flag, path in (("TOPOLOGY", topology), ("-o/--output", output), ("--router-values", router_values)):
            if path and not _utf8(str(path)):
                raise UserError(
                    f"{flag}: the file name is not valid UTF-8 (given: {str(path).encode('utf-8', 'replace')!r}); "
                    "widep writes it into the manifests' header, which must be UTF-8. Valid: rename the file"
                )
        for flag, path in (("-o/--output", output), ("--router-values", router_values), ("--kustomize", kustomize_dir)):
            if path and (why := control_problem(path)):
                raise UserError(f"{flag}: {why}. Given: {path!r}.")
        if output and not Path(output).parent.is_dir():
            raise UserError(
                f"-o/--output: the folder {str(Path(output).parent)!r} does not exist. Given: -o {output}. "
                "Valid: a file in an existing folder"
            )
        crd = Path(crd_path) if crd_path else None
        if kustomize_dir:
            from widep.k8s.kustomize import write_kustomize

            if output or provider != "generic":
                given = "-o " + output if output else "--provider " + provider
                raise UserError(
                    "--kustomize writes a base and an overlay for every provider profile into its "
                    f"directory. Given: --kustomize {kustomize_dir} with {given}. "
                    "Valid: --kustomize DIR alone"
                )

            for line in write_kustomize(topology, opts, Path(kustomize_dir), crd):
                click.echo(line, err=True)
            return
        if explain:
            if output or kustomize_dir:
                raise UserError(
                    f"--explain prints an explanation, not manifests. Given: --explain with "
                    f"{'-o ' + output if output else '--kustomize ' + str(kustomize_dir)}. Valid: --explain alone"
                )
            import yaml

            from widep.k8s.lws import explain_lines

            text, _, _, _ = generate(topology, opts, crd)  # validated like the manifests it explains
            for line in explain_lines([d for d in yaml.safe_load_all(text) if d]):
                click.echo(line)
            return
        if router_values is None and output:
            router_values = str(Path(output).with_suffix("")) + ".router-values.yaml"
        text, notes, count, values = generate(
            topology, opts, crd, manifests_name=Path(output).name if output else "the manifests"
        )
        for note in notes:
            click.echo(note.format(output or "stdout"), err=True)
        if output:
            write_output(output, text, "-o/--output")
            click.echo(f"wrote {output}: {_plural(count, 'object')}, validated", err=True)
        else:
            click.echo(text, nl=False)
        if values is not None:
            if router_values:
                write_output(router_values, values, "--router-values")
                click.echo(
                    f"wrote {router_values}: llm-d router chart values (EPP P/D configuration), checked", err=True
                )
            else:
                click.echo(
                    "note: --front-door llm-d also needs llm-d's router chart values: give --router-values FILE "
                    "(or -o FILE, which writes them beside it)",
                    err=True,
                )
        return
    if explain:
        raise UserError("--explain needs a TOPOLOGY. Given: --explain alone. Valid: widep lws TOPOLOGY --explain")
    if not validate_paths:
        raise UserError(
            "nothing to do. Given: no TOPOLOGY and no --validate. Valid: widep lws TOPOLOGY [options], or widep lws "
            "--validate FILE [--validate FILE ...] [--crd PATH] [--json]"
        )
    _validate(ctx, validate_paths, crd_path, as_json)


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a file name with bytes that are not UTF-8 (os.fsdecode's surrogates)
        return False
    return True


def write_output(path: str, text: str, flag: str) -> None:
    """Write ``text`` to ``path`` whole or not at all: a regular file goes through a temporary file in the
    same folder and a rename; a device or pipe (/dev/stdout, /dev/full) is written directly. An I/O failure
    (ENOSPC, EACCES, EIO) is one line, exit 1, and leaves no half-written file behind."""
    import os
    import tempfile

    target = Path(path)
    data = text.encode("utf-8")
    try:
        if target.exists() and not target.is_file():
            with open(target, "wb") as f:
                f.write(data)
            return
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as err:
        raise UserError(
            f"{flag}: cannot write {path!r}: {err.strerror or err}; nothing was written.", exit_code=1
        ) from None


def _check_flags(opts: LWSOptions) -> None:
    """Control characters in any string flag (a trailing newline pasted with a value) are refused up front."""
    from widep.render.quoting import control_problem

    for name in opts.__dataclass_fields__:
        value = getattr(opts, name)
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, str) and (why := control_problem(v)):
                flag = "--gpu-product" if name == "gpu_products" else "--" + name.replace("_", "-")
                raise UserError(f"{flag}: {why}. Given: {v!r}.")
    for name in ("cpu", "memory", "shm_size", "ephemeral_storage"):  # Kubernetes refuses negative requests/limits
        value = getattr(opts, name, None)
        if isinstance(value, str) and value.startswith("-"):
            raise UserError(
                f"--{name.replace('_', '-')}: a negative quantity. Given: {value!r}. Valid: a positive Kubernetes "
                "quantity, e.g. '32', '500m', '512Gi'"
            )


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
