"""Splitting a tenant's fleet-wide quotas between gateway replicas by demand. Pure.

Every gateway replica enforces its own part of each tenant's quotas (requests/min, tokens/min,
max concurrent; controlplane/core/admission.py), so that no replica waits on another to admit
a request. An even split (``admission.quota_share``: each limit over the replica count) is
right only when the tenant's traffic is spread evenly. It is often not: the kernel spreads
*connections* between the processes of ``gateway --processes N`` and a load balancer spreads
connections between hosts, so a tenant whose client keeps one keep-alive connection reaches
one replica and would get 1/N of its quota.

So each replica measures what its clients ask of every quota-limited tenant (``DemandMeter``:
requests and tokens per minute, admitted or not, as exponentially decayed rates; and requests in
flight or queued now) and publishes it with its lease-bound record in etcd about once a second
(controlplane/adapters/etcd/gateways.py); every replica watches the others'. Then
``demand_share`` gives each replica, per limit:

- its even share ``limit / N`` always (what it had before: a replica whose clients start
  sending is never below it);
- plus the part of the other replicas' even shares their demand leaves unused, lent to the
  replicas that ask for more than their even share, in proportion to how much more.

One replica asking for all of a tenant's quota while the others are idle gets all of it; two
asking equally get half each. A replica whose record carries no demand (one that has not
published yet) keeps its even share and lends nothing. The fleet admits at most the limit
while the published demands hold; when an idle replica's clients start sending, it may admit
its even share before the next exchange lowers the busy one's: for about one exchange
interval the fleet may admit up to the idle replicas' even shares more.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from controlplane.core.admission import QuotaLike, TenantLimits

DemandKey = tuple[str, str]
"""(model, tenant): each model's admission controller holds its own buckets per tenant."""

DEMAND_TIME_CONSTANT_S = 10.0
"""How quickly a replica's measured demand follows a change (the decay's time constant)."""


@dataclass(frozen=True, slots=True)
class TenantDemand:
    """What one replica's clients ask of one tenant's quotas: requests and tokens per minute
    (admitted or not) and requests in flight or queued now."""

    requests_per_minute: float = 0.0
    tokens_per_minute: float = 0.0
    concurrent: float = 0.0


class DemandMeter:
    """Requests and tokens asked per (model, tenant), as exponentially decayed per-minute
    rates (time constant ``tau_s``: a steady rate reads as itself after a few ``tau_s``; a
    stop decays to nothing). ``now`` comes in as an argument (any monotonic clock)."""

    def __init__(self, tau_s: float = DEMAND_TIME_CONSTANT_S) -> None:
        if tau_s <= 0:
            raise ValueError("tau_s must be > 0")
        self.tau_s = tau_s
        self._values: dict[DemandKey, list[float]] = {}
        """key -> [decayed requests, decayed tokens, as of time]"""

    def ask(self, key: DemandKey, tokens: float, now: float) -> None:
        v = self._values.get(key)
        if v is None:
            self._values[key] = [1.0, float(tokens), now]
            return
        if now > v[2]:
            decay = math.exp((v[2] - now) / self.tau_s)
            v[0] *= decay
            v[1] *= decay
            v[2] = now
        v[0] += 1.0
        v[1] += tokens

    def rate(self, key: DemandKey, now: float) -> tuple[float, float]:
        """(requests, tokens) per minute asked under ``key`` now."""
        v = self._values.get(key)
        if v is None:
            return (0.0, 0.0)
        scale = math.exp(min(0.0, v[2] - now) / self.tau_s) * 60.0 / self.tau_s
        return (v[0] * scale, v[1] * scale)

    def rates(self, now: float, *, floor_rpm: float = 0.01) -> dict[DemandKey, tuple[float, float]]:
        """key -> (requests, tokens) per minute now; keys decayed below ``floor_rpm`` are
        forgotten."""
        out: dict[DemandKey, tuple[float, float]] = {}
        per_minute = 60.0 / self.tau_s
        for key, (requests, tokens, at) in list(self._values.items()):
            decay = math.exp(min(0.0, at - now) / self.tau_s)
            rpm = requests * decay * per_minute
            if rpm < floor_rpm:
                del self._values[key]
                continue
            out[key] = (rpm, tokens * decay * per_minute)
        return out


def demand_share(
    quotas: QuotaLike,
    mine: TenantDemand,
    others: Sequence[TenantDemand],
    replicas: int,
) -> TenantLimits:
    """This replica's part of each of the tenant's limits (see the module docstring).
    ``others``: the demands the other live replicas published (zero where one published
    demands without this tenant); ``replicas``: the live replicas, this one included (those
    beyond ``1 + len(others)`` published no demand at all). Parts are rounded up; 0 stays
    unlimited."""
    n = max(1, replicas, 1 + len(others))

    def part(limit: int, own: float, theirs: list[float]) -> int:
        if limit <= 0:
            return 0
        even = limit / n
        unused = sum(max(0.0, even - d) for d in theirs)
        wanted = max(0.0, own - even)
        more = wanted + sum(max(0.0, d - even) for d in theirs)
        share = even if more <= 0.0 else even + unused * wanted / more
        return max(1, math.ceil(share - 1e-9))

    return TenantLimits(
        requests_per_minute=part(
            quotas.requests_per_minute,
            mine.requests_per_minute,
            [d.requests_per_minute for d in others],
        ),
        tokens_per_minute=part(
            quotas.tokens_per_minute, mine.tokens_per_minute, [d.tokens_per_minute for d in others]
        ),
        max_concurrent=part(quotas.max_concurrent, mine.concurrent, [d.concurrent for d in others]),
    )
