"""Per-model facts the gateway's router needs, from the model's deployment record.

* ``block_size``: tokens per KV block in the model's engines, so the gateway's chained block
  hashes of a prompt (``workers.engines.sim_core.hash_blocks``) are the ones the workers put in
  their KV events. sim: the profile's ``block_size``; cpu (and vllm / trtllm): the deployment's
  ``engine_args["block_size"]``, else 16 (``CpuEngineConfig.block_size``, vLLM's default).
* ``deployment``: the core's ``DeploymentFacts``: the deployment's name (which routing profile
  applies), its long_context pool's threshold, its MoE layout (DP ranks, expert parallel) and,
  for an MoE deployment with a timing model, the efficient decode batch to pack toward.
* ``timing``: the ``TimingModel`` the SLA-aware router predicts TTFT / ITL with. Today only a sim
  deployment has one (its profile, ``engine_args["profile"]``); a model without one is routed by
  ``LeastLoadedRouter`` (controlplane/gateway/pipeline.py).

``ModelRoutingCache`` builds these once per deployment version (the key is the deployment's
engine, model path and engine args, as the tokenizer cache's), so a request reads memory only;
the first request of a sim deployment reads its profile YAML once (as its tokenizer does). A
profile that cannot be loaded is logged and the model falls back to least loaded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

from controlplane.core.routing import NO_DEPLOYMENT, DeploymentFacts, ScaledTiming, TimingModel
from controlplane.core.routing.predict import efficient_batch_size
from controlplane.errors import FailedPrecondition, SwitchboardError
from controlplane.gateway.routing import WorkerSnapshot
from controlplane.gateway.workers_view import ModelInfo

log = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 16
"""``CpuEngineConfig.block_size``'s default (and vLLM's)."""
DEFAULT_SIM_PROFILE = "llama-3.1-8b-h100"
"""The profile a sim deployment without ``engine_args["profile"]`` runs (as the workers do)."""


@dataclass(frozen=True, slots=True)
class ModelRouting:
    block_size: int = DEFAULT_BLOCK_SIZE
    timing: TimingModel | None = None
    """None: no timing model; the gateway routes the model least loaded."""
    deployment: DeploymentFacts = NO_DEPLOYMENT
    """The deployment's name (its routing profile), long-context threshold and MoE layout."""

    @property
    def policy(self) -> str:
        return "sla" if self.timing is not None else "least_loaded"


def deployment_facts(info: ModelInfo, timing: TimingModel | None) -> DeploymentFacts:
    """What the router core knows of the deployment; an MoE one (expert parallel or DP
    attention) with a timing model gets its efficient decode batch for packing."""
    moe = info.expert_parallel or info.dp_size > 1
    return DeploymentFacts(
        name=info.deployment,
        long_context_threshold_tokens=max(0, info.long_context_threshold_tokens),
        dp_size=max(1, info.dp_size),
        expert_parallel=info.expert_parallel,
        efficient_batch_size=efficient_batch_size(timing) if moe and timing is not None else 0,
    )


def model_routing(info: ModelInfo) -> ModelRouting:
    """The routing facts of one deployment (see the module docstring)."""
    if info.engine == "sim":
        from workers.profiles import load_profile

        profile = load_profile(info.engine_args.get("profile", DEFAULT_SIM_PROFILE))
        timing: TimingModel = profile
        try:
            speedup = float(info.engine_args.get("speedup", "1") or 1)
        except ValueError:
            speedup = 1.0
        if speedup > 0 and speedup != 1.0:
            timing = ScaledTiming(profile, speedup)  # its workers run that much faster
        return ModelRouting(
            block_size=profile.block_size,
            timing=timing,
            deployment=deployment_facts(info, profile),
        )
    raw = info.engine_args.get("block_size", "")
    try:
        block_size = int(raw) if raw else DEFAULT_BLOCK_SIZE
    except ValueError:
        block_size = DEFAULT_BLOCK_SIZE
    return ModelRouting(
        block_size=block_size if block_size > 0 else DEFAULT_BLOCK_SIZE,
        deployment=deployment_facts(info, None),
    )


_Key = tuple[str, str, str, tuple[tuple[str, str], ...], tuple[str, int, int], bool]


class ModelRoutingCache:
    """``ModelRouting`` per model, built once per deployment version; ``lookup`` is the
    watch-fed ``WorkersView.model_info`` (memory only)."""

    def __init__(
        self,
        lookup: Callable[[str], ModelInfo | None],
        factory: Callable[[ModelInfo], ModelRouting] = model_routing,
        *,
        threshold_lookup: Callable[[str], int] | None = None,
    ) -> None:
        """``threshold_lookup``: the long-context threshold the model's worker records carry
        (``WorkersView.long_context_threshold_tokens``), used when its deployment has none."""
        self._lookup = lookup
        self._factory = factory
        self._threshold_lookup = threshold_lookup
        self._cache: dict[_Key, ModelRouting] = {}
        self._last: dict[str, tuple[ModelInfo, ModelRouting]] = {}
        """model -> (the ModelInfo object last seen, its facts): the request path's fast
        path (a deployment change replaces the ModelInfo object)."""

    def get(self, model: str) -> ModelRouting:
        info = self._lookup(model)
        if info is None:  # workers without a deployment record: nothing to predict with
            return ModelRouting()
        last = self._last.get(model)
        if last is not None and last[0] is info:
            return last[1]
        key = (
            info.model,
            info.engine,
            info.model_path,
            tuple(sorted(info.engine_args.items())),
            (info.deployment, info.long_context_threshold_tokens, info.dp_size),
            info.expert_parallel,
        )
        facts = self._cache.get(key)
        if facts is None:
            try:
                facts = self._factory(info)
            except SwitchboardError as e:
                log.warning("model %s: no timing model (%s); routing it least loaded", model, e)
                facts = ModelRouting()
            if len(self._cache) > 1024:  # deployments changing forever: start over
                self._cache.clear()
                self._last.clear()
            self._cache[key] = facts
        self._last[model] = (info, facts)
        return facts

    def facts_for(self, model: str) -> DeploymentFacts:
        """``SlaGatewayRouter``'s ``facts_for``: the deployment's facts, with the workers'
        long-context threshold when the deployment record gives none."""
        facts = self.get(model).deployment
        if facts.long_context_threshold_tokens or self._threshold_lookup is None:
            return facts
        threshold = self._threshold_lookup(model)
        if threshold <= 0:
            return facts
        return replace(facts, long_context_threshold_tokens=threshold)

    def timing_for(self, model: str, snapshot: WorkerSnapshot) -> TimingModel:
        """``SlaGatewayRouter``'s ``timing_for``: the model's timing (every worker of a
        deployment runs the same profile). Only called for models that have one."""
        timing = self.get(model).timing
        if timing is None:
            raise FailedPrecondition(f"model {model!r} has no timing model")
        return timing
