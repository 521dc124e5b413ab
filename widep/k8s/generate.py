"""Generating a topology's Kubernetes manifests for ``widep lws``, ``--kustomize`` and ``regen``: plan, render,
validate; widep never hands out manifests its own validator rejects. (Logic the CLI, the kustomize writer and the
regenerator share, kept out of the CLI module.)"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING

from widep.errors import UserError

if TYPE_CHECKING:
    from widep.k8s.lws import LWSOptions


def command_line(topology: str, opts: LWSOptions) -> str:
    """The ``widep lws`` command that reproduces ``opts`` (defaults left out), for file headers."""
    from widep.k8s.lws import LWSOptions

    d = LWSOptions()
    parts = ["widep lws", topology]
    flags = [
        ("--provider", opts.provider, d.provider),
        ("--front-door", opts.front_door, d.front_door),
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
        ("--routing-sidecar-image", opts.routing_sidecar_image, d.routing_sidecar_image),
        ("--jit-cache", opts.jit_cache, d.jit_cache),
        ("--ephemeral-storage", opts.ephemeral_storage, d.ephemeral_storage),
        ("--start-budget", opts.start_budget_s, d.start_budget_s),
    ]
    for flag, value, default in flags:
        if value != default:
            parts.append(f"{flag} {shlex.quote(str(value or ''))}")
    parts += [f"--gpu-product {shlex.quote(p)}" for p in opts.gpu_products]
    if opts.inference_pool:
        parts.append("--inference-pool")
    return " ".join(parts)


def generate_text(
    topology: str,
    opts: LWSOptions,
    crd: Path | None = None,
    *,
    shown_as: str | None = None,
    regenerate: str | None = None,
) -> tuple[str, list, int]:
    """Plan TOPOLOGY, render its manifests and validate them: (YAML text, notes, object count)."""
    text, notes, count, _ = generate(topology, opts, crd, shown_as=shown_as, regenerate=regenerate)
    return text, notes, count


def generate(
    topology: str,
    opts: LWSOptions,
    crd: Path | None = None,
    *,
    shown_as: str | None = None,
    regenerate: str | None = None,
    manifests_name: str = "the manifests",
) -> tuple[str, list, int, str | None]:
    """Plan TOPOLOGY, render its manifests and validate them: (YAML text, notes, object count, the llm-d
    router chart values as YAML text or None when the front door is not llm-d's).

    Raises UserError (exit status 1) listing every problem when the generated manifests do not
    validate: widep never hands out manifests its own validator rejects.
    """
    from widep.k8s import validate as v
    from widep.k8s.frontdoor import chart_objects, chart_pool, chart_release, check_router_values, router_values_text
    from widep.k8s.lws import (
        dump_manifests,
        header_lines,
        render_lws,
        router_values_for,
    )
    from widep.k8s.validate.cross import prerequisites_of
    from widep.plan import plan as make_plan
    from widep.spec.topology import load_topology

    p = make_plan(load_topology(topology))
    docs = render_lws(p, **{f: getattr(opts, f) for f in opts.__dataclass_fields__})
    header = header_lines(
        p,
        command_line(shown_as or topology, opts),
        regenerate,
        image=opts.image,
        model_path=opts.model_path,
        docs=docs,
        opts=opts,
    )
    text = dump_manifests(docs, header)
    _, problems = v.validate_text(text, crd if crd is not None else v.default_crd_path())
    failing = [pr for pr in problems if pr.failing]
    values = router_values_for(p, docs, **{f: getattr(opts, f) for f in opts.__dataclass_fields__})
    values_text = None
    if values is not None:
        # the pool the chart will create from these values, checked as if it were in the file: the GAIE CRD, and
        # its selector / targetPorts against the pods (it is not emitted: the chart owns it)
        release = chart_release(p)
        pool = chart_pool(release, values, opts.namespace)
        known = prerequisites_of(text) | set(chart_objects(release))
        found = v.validate_documents(
            docs + [pool], crd if crd is not None else v.default_crd_path(), prerequisites=known
        )
        failing += [pr for pr in found if pr.doc == len(docs) + 1 and pr.failing]
        failing += [
            v.Problem(0, "router values", "", "", m, "router-values") for m in check_router_values(values, pool)
        ]
        values_text = router_values_text(p, values, manifests_name)
    if failing:
        lines = "\n  ".join(pr.format("generated") for pr in failing)
        raise UserError(
            f"widep generated manifests for {topology} that its validator rejects (a widep bug; "
            f"nothing was written):\n  {lines}",
            exit_code=1,
        )
    return text, [pr for pr in problems if not pr.failing], len(docs), values_text
