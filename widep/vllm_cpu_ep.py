"""vLLM general plugin: wide expert parallelism on vLLM's CPU backend.

vLLM loads this in every process it starts (entry point ``vllm.general_plugins``, name ``widep_cpu_ep``).
On the CPU platform, and only where the installed vLLM still lacks them, it fills two gaps that stop a
DP >= 2 expert-parallel group from answering (docs/architecture.md, "vLLM 0.32 on CPU and wide EP"), and keeps NIXL's
progress thread from spinning (3, below):

1. ``CpuCommunicator.all_gatherv`` / ``reduce_scatterv`` (inherited from ``DeviceCommunicatorBase``, where they
   raise ``NotImplementedError``); the allgather/reduce-scatter all2all manager that MoE dispatch/combine uses
   with DP > 1 needs them. Filled as ``torch.distributed`` collectives over the communicator's CPU (gloo) group,
   with per-rank sizes that may differ (rows padded to the largest rank, then sliced).
2. ``CPUUnquantizedExperts.apply`` ignores ``expert_map``: under EP the router's global expert ids index the rank's
   local weights (wrong experts, or an out-of-range read that segfaults in ``cpu_fused_moe``). Filled by mapping
   global ids to local slots through ``expert_map``; non-local experts get weight 0 (and a valid slot), so each
   rank returns only its own experts' share and the EP combine (a sum over ranks) is the whole MoE output.

3. NIXL's Python API creates every agent with a progress-thread delay of 0, so the UCX progress thread polls
   without sleeping: one whole core per vLLM worker that does P/D (measured: 2.9 CPU-s in 3 s of an idle agent;
   with 100 us, 0.05). On a CPU host those cores are the ones the model runs on: a P/D pair on 2 cores starved a
   restarting rank for minutes. Agents whose delay is still 0 get ``WIDEP_NIXL_PROGRESS_DELAY_US`` (default 100;
   0 keeps NIXL's busy polling).

4. Routed-expert return (``--enable-return-routed-experts``): vLLM wires its AuxOutput connector (the
   ``RoutedExpertsCapturer`` bound to every MoE router, the per-request row buffer, the block store) only into model
   runner V2, which needs Triton; ``VllmConfig._verify_aux_output_compatibility`` therefore rejects the CPU
   platform ("AuxOutput Connector requires Model Runner V2"). Filled by giving the V1 ``CPUModelRunner`` the same
   four calls model runner V2 makes on vLLM's own ``AuxOutputWorkerConnector`` (create it after the KV cache,
   ``begin_step`` before the forward, ``prepare_output`` after it, the CPU copy + ``process_output`` into
   ``ModelRunnerOutput.aux_output_connector_output`` after sampling), and by letting the check pass the CPU
   platform as it passes out-of-tree platforms that "bring their own model runners" (every other check of it still
   runs). The scheduler, output processor and OpenAI response (``choices[].routed_experts``) are vLLM's own.
   Without the flag nothing runs differently.

Each gap is detected by behaviour, not by version: the collective is called on a bare communicator and must
raise ``NotImplementedError``; the experts are run on a two-expert problem whose only routed expert is non-local
and must return non-zero. A vLLM that already behaves is left alone (logged once per process). On any other
platform nothing is imported or changed. Switch it off with ``WIDEP_CPU_EP_PLUGIN=0`` or by leaving
``widep_cpu_ep`` out of ``VLLM_PLUGINS`` (vLLM's own filter).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import inspect
import logging
import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

ENV_SWITCH = "WIDEP_CPU_EP_PLUGIN"
PLUGIN_NAME = "widep_cpu_ep"
COMM_MODULE = "vllm.distributed.device_communicators.cpu_communicator"
NIXL_MODULES = ("nixl_cu12._api", "nixl_cu13._api", "nixl._api")
NIXL_DELAY_ENV = "WIDEP_NIXL_PROGRESS_DELAY_US"
EXPERTS_MODULE = "vllm.model_executor.layers.fused_moe.experts.cpu_moe"
CONFIG_MODULE = "vllm.config.vllm"
RUNNER_MODULE = "vllm.v1.worker.cpu_model_runner"

# under vLLM's logger namespace so that vLLM's handler prints it
log = logging.getLogger("vllm.plugins.widep_cpu_ep")

_registered = False
_done: dict[str, str] = {}
"""What the plugin did in this process, per gap: 'filled' or 'left alone' (read by tests and the log)."""


def switched_off(environ: dict[str, str] | os._Environ[str] | None = None) -> bool:
    """True when ``WIDEP_CPU_EP_PLUGIN`` is 0/false/no/off."""
    env = os.environ if environ is None else environ
    return env.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off")


def register() -> None:
    """The entry point vLLM calls (possibly several times per process; only the first acts)."""
    global _registered
    if _registered:
        return
    _registered = True
    if switched_off():
        log.info(
            "widep CPU EP plugin: switched off (%s=%s)",
            ENV_SWITCH,
            os.environ.get(ENV_SWITCH),
        )
        return
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return  # GPU and other platforms: nothing is imported or changed
    # The communicator module is cheap to import; the experts module pulls in the MoE kernels (seconds), so it is
    # patched when vLLM itself imports it (in the process that runs the model), never imported here.
    _patch_comm(importlib.import_module(COMM_MODULE))
    _when_imported(EXPERTS_MODULE, _patch_experts)
    _when_imported(CONFIG_MODULE, _patch_aux_config)
    _when_imported(RUNNER_MODULE, _patch_runner)
    for name in NIXL_MODULES:  # whichever NIXL build vLLM's nixl_utils imports (never imported here)
        _when_imported(name, _patch_nixl)


# --------------------------------------------------------------------------- collectives


def _collective_missing(cls: type, name: str) -> bool:
    """Whether ``cls.name`` is still the base class's ``NotImplementedError`` stub (called on a bare instance)."""
    import torch

    bare = object.__new__(cls)
    try:
        getattr(cls, name)(bare, torch.zeros(2, 1), 0, [1, 1])
    except NotImplementedError:
        return True
    except (
        AttributeError,
        TypeError,
        ValueError,
        RuntimeError,
    ):  # an implementation that needs a real group
        return False
    return False


def _sizes_of(n_local: int, sizes: list[int] | None, world: int, rank: int) -> list[int]:
    if sizes is None:
        return [n_local] * world
    if len(sizes) != world:
        raise ValueError(f"sizes has {len(sizes)} entries for a group of {world}")
    if sizes[rank] != n_local:
        raise ValueError(f"rank {rank} holds {n_local} rows but sizes says {sizes[rank]}")
    return list(sizes)


def gatherv(tensor: Any, sizes: list[int] | None, group: Any) -> Any:
    """Concatenate every rank's rows (dim 0) in rank order; ranks may hold different row counts (``sizes``)."""
    import torch
    import torch.distributed as dist

    world, rank = dist.get_world_size(group), dist.get_rank(group)
    n = _sizes_of(tensor.shape[0], sizes, world, rank)
    width = max(n)
    rows = tensor.contiguous()
    if rows.shape[0] != width:
        rows = torch.cat([rows, rows.new_zeros((width - rows.shape[0], *rows.shape[1:]))])
    out = rows.new_empty((world * width, *rows.shape[1:]))
    dist.all_gather_into_tensor(out, rows, group=group)
    if all(s == width for s in n):
        return out
    return torch.cat([out[i * width : i * width + s] for i, s in enumerate(n)])


def scatterv(tensor: Any, sizes: list[int] | None, group: Any) -> Any:
    """Sum ``tensor`` over the group and return this rank's rows: rank i gets rows sum(sizes[:i]) .. + sizes[i]."""
    import torch.distributed as dist

    world, rank = dist.get_world_size(group), dist.get_rank(group)
    total = tensor.shape[0]
    if sizes is None:
        if total % world:
            raise ValueError(f"{total} rows do not split evenly over {world} ranks and no sizes were given")
        sizes = [total // world] * world
    if len(sizes) != world or sum(sizes) != total:
        raise ValueError(f"sizes {sizes} do not split {total} rows over {world} ranks")
    width = max(sizes)
    x = tensor.contiguous()
    if any(s != width for s in sizes):
        padded = x.new_zeros((world * width, *x.shape[1:]))
        start = 0
        for i, s in enumerate(sizes):
            padded[i * width : i * width + s] = x[start : start + s]
            start += s
        x = padded
    out = x.new_empty((width, *x.shape[1:]))
    dist.reduce_scatter_tensor(out, x, group=group)
    return out[: sizes[rank]] if sizes[rank] != width else out


def _all_gatherv(self: Any, input_: Any, dim: int = 0, sizes: list[int] | None = None) -> Any:
    if dim != 0:
        raise NotImplementedError("only dim 0 all_gatherv is supported (as in vLLM's CUDA communicator)")
    if isinstance(input_, (list, tuple)):
        return [gatherv(t, sizes, self.cpu_group) for t in input_]
    return gatherv(input_, sizes, self.cpu_group)


def _reduce_scatterv(self: Any, input_: Any, dim: int = -1, sizes: list[int] | None = None) -> Any:
    if dim < 0:
        dim += input_.dim()
    x = input_.movedim(dim, 0)
    return scatterv(x, sizes, self.cpu_group).movedim(0, dim).contiguous()


def _patch_comm(mod: ModuleType) -> None:
    cls = mod.CpuCommunicator
    fills = {"all_gatherv": _all_gatherv, "reduce_scatterv": _reduce_scatterv}
    missing = [name for name in fills if _collective_missing(cls, name)]
    for name in missing:
        setattr(cls, name, fills[name])
    left = [n for n in fills if n not in missing]
    if missing:
        _done["collectives"] = "filled"
        log.info(
            "widep CPU EP plugin: filled CpuCommunicator.%s (uneven sizes over the gloo CPU group)",
            "/".join(missing),
        )
    if left:
        _done.setdefault("collectives", "left alone")
        log.info(
            "widep CPU EP plugin: this vLLM already implements CpuCommunicator.%s; left alone",
            "/".join(left),
        )


# --------------------------------------------------------------------------- experts


def localize(topk_ids: Any, topk_weights: Any, expert_map: Any) -> tuple[Any, Any, Any]:
    """Global expert ids -> this rank's weight slots; weight 0 (slot 0) for experts another rank holds.

    Returns ``(local_ids, weights, remote)`` with ``remote`` a bool mask of the non-local (token, k) entries.
    """
    import torch

    local = expert_map[topk_ids.long()]
    remote = local < 0
    ids = torch.where(remote, torch.zeros_like(local), local).to(topk_ids.dtype)
    return ids, topk_weights.masked_fill(remote, 0), remote


def _wrap_apply(original: Callable[..., None]) -> Callable[..., None]:
    sig = inspect.signature(original)

    def apply(*args: Any, **kwargs: Any) -> None:
        call = sig.bind(*args, **kwargs)
        a = call.arguments
        if a.get("expert_map") is None:
            return original(*call.args, **call.kwargs)
        a["topk_ids"], a["topk_weights"], remote = localize(a["topk_ids"], a["topk_weights"], a["expert_map"])
        original(*call.args, **call.kwargs)
        if a.get("apply_router_weight_on_input"):  # top-1, weight already on the input: the kernel skips weights
            a["output"].masked_fill_(remote.any(dim=1, keepdim=True), 0)
        return None

    apply.widep_original = original  # the unpatched method, for tests and to never wrap twice
    apply.__doc__ = "CPUUnquantizedExperts.apply honouring expert_map (widep CPU EP plugin)."
    return apply


def expert_map_ignored(cls: type) -> bool:
    """Run ``cls.apply`` on two experts, one local (slot 0); route one token to the remote one; non-zero = ignored."""
    import torch
    from vllm._custom_ops import cpu_prepack_moe_weight
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.config import FUSED_MOE_UNQUANTIZED_CONFIG

    experts = object.__new__(cls)
    experts.quant_config = FUSED_MOE_UNQUANTIZED_CONFIG
    experts._use_zentorch = False
    experts.isa = "vec"
    n, k = 32, 32
    gen = torch.Generator().manual_seed(0)
    f32 = torch.float32  # explicit: vLLM loads models under another default dtype (bfloat16)
    w13 = cpu_prepack_moe_weight(torch.rand(2, 2 * n, k, generator=gen, dtype=f32) + 0.5, "vec")
    w2 = cpu_prepack_moe_weight(torch.rand(2, k, n, generator=gen, dtype=f32) + 0.5, "vec")
    x = torch.rand(1, k, generator=gen, dtype=f32) + 0.5
    out = torch.zeros(1, k, dtype=f32)
    cls.apply(
        experts,
        out,
        x,
        w13,
        w2,
        torch.ones(1, 1, dtype=f32),
        torch.zeros(1, 1, dtype=torch.int32),
        MoEActivation.SILU,
        2,
        torch.tensor([-1, 0], dtype=torch.int32),
        None,
        None,
        torch.empty(0, dtype=f32),
        torch.empty(0, dtype=f32),
        None,
        False,
    )
    return bool(out.abs().sum() > 0)


def _patch_experts(mod: ModuleType) -> None:
    cls = mod.CPUUnquantizedExperts
    if hasattr(cls.apply, "widep_original"):
        return
    try:
        ignored = expert_map_ignored(cls)
    except (
        ImportError,
        AttributeError,
        TypeError,
        ValueError,
        RuntimeError,
    ) as err:  # the probe no longer fits
        _done["experts"] = "left alone"
        log.warning(
            "widep CPU EP plugin: could not check CPUUnquantizedExperts.apply against expert_map (%s: %s); left alone",
            type(err).__name__,
            err,
        )
        return
    if not ignored:
        _done["experts"] = "left alone"
        log.info("widep CPU EP plugin: this vLLM's CPUUnquantizedExperts.apply already honours expert_map; left alone")
        return
    cls.apply = _wrap_apply(cls.apply)
    _done["experts"] = "filled"
    log.info("widep CPU EP plugin: CPUUnquantizedExperts.apply now maps global expert ids through expert_map")


# --------------------------------------------------------------------------- NIXL progress thread


def nixl_delay_us(environ: dict[str, str] | os._Environ[str] | None = None) -> int:
    """The progress-thread delay to give NIXL agents, from ``WIDEP_NIXL_PROGRESS_DELAY_US`` (default 100)."""
    env = os.environ if environ is None else environ
    raw = env.get(NIXL_DELAY_ENV, "100").strip()
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        log.warning("widep CPU EP plugin: %s=%r is not a whole number of microseconds; using 100", NIXL_DELAY_ENV, raw)
        return 100
    return value


class _DelayedAgents:
    """Stands in for a NIXL ``_api`` module's ``nixlBind``: agents whose config still has a progress-thread delay of
    0 (the Python API's hard-coded value) get ``delay_us``; everything else is the binding's own."""

    def __init__(self, bind: ModuleType, delay_us: int) -> None:
        self._bind, self._delay_us = bind, delay_us

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bind, name)

    def nixlAgent(self, name: str, config: Any) -> Any:  # the binding's name
        if getattr(config, "useProgThread", False) and getattr(config, "pthrDelay", None) == 0:
            config.pthrDelay = self._delay_us
        return self._bind.nixlAgent(name, config)


def _patch_nixl(mod: ModuleType) -> None:
    bind = getattr(mod, "nixlBind", None)
    delay = nixl_delay_us()
    if bind is None or isinstance(bind, _DelayedAgents) or not hasattr(bind, "nixlAgent"):
        return
    if delay == 0:
        _done["nixl_progress_delay"] = "left alone"
        log.info("widep CPU EP plugin: NIXL progress thread left busy-polling (%s=0)", NIXL_DELAY_ENV)
        return
    mod.nixlBind = _DelayedAgents(bind, delay)  # type: ignore[attr-defined]
    _done["nixl_progress_delay"] = "filled"
    log.info("widep CPU EP plugin: NIXL agents of %s poll their progress thread every %d us", mod.__name__, delay)


# --------------------------------------------------------------------------- routed-expert return


def _aux_probe(use_v2: bool) -> Any:
    """The least of a VllmConfig that ``_verify_aux_output_compatibility`` reads: routed-expert return on, a
    generate MoE model, prefix caching, no PP/CP/speculation/KV transfer, the given model runner."""
    from types import SimpleNamespace as NS

    return NS(
        aux_output_config=NS(enabled=True),
        use_v2_model_runner=use_v2,
        model_config=NS(runner_type="generate", is_moe=True),
        cache_config=NS(enable_prefix_caching=True),
        speculative_config=None,
        parallel_config=NS(
            pipeline_parallel_size=1,
            decode_context_parallel_size=1,
            prefill_context_parallel_size=1,
        ),
        kv_transfer_config=None,
    )


def aux_output_refused(check: Callable[[Any], None]) -> bool:
    """Whether vLLM's check refuses routed-expert return on this platform's (V1) model runner."""
    try:
        check(_aux_probe(use_v2=False))
    except ValueError:
        return True
    return False


class _AsOutOfTree:
    """Within the block, ``current_platform.is_out_of_tree()`` answers True (an instance attribute over the
    method, removed after)."""

    def __enter__(self) -> None:
        from vllm.platforms import current_platform

        self.platform = current_platform
        current_platform.is_out_of_tree = lambda: True  # type: ignore[method-assign]

    def __exit__(self, *exc: object) -> None:
        del self.platform.is_out_of_tree


def _patch_aux_config(mod: ModuleType) -> None:
    cls = mod.VllmConfig
    original = cls._verify_aux_output_compatibility
    if hasattr(original, "widep_original"):
        return
    try:
        refused = aux_output_refused(original)
    except (AttributeError, TypeError) as err:  # the check reads more than the probe has: leave it to vLLM
        _done["routed_experts_config"] = "left alone"
        log.warning(
            "widep CPU EP plugin: could not probe vLLM's AuxOutput check (%s: %s); left alone", type(err).__name__, err
        )
        return
    if not refused:
        _done["routed_experts_config"] = "left alone"
        return

    def verify(self: Any) -> None:
        if not self.aux_output_config.enabled or self.use_v2_model_runner:
            return original(self)
        with _AsOutOfTree():  # the CPU runner brings its own AuxOutput wiring (below); the other checks still run
            return original(self)

    verify.widep_original = original  # type: ignore[attr-defined]
    verify.__doc__ = "vLLM's AuxOutput check, with the CPU model runner's routed-expert return (widep plugin)."
    cls._verify_aux_output_compatibility = verify
    _done["routed_experts_config"] = "filled"


def runner_lacks_aux_output(cls: type) -> bool:
    """Whether the CPU model runner never hands AuxOutput metadata to a worker connector (vLLM 0.32: only model
    runner V2 does)."""
    for name in ("execute_model", "sample_tokens", "initialize_kv_cache"):
        for klass in cls.__mro__:
            fn = klass.__dict__.get(name)
            if fn is None:
                continue
            try:
                if "aux_output_connector" in inspect.getsource(fn):
                    return False
            except (OSError, TypeError):
                return False
    return True


class StepBatch:
    """What ``AuxOutputWorkerConnector.prepare_output`` reads of model runner V2's input batch, from one V1 step:
    the requests in batch order (their tokens lie contiguous in that order in the forward), where each one's rows
    start (``query_start_loc_np``) and how many of its tokens were computed before the step."""

    def __init__(self, req_ids: list[str], scheduler_output: Any) -> None:
        import numpy as np

        starts = {r.req_id: r.num_computed_tokens for r in scheduler_output.scheduled_new_reqs}
        cached = scheduler_output.scheduled_cached_reqs
        starts.update(zip(cached.req_ids, cached.num_computed_tokens, strict=True))
        scheduled = scheduler_output.num_scheduled_tokens
        self.req_ids = [r for r in req_ids if r in scheduled]
        if len(self.req_ids) != len(scheduled):
            raise RuntimeError(
                f"routed-expert return: {len(scheduled)} scheduled requests but {len(self.req_ids)} in the batch"
            )
        counts = np.array([scheduled[r] for r in self.req_ids], dtype=np.int64)
        self.query_start_loc_np = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.num_computed_tokens_np = np.array([starts[r] for r in self.req_ids], dtype=np.int64)


def attach_aux_output(pending: Any, output: Any) -> None:
    """Copy one step's routed experts to the host and hand them to the scheduler in ``output`` (what model runner
    V2's ``AsyncOutput`` does): per request the tokens it sampled (0 for a prompt chunk), none rejected."""
    import numpy as np

    index = getattr(output, "req_id_to_index", None) or {}
    sampled_ids = getattr(output, "sampled_token_ids", None) or []
    sampled = np.array(
        [len(sampled_ids[index[r]]) if r in index and index[r] < len(sampled_ids) else 0 for r in pending.request_ids],
        dtype=np.int64,
    )
    pending.enqueue_cpu_copy(num_sampled=sampled, num_rejected=np.zeros_like(sampled))
    result = pending.process_output()
    if output is not None and hasattr(output, "aux_output_connector_output"):
        output.aux_output_connector_output = result


def _patch_runner(mod: ModuleType) -> None:
    cls = mod.CPUModelRunner
    if hasattr(cls.execute_model, "widep_original"):
        return
    if not runner_lacks_aux_output(cls):
        _done["routed_experts_runner"] = "left alone"
        log.info("widep CPU EP plugin: this vLLM's CPU model runner already returns routed experts; left alone")
        return
    init_kv, execute, sample = cls.initialize_kv_cache, cls.execute_model, cls.sample_tokens
    init_sig = inspect.signature(init_kv)

    def initialize_kv_cache(self: Any, *args: Any, **kwargs: Any) -> None:
        init_kv(self, *args, **kwargs)
        call = init_sig.bind(self, *args, **kwargs)
        call.apply_defaults()
        old = getattr(self, "widep_aux", None)
        self.widep_aux, self.widep_aux_pending = None, None
        if old is not None:
            old.close()
        if not self.vllm_config.aux_output_config.enabled or call.arguments.get("is_profiling"):
            return
        if self.vllm_config.speculative_config is not None:
            raise ValueError(
                "widep CPU EP plugin: routed-expert return on the CPU model runner does not cover speculative "
                "decoding (its rejected tokens); drop --speculative-config or --enable-return-routed-experts."
            )
        from vllm.distributed.aux_output_connector.worker import get_aux_output_connector

        self.widep_aux = get_aux_output_connector(self.model, self.vllm_config, call.arguments["kv_cache_config"])
        log.info("widep CPU EP plugin: routed-expert return on the CPU model runner (vLLM's AuxOutput connector)")

    def execute_model(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        aux = getattr(self, "widep_aux", None)
        if aux is None:
            return execute(self, scheduler_output, *args, **kwargs)
        aux.begin_step(scheduler_output.aux_output_connector_metadata)  # before the forward, as model runner V2
        out = execute(self, scheduler_output, *args, **kwargs)
        if scheduler_output.total_num_scheduled_tokens:
            pending = aux.prepare_output(StepBatch(list(self.input_batch.req_ids), scheduler_output))
            if out is None:
                self.widep_aux_pending = pending  # sample_tokens follows
            else:
                attach_aux_output(pending, out)
        return out

    def sample_tokens(self: Any, *args: Any, **kwargs: Any) -> Any:
        pending, self.widep_aux_pending = getattr(self, "widep_aux_pending", None), None
        try:
            out = sample(self, *args, **kwargs)
        except BaseException:
            if pending is not None:  # release the step so that the connector's in-order queue stays consistent
                attach_aux_output(pending, None)
            raise
        if pending is not None:
            attach_aux_output(pending, out)
        return out

    for fn, orig in ((initialize_kv_cache, init_kv), (execute_model, execute), (sample_tokens, sample)):
        fn.widep_original = orig  # type: ignore[attr-defined]
        fn.__doc__ = f"CPUModelRunner.{orig.__name__} with vLLM's AuxOutput connector (widep CPU EP plugin)."
    cls.initialize_kv_cache, cls.execute_model, cls.sample_tokens = initialize_kv_cache, execute_model, sample_tokens
    _done["routed_experts_runner"] = "filled"
    log.info("widep CPU EP plugin: CPUModelRunner gains vLLM's AuxOutput connector (routed-expert return)")


# --------------------------------------------------------------------------- import hook


class _AfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Runs ``then(module)`` right after ``name`` is first imported (by whoever imports it)."""

    def __init__(self, name: str, then: Callable[[ModuleType], None]) -> None:
        self.name, self.then, self.loader = name, then, None

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        self.loader, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        self.then(module)


def _when_imported(name: str, then: Callable[[ModuleType], None]) -> None:
    if name in sys.modules:
        then(sys.modules[name])
    else:
        sys.meta_path.insert(0, _AfterImport(name, then))
