"""The SLA-aware request router's pure core: contracts and traces (``framework``), timing
predictions (``predict``), the prefix index (``index``), the stock plugins and profiles
(``plugins``), the profile table per deployment and SLA class (``profiles``) and the pipeline
(``router``: decode worker first, then local or remote prefill). No I/O, clock or global
random; the gateway adapts its worker snapshots to ``WorkerState`` and calls
``SlaAwareRouter.route``."""

from controlplane.core.routing.framework import (
    NO_DEPLOYMENT,
    Decision,
    DecodeProgress,
    DeploymentFacts,
    RouteRequest,
    RoutingProfile,
    ScaledTiming,
    Stage,
    TenantShares,
    TimingModel,
    Trace,
    Unroutable,
    WorkerState,
)
from controlplane.core.routing.index import PrefixIndex
from controlplane.core.routing.profiles import DEFAULT_TABLE, ProfileTable
from controlplane.core.routing.router import SlaAwareRouter

__all__ = [
    "DEFAULT_TABLE",
    "NO_DEPLOYMENT",
    "Decision",
    "DecodeProgress",
    "DeploymentFacts",
    "PrefixIndex",
    "ProfileTable",
    "RouteRequest",
    "RoutingProfile",
    "ScaledTiming",
    "SlaAwareRouter",
    "Stage",
    "TenantShares",
    "TimingModel",
    "Trace",
    "Unroutable",
    "WorkerState",
]
