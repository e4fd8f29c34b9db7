"""The SLA-aware request router's pure core: contracts and traces (``framework``), timing
predictions (``predict``), the prefix index (``index``), the stock plugins and profiles
(``plugins``) and the pipeline (``router``: decode worker first, then local or remote
prefill). No I/O, clock or global random; the gateway adapts its worker snapshots to
``WorkerState`` and calls ``SlaAwareRouter.route``."""

from controlplane.core.routing.framework import (
    Decision,
    RouteRequest,
    RoutingProfile,
    Stage,
    TimingModel,
    Trace,
    Unroutable,
    WorkerState,
)
from controlplane.core.routing.index import PrefixIndex
from controlplane.core.routing.router import SlaAwareRouter

__all__ = [
    "Decision",
    "PrefixIndex",
    "RouteRequest",
    "RoutingProfile",
    "SlaAwareRouter",
    "Stage",
    "TimingModel",
    "Trace",
    "Unroutable",
    "WorkerState",
]
