"""Every candidate topology of a GPU budget, and why the infeasible ones are infeasible.

A :class:`Budget` (model, GPU kind, GPU counts, GPUs per node, workload lengths) and a grid of choices
(TP, all2all backend, DBO, EPLB / redundant experts, max-num-seqs, P/D splits and group sizes) expand to
:class:`Candidate` objects. Each one is a complete topology (:meth:`Candidate.topology` gives the
:class:`~widep.spec.topology.TopologySpec` that ``widep plan`` / ``widep launch`` take).

Feasibility on the hot path (:func:`check`) applies the planner's own rules (:mod:`widep.plan.rules`, the one
copy) in the planner's order and its memory arithmetic (:func:`widep.plan.memory.memory_budget`, memoised per
role), so a sweep of thousands of candidates does not build thousands of plans; ``tests/test_perf_enumerate.py``
proves it agrees with :func:`widep.plan.plan` candidate by candidate. :func:`planner_reason` returns the
planner's own message for a candidate (used when infeasible candidates are shown or saved).

What is enumerated (whole nodes per role; a budget below one node uses part of one node):

* mixed: for each GPU count, every DP-group size that divides the nodes (the rest are replicas) x
  TP x backend x DBO (where the backend supports it) x EPLB choice x max-num-seqs;
* P/D: every split of the nodes into prefill and decode, every group size of each, x the prefill grid
  x the decode grid (smaller grids by default: see :class:`Grid`).

EPLB choices per role: off; on without redundant experts; on with the smallest number of redundant
experts (<= ``max_redundant``) that makes routed + redundant divide by EP. "off" stays in the grid even
when E does not divide by EP: such candidates are infeasible, with the reason.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import TYPE_CHECKING, Any, Literal

from widep.errors import UserError
from widep.perf.model import RoleInput
from widep.plan import rules
from widep.plan.memory import memory_budget
from widep.spec.hardware import GPUSpec, get_gpu
from widep.spec.models import MoEArch, load_preset
from widep.spec.vllm_versions import DEFAULT_VLLM_VERSION, table_for

if TYPE_CHECKING:
    from widep.spec.topology import TopologySpec

Kind = Literal["mixed", "prefill", "decode"]
BACKEND_TAG = {
    "deepep_low_latency": "ll",
    "deepep_high_throughput": "ht",
    "deepep_v2": "v2",
    "allgather_reducescatter": "ag",
    "pplx": "pplx",
    "naive": "naive",
}


@dataclass(frozen=True)
class RoleChoice:
    """One role of a candidate: group shape and the parallel/serving flags."""

    kind: Kind
    nodes: int
    """Nodes per DP group."""
    gpus_per_node: int
    """GPUs the role uses on each of its nodes."""
    replicas: int
    tp: int
    backend: str
    eplb: bool
    redundant: int
    dbo: bool
    max_num_seqs: int
    max_num_batched_tokens: int

    @property
    def ep(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def dp(self) -> int:
        return self.ep // self.tp

    @property
    def gpus(self) -> int:
        return self.ep * self.replicas

    @property
    def tag(self) -> str:
        shape = f"{self.nodes}n" if self.gpus_per_node >= 8 or self.nodes > 1 else f"{self.gpus_per_node}g"
        parts = [
            shape + (f"x{self.replicas}" if self.replicas > 1 else ""),
            f"tp{self.tp}",
            BACKEND_TAG.get(self.backend, self.backend),
        ]
        if self.dbo:
            parts.append("dbo")
        if self.eplb:
            parts.append(f"r{self.redundant}" if self.redundant else "eplb")
        parts.append(f"s{self.max_num_seqs}" if self.kind != "prefill" else f"b{self.max_num_batched_tokens // 1024}k")
        return "-".join(parts)

    def describe(self) -> str:
        flags = [self.backend]
        if self.dbo:
            flags.append("DBO")
        if self.eplb:
            flags.append(f"EPLB+{self.redundant}")
        grp = f"{self.nodes}x{self.gpus_per_node}"
        rep = f" x{self.replicas} replicas" if self.replicas > 1 else ""
        return (
            f"{self.kind} DP{self.dp}xTP{self.tp}=EP{self.ep} on {grp}{rep}, {', '.join(flags)}, "
            f"seqs {self.max_num_seqs}"
        )


@dataclass(frozen=True)
class Candidate:
    """A complete deployment: a model on GPUs of one kind, split into roles."""

    model: str
    gpu: str
    gpus_per_node: int
    roles: tuple[RoleChoice, ...]
    max_model_len: int
    context_len: int
    vllm_version: str = DEFAULT_VLLM_VERSION
    kv_cache_dtype: str = "auto"
    gpu_memory_utilization: float = 0.9
    spec_tokens: int = 0

    @property
    def mode(self) -> str:
        return "pd" if any(r.kind != "mixed" for r in self.roles) else "mixed"

    @property
    def gpus(self) -> int:
        return sum(r.gpus for r in self.roles)

    @property
    def nodes(self) -> int:
        return sum(r.nodes * r.replicas for r in self.roles)

    @cached_property
    def id(self) -> str:
        if self.mode == "mixed":
            return f"{self.gpus}g-m-" + "_".join(r.tag for r in self.roles)
        pre = next(r for r in self.roles if r.kind == "prefill")
        dec = next(r for r in self.roles if r.kind == "decode")
        return f"{self.gpus}g-pd-p{pre.tag}_d{dec.tag}"

    def describe(self) -> str:
        return " | ".join(r.describe() for r in self.roles)

    def topology_doc(self) -> dict[str, Any]:
        """The topology file of this candidate (a plain dict, YAML-ready)."""
        digest = hashlib.sha1(self.id.encode()).hexdigest()[:8]
        roles = []
        for i, r in enumerate(self.roles):
            role: dict[str, Any] = {
                "name": r.kind if r.kind != "mixed" else "serve",
                "kind": r.kind,
                "nodes": r.nodes,
                "replicas": r.replicas,
                "tp": r.tp,
                "all2all_backend": r.backend,
                "max_num_seqs": r.max_num_seqs,
                "max_num_batched_tokens": r.max_num_batched_tokens,
                "max_model_len": self.max_model_len,
                "context_len": self.context_len,
                "gpu_memory_utilization": self.gpu_memory_utilization,
            }
            if r.gpus_per_node != self.gpus_per_node:
                role["gpus_per_node"] = r.gpus_per_node
            if r.eplb:
                role["eplb"] = {"enabled": True, "redundant_experts": r.redundant}
            if r.dbo:
                role["dbo"] = {"enabled": True}
            if i > 0:
                role["port"] = 8000 + 200 * i
            if self.spec_tokens:
                role["extra_args"] = [
                    "--speculative-config",
                    f'{{"method": "mtp", "num_speculative_tokens": {self.spec_tokens}}}',
                ]
            roles.append(role)
        return {
            "name": f"sweep-{self.model}-{digest}"[:63].strip("-.").lower(),
            "description": f"widep sweep candidate {self.id}",
            "model": {"preset": self.model, "kv_cache_dtype": self.kv_cache_dtype},
            "cluster": {"gpu": self.gpu, "gpus_per_node": self.gpus_per_node, "nodes": self.nodes},
            "roles": roles,
            "vllm": {"version": self.vllm_version},
        }

    def topology(self) -> TopologySpec:
        from widep.spec.topology import parse_topology

        return parse_topology(self.topology_doc(), f"(sweep candidate {self.id})")

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "mode": self.mode,
            "gpus": self.gpus,
            "nodes": self.nodes,
            "model": self.model,
            "gpu": self.gpu,
            "roles": [r.__dict__ | {"dp": r.dp, "ep": r.ep} for r in self.roles],
        }


@dataclass(frozen=True)
class Grid:
    """The choices enumerated per role kind."""

    modes: tuple[str, ...] = ("mixed", "pd")
    tp: tuple[int, ...] = (1, 2, 4, 8)
    backends: tuple[str, ...] = ("deepep_low_latency", "deepep_high_throughput", "allgather_reducescatter")
    dbo: tuple[bool, ...] = (False, True)
    eplb: tuple[str, ...] = ("off", "on", "redundant")
    max_redundant: int = 64
    max_num_seqs: tuple[int, ...] = (64, 128, 256, 512)
    mixed_max_num_batched_tokens: int = 8192
    pd_prefill_tp: tuple[int, ...] = (1,)
    pd_prefill_backends: tuple[str, ...] = ("deepep_high_throughput",)
    pd_prefill_eplb: tuple[str, ...] = ("off", "redundant")
    pd_prefill_max_num_batched_tokens: int = 16384
    pd_prefill_max_num_seqs: int = 64
    pd_decode_tp: tuple[int, ...] = (1, 2)
    pd_decode_backends: tuple[str, ...] = ("deepep_low_latency",)
    pd_decode_eplb: tuple[str, ...] = ("off", "redundant")
    pd_decode_max_num_seqs: tuple[int, ...] = (128, 256)


@dataclass(frozen=True)
class Budget:
    """What the user has: a model, GPUs of one kind, a range of GPU counts, and the traffic's lengths."""

    model: str
    gpu: str
    gpus: tuple[int, ...]
    gpus_per_node: int = 8
    isl: int = 2000
    osl: int = 2000
    vllm_version: str = DEFAULT_VLLM_VERSION
    kv_cache_dtype: str = "auto"
    gpu_memory_utilization: float = 0.9
    spec_tokens: int = 0
    grid: Grid = field(default_factory=Grid)

    @property
    def max_model_len(self) -> int:
        return self.isl + self.osl


# ---------------------------------------------------------------------------------------------------------
# Enumeration


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _eplb_options(names: tuple[str, ...], E: int, ep: int, max_redundant: int, cpu: bool) -> list[tuple[bool, int]]:
    out: list[tuple[bool, int]] = []
    for name in names:
        if name == "off":
            out.append((False, 0))
        elif cpu or ep <= 1:
            continue
        elif name == "on":
            out.append((True, 0))
        elif name == "redundant":
            r = next((r for r in range(1, max_redundant + 1) if (E + r) % ep == 0), None)
            if r is not None:
                out.append((True, r))
    return list(dict.fromkeys(out))


def _role_grid(
    kind: Kind,
    nodes: int,
    gpn: int,
    replicas: int,
    *,
    arch: MoEArch,
    gpu: GPUSpec,
    budget: Budget,
    tps: tuple[int, ...],
    backends: tuple[str, ...],
    eplb: tuple[str, ...],
    seqs: tuple[int, ...],
    mnbt: int | None,
) -> Iterator[RoleChoice]:
    g = budget.grid
    vt = table_for(budget.vllm_version)
    cpu = gpu.device == "cpu"
    ep = nodes * gpn
    for tp in tps:
        if gpn % tp:
            continue
        if ep <= 1 or cpu:
            backend_opts = ["allgather_reducescatter" if "allgather_reducescatter" in vt.all2all_backends else "naive"]
        else:
            backend_opts = [b for b in backends if b in vt.all2all_backends]
        for backend in backend_opts:
            dbo_opts = [d for d in g.dbo if not d or (backend in vt.dbo_backends and vt.has_dbo and not cpu and ep > 1)]
            for dbo in dbo_opts:
                for use_eplb, red in _eplb_options(eplb, arch.routed_experts, ep, g.max_redundant, cpu):
                    for mns in seqs:
                        batched = mnbt if mnbt is not None else max(mns, 256)
                        yield RoleChoice(kind, nodes, gpn, replicas, tp, backend, use_eplb, red, dbo, mns, batched)


def enumerate_candidates(budget: Budget) -> list[Candidate]:
    """Every candidate of the budget's grid (feasible or not), in a stable order."""
    arch = load_preset(budget.model)
    gpu = get_gpu(budget.gpu)
    g = budget.grid
    gpn = budget.gpus_per_node
    out: list[Candidate] = []
    common = dict(
        model=budget.model,
        gpu=gpu.name,
        gpus_per_node=gpn,
        max_model_len=budget.max_model_len,
        context_len=budget.max_model_len,
        vllm_version=budget.vllm_version,
        kv_cache_dtype=budget.kv_cache_dtype,
        gpu_memory_utilization=budget.gpu_memory_utilization,
        spec_tokens=budget.spec_tokens,
    )
    kw = dict(arch=arch, gpu=gpu, budget=budget)
    for n_gpus in sorted(set(budget.gpus)):
        if n_gpus < gpn:
            shapes = [(1, n_gpus, 1)]  # part of one node
            whole_nodes = None
        elif n_gpus % gpn == 0:
            whole_nodes = n_gpus // gpn
            shapes = [(s, gpn, whole_nodes // s) for s in _divisors(whole_nodes)]
        else:
            continue
        if "mixed" in g.modes:
            for nodes, role_gpn, reps in shapes:
                for rc in _role_grid(
                    "mixed",
                    nodes,
                    role_gpn,
                    reps,
                    tps=g.tp,
                    backends=g.backends,
                    eplb=g.eplb,
                    seqs=g.max_num_seqs,
                    mnbt=g.mixed_max_num_batched_tokens,
                    **kw,
                ):
                    out.append(Candidate(roles=(rc,), **common))
        if "pd" in g.modes and whole_nodes and whole_nodes >= 2:
            for n_pre in range(1, whole_nodes):
                n_dec = whole_nodes - n_pre
                for sp, sd in itertools.product(_divisors(n_pre), _divisors(n_dec)):
                    pres = list(
                        _role_grid(
                            "prefill",
                            sp,
                            gpn,
                            n_pre // sp,
                            tps=g.pd_prefill_tp,
                            backends=g.pd_prefill_backends,
                            eplb=g.pd_prefill_eplb,
                            seqs=(g.pd_prefill_max_num_seqs,),
                            mnbt=g.pd_prefill_max_num_batched_tokens,
                            **kw,
                        )
                    )
                    decs = list(
                        _role_grid(
                            "decode",
                            sd,
                            gpn,
                            n_dec // sd,
                            tps=g.pd_decode_tp,
                            backends=g.pd_decode_backends,
                            eplb=g.pd_decode_eplb,
                            seqs=g.pd_decode_max_num_seqs,
                            mnbt=None,
                            **kw,
                        )
                    )
                    for pr, dr in itertools.product(pres, decs):
                        out.append(Candidate(roles=(pr, dr), **common))
    return out


# ---------------------------------------------------------------------------------------------------------
# Feasibility: the planner's rules (widep/plan/rules.py), in its order, without building a plan


@dataclass(frozen=True)
class Verdict:
    """Feasibility of a candidate: the roles the model needs, or the reason it cannot run."""

    ok: bool
    category: str = ""
    """'' when ok; else 'divisibility', 'memory', 'kv_cache' or 'config'."""
    field: str = ""
    """The topology field the planner would name (roles[i]...)."""
    reason: str = ""
    roles: tuple[RoleInput, ...] = ()


def _weight_dtype(arch: MoEArch) -> str:
    return arch.default_weight_dtype


@lru_cache(maxsize=65536)
def _role_check(
    model: str,
    gpu_name: str,
    rc: RoleChoice,
    max_model_len: int,
    context_len: int,
    kv_cache_dtype: str,
    gmu: float,
    vllm_version: str,
    spec_tokens: int,
) -> tuple[str, str, str, RoleInput | None]:
    """(category, field suffix, reason, RoleInput) for one role; category '' when it fits."""
    arch = load_preset(model)
    gpu = get_gpu(gpu_name)
    vt = table_for(vllm_version)
    cpu = gpu.device == "cpu"
    E, R = arch.routed_experts, rc.redundant
    ep = rc.ep
    refusal = (
        rules.backend_runs(rc.backend, vllm_version, vt.line, vt.all2all_backends, vt.removed_backends)
        or rules.eplb_possible(rc.eplb, cpu, True, ep)
        or rules.redundant_needs_eplb(R, rc.eplb)
        or rules.dbo_possible(rc.dbo, vt.has_dbo, vllm_version, cpu, rc.backend, vt.dbo_backends)
        or rules.experts_divide(E, R, ep, rc.dp, rc.tp, True, ep, False)
        or rules.batched_tokens_cover_seqs(rc.max_num_batched_tokens, rc.max_num_seqs)
    )
    if refusal:
        return refusal.category, refusal.field, refusal.reason, None
    dp = rc.dp
    cuda_graphs = not (rc.backend == "deepep_high_throughput" and dp > 1)
    kv_dtype = "fp8" if kv_cache_dtype == "fp8" else "bf16"
    mem = memory_budget(
        arch=arch,
        gpu=gpu,
        weight_dtype=_weight_dtype(arch),
        kv_dtype=kv_dtype,
        tp=rc.tp,
        dp_size=dp,
        ep_size=ep,
        experts_per_gpu=(E + R) // ep,
        backend=rc.backend,
        max_num_seqs=rc.max_num_seqs,
        max_num_batched_tokens=rc.max_num_batched_tokens,
        gpu_memory_utilization=gmu,
        cuda_graphs=cuda_graphs,
        context_len=context_len,
        fixed_kv_gib=1.0 if cpu else None,
    )
    refusal = rules.memory_fits(mem, cpu, rc.kind, gpu.name, gmu) or rules.kv_holds_context(mem, max_model_len)
    if refusal:
        return refusal.category, refusal.field, refusal.reason, None
    ri = RoleInput(
        kind=rc.kind,
        gpu=gpu,
        tp=rc.tp,
        dp=dp,
        ep=ep,
        replicas=rc.replicas,
        nodes=rc.nodes,
        expert_parallel=True,
        physical_experts=E + R,
        redundant=R,
        eplb=rc.eplb,
        dbo=rc.dbo,
        dbo_decode_threshold=32,
        dbo_prefill_threshold=512,
        backend=rc.backend,
        cuda_graphs=cuda_graphs and not cpu,
        max_num_batched_tokens=rc.max_num_batched_tokens,
        max_num_seqs=rc.max_num_seqs,
        kv_tokens=mem.kv_tokens,
        spec_tokens=spec_tokens,
    )
    return "", "", "", ri


def check(c: Candidate) -> Verdict:
    """Feasibility of ``c`` by the planner's rules (first failing role, in role order)."""
    roles = []
    for i, rc in enumerate(c.roles):
        cat, fld, why, ri = _role_check(
            c.model,
            c.gpu,
            rc,
            c.max_model_len,
            c.context_len,
            c.kv_cache_dtype,
            c.gpu_memory_utilization,
            c.vllm_version,
            c.spec_tokens,
        )
        if cat:
            return Verdict(False, cat, f"roles[{i}].{fld}", f"{rc.kind} role: {why}")
        roles.append(ri)
    return Verdict(True, roles=tuple(roles))  # type: ignore[arg-type]


def planner_reason(c: Candidate) -> str | None:
    """The planner's own message when ``c`` is infeasible (None when it plans)."""
    from widep.plan.core import plan

    try:
        plan(c.topology())
    except UserError as err:
        return str(err)
    return None
