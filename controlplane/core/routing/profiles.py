"""Routing profiles per deployment and SLA class: which scorers, with what weights, and which
picker, for each stage. Pure; the YAML file (``controlplane/gateway/routing_profiles.py``)
is parsed into these frozen dataclasses at the edge.

* ``StageSpec``: a stage's scorers (registry name -> weight) and picker name;
* ``ProfileSpec``: the decode and the prefill stage;
* ``DeploymentProfiles``: a deployment's own default and per-class overrides;
* ``ProfileTable``: the file: the default, the MoE default (expert-parallel / DP-attention
  deployments) and per-deployment entries. ``resolve(facts, sla_class)`` picks, most specific
  first: the deployment's class entry, its default, the (MoE) default's class entry, the (MoE)
  default. Each resolution is built into ``RoutingProfile`` s once and cached.

Filters are not configurable: they are what makes a route valid (role, model, serving,
context, long-context pool, KV room), the same for every profile.

The built-in table (``DEFAULT_TABLE``) is the documented default (``docs/routing-profiles.yaml``
holds the same, checked by a test).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from controlplane.core.routing.framework import (
    DeploymentFacts,
    Picker,
    RoutingProfile,
    Scorer,
    Stage,
    WeightedScorer,
)
from controlplane.core.routing.plugins import (
    BatchPackingScorer,
    DpRankBalanceScorer,
    ItlScorer,
    KvHeadroomScorer,
    LoadBalanceScorer,
    MaxScorePicker,
    PrefixOverlapScorer,
    TenantFairShareScorer,
    TtftScorer,
    default_filters,
)
from controlplane.errors import InvalidArgument

SCORERS: Mapping[str, Callable[[], Scorer]] = MappingProxyType(
    {
        "TtftHeadroom": TtftScorer,
        "ItlHeadroom": ItlScorer,
        "PrefixOverlap": PrefixOverlapScorer,
        "KvHeadroom": KvHeadroomScorer,
        "LoadBalance": LoadBalanceScorer,
        "TenantFairShare": TenantFairShareScorer,
        "DpRankBalance": DpRankBalanceScorer,
        "BatchPacking": BatchPackingScorer,
    }
)
"""Every scorer a profile may name."""
PICKERS: Mapping[str, Callable[[], Picker]] = MappingProxyType({"MaxScore": MaxScorePicker})
"""Every picker a profile may name."""


@dataclass(frozen=True, slots=True)
class StageSpec:
    """One stage's scorers (name, weight), in order, and its picker."""

    scorers: tuple[tuple[str, float], ...]
    picker: str = "MaxScore"

    def __post_init__(self) -> None:
        object.__setattr__(self, "scorers", tuple(self.scorers))
        names = [n for n, _ in self.scorers]
        for name, weight in self.scorers:
            if name not in SCORERS:
                raise InvalidArgument(
                    f"unknown scorer {name!r} (known: {', '.join(sorted(SCORERS))})"
                )
            if weight < 0:
                raise InvalidArgument(f"scorer {name}: weight {weight} < 0")
        if len(set(names)) != len(names):
            raise InvalidArgument(f"a scorer is named twice: {names}")
        if not self.scorers or not any(w > 0 for _, w in self.scorers):
            raise InvalidArgument("a stage needs at least one scorer with a weight > 0")
        if self.picker not in PICKERS:
            raise InvalidArgument(
                f"unknown picker {self.picker!r} (known: {', '.join(sorted(PICKERS))})"
            )

    def build(self, name: str) -> RoutingProfile:
        return RoutingProfile(
            name=name,
            filters=default_filters(),
            scorers=tuple(WeightedScorer(SCORERS[n](), w) for n, w in self.scorers),
            picker=PICKERS[self.picker](),
        )


@dataclass(frozen=True, slots=True)
class ProfileSpec:
    decode: StageSpec
    prefill: StageSpec


@dataclass(frozen=True, slots=True)
class DeploymentProfiles:
    """A deployment's (or the defaults') profile, and per-SLA-class overrides."""

    default: ProfileSpec | None = None
    classes: Mapping[str, ProfileSpec] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", MappingProxyType(dict(self.classes)))


@dataclass(frozen=True, slots=True)
class ProfileTable:
    default: DeploymentProfiles
    """Every deployment without an entry of its own (must have a ``default``)."""
    moe: DeploymentProfiles
    """Expert-parallel / DP-attention deployments without an entry of their own."""
    deployments: Mapping[str, DeploymentProfiles] = field(default_factory=dict)
    """By deployment name (or, for workers started by hand, model name)."""
    _built: dict[tuple[str, str, bool], tuple[RoutingProfile, RoutingProfile]] = field(
        default_factory=dict, compare=False, repr=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "deployments", MappingProxyType(dict(self.deployments)))
        if self.default.default is None or self.moe.default is None:
            raise InvalidArgument("the default and moe entries need a default profile")

    def spec(self, facts: DeploymentFacts, model: str, sla_class: str) -> tuple[str, ProfileSpec]:
        """(where it came from, the profile) for a request; see the module docstring."""
        for key in dict.fromkeys(k for k in (facts.name, model) if k):
            own = self.deployments.get(key)
            if own is None:
                continue
            if sla_class in own.classes:
                return f"{key}/{sla_class}", own.classes[sla_class]
            if own.default is not None:
                return key, own.default
        base, label = (self.moe, "moe") if facts.moe else (self.default, "default")
        if sla_class in base.classes:
            return f"{label}/{sla_class}", base.classes[sla_class]
        assert base.default is not None
        return label, base.default

    def resolve(
        self, facts: DeploymentFacts, model: str, sla_class: str
    ) -> tuple[RoutingProfile, RoutingProfile]:
        """(decode profile, prefill profile) for a request, built once per key."""
        key = (facts.name or model, sla_class, facts.moe)
        built = self._built.get(key)
        if built is None:
            label, spec = self.spec(facts, model, sla_class)
            built = (
                spec.decode.build(f"{label}:{Stage.DECODE.value}"),
                spec.prefill.build(f"{label}:{Stage.PREFILL.value}"),
            )
            if len(self._built) > 4096:
                self._built.clear()
            self._built[key] = built
        return built


DEFAULT_PROFILE = ProfileSpec(
    decode=StageSpec(
        (
            ("ItlHeadroom", 3.0),
            ("TtftHeadroom", 2.0),
            ("PrefixOverlap", 2.0),
            ("KvHeadroom", 1.0),
            ("LoadBalance", 1.0),
            ("TenantFairShare", 1.0),
        )
    ),
    prefill=StageSpec((("TtftHeadroom", 4.0), ("PrefixOverlap", 1.0), ("LoadBalance", 1.0))),
)
"""Decode: ITL weighs most (the decode worker sets every token's latency); TTFT and prefix pull
a request to a worker that can prefill it cheaply; KV headroom, load and tenant fair share
spread the rest. Prefill: predicted TTFT (it already counts the prefix hit), prefix, load."""

MOE_PROFILE = ProfileSpec(
    decode=StageSpec(
        (
            ("ItlHeadroom", 1.0),
            ("TtftHeadroom", 2.0),
            ("PrefixOverlap", 2.0),
            ("KvHeadroom", 1.0),
            ("BatchPacking", 2.0),
            ("DpRankBalance", 2.0),
            ("TenantFairShare", 1.0),
        )
    ),
    prefill=StageSpec((("TtftHeadroom", 4.0), ("PrefixOverlap", 1.0), ("DpRankBalance", 1.0))),
)
"""MoE: pack decode batches toward the efficient size (BatchPacking scores 0 past the ITL
target) onto the emptiest DP rank; ITL headroom weighs less, since it pulls the other way."""

DEFAULT_TABLE = ProfileTable(
    default=DeploymentProfiles(DEFAULT_PROFILE),
    moe=DeploymentProfiles(MOE_PROFILE),
)
