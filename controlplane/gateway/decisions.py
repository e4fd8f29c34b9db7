"""The gateway's memory of recent routing decisions, for ``switchboard explain request ID``.

``DecisionLog`` is a bounded ring keyed by request id (the ``X-Request-Id`` the client sent,
else the one the gateway made; the response's ``id`` is it with a ``cmpl-`` / ``chatcmpl-``
prefix, which ``get`` strips). The pipeline records every routing decision of a request (the
first route, then each retry or migration) with its ``Trace``; the oldest request is dropped
past ``capacity``. Recording is a dict insert of objects the router built anyway; the
explanation text is formatted only when someone asks (``GET /debug/requests/{id}``).

Who may read it: the tenant that sent the request (its API key; any other key gets the same
404 as an unknown id, so ids do not leak between tenants). With ``--auth none`` (development)
every caller sees every request. Each replica keeps its own ring: ask the replica that served
the request (the ``X-Switchboard-Gateway`` header names it when the operator sets one; else try
each).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

from controlplane.core.routing import Trace

RESPONSE_ID_PREFIXES = ("chatcmpl-", "cmpl-")


@dataclass(frozen=True, slots=True)
class RouteRecord:
    """One routing decision of a request (its first route, a retry or a migration)."""

    at: float
    """Wall-clock seconds."""
    policy: str
    """sla | least_loaded | least_loaded_fallback."""
    decode: str
    prefill: str
    """"" = prefilled on the decode worker."""
    trace: Trace | None = None
    """The SLA router's trace (None for a least-loaded model)."""
    fallback: str = ""


@dataclass(slots=True)
class RequestDecisions:
    request_id: str
    tenant: str
    model: str
    sla_class: str
    routes: list[RouteRecord] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The ``GET /debug/requests/{id}`` body."""
        return {
            "request_id": self.request_id,
            "tenant": self.tenant,
            "model": self.model,
            "sla_class": self.sla_class,
            "routes": [_route_json(i, r) for i, r in enumerate(self.routes)],
            "explanation": self.explain(),
        }

    def explain(self) -> str:
        """Lines for an SRE: every decision, with its per-plugin scores and reasons."""
        out = [
            f"request {self.request_id}: model {self.model}, tenant {self.tenant or '-'}, "
            f"class {self.sla_class or '-'}"
        ]
        for i, r in enumerate(self.routes):
            what = "route" if i == 0 else f"re-route {i}"
            out.append(
                f"{what}: policy {r.policy}, decode {r.decode}, prefill {r.prefill or 'local'}"
                + (f" (SLA router found no worker: {r.fallback})" if r.fallback else "")
            )
            if r.trace is not None:
                plugins = ", ".join(r.trace.plugins()) or "-"
                out.append(f"  plugins that decided: {plugins}")
                out += ["  " + line for line in r.trace.explain().splitlines()]
            else:
                out.append("  least loaded: running + waiting + in flight from this gateway")
        return "\n".join(out)


def _route_json(i: int, r: RouteRecord) -> dict[str, Any]:
    body: dict[str, Any] = {
        "attempt": i,
        "at": r.at,
        "policy": r.policy,
        "decode": r.decode,
        "prefill": r.prefill or None,
        "fallback": r.fallback or None,
    }
    t = r.trace
    if t is not None:
        body["plugins"] = list(t.plugins())
        body["deciders"] = {
            "decode": list(t.decode.deciders()),
            "prefill": list(t.prefill.deciders()) if t.prefill is not None else [],
        }
        if t.disaggregation is not None:
            body["prefill_verdict"] = {
                "remote": t.disaggregation.remote,
                "reason": t.disaggregation.reason,
            }
        body["stages"] = [
            {
                "stage": st.stage.value,
                "profile": st.profile,
                "chosen": st.chosen,
                "weights": dict(st.weights),
                "rejections": [
                    {"worker": x.worker_id, "plugin": x.plugin, "reason": x.reason}
                    for x in st.rejections
                ],
                "candidates": [
                    {
                        "worker": c.worker_id,
                        "total": round(c.total, 4),
                        "scores": {k: round(v, 4) for k, v in c.scores.items()},
                        "ttft_ms": round(c.ttft_ms, 3),
                        "itl_ms": round(c.itl_ms, 3),
                        "cached_blocks": c.cached_blocks,
                    }
                    for c in st.candidates
                ],
            }
            for st in (t.decode, t.prefill)
            if st is not None
        ]
    return body


def normalize_request_id(value: str) -> str:
    """A response id (``cmpl-<id>``, ``chatcmpl-<id>``) or a request id -> the request id."""
    for prefix in RESPONSE_ID_PREFIXES:
        if value.startswith(prefix):
            return value[len(prefix) :]
    return value


class DecisionLog:
    """See the module docstring. Touched only on the event loop's thread."""

    def __init__(self, capacity: int = 4096, *, max_routes_per_request: int = 8) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self.max_routes_per_request = max_routes_per_request
        self._requests: collections.OrderedDict[str, RequestDecisions] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._requests)

    def record(
        self,
        request_id: str,
        *,
        tenant: str,
        model: str,
        sla_class: str,
        policy: str,
        decode: str,
        prefill: str,
        trace: Trace | None,
        at: float,
        fallback: str = "",
    ) -> None:
        if not request_id:
            return
        entry = self._requests.get(request_id)
        if entry is None:
            entry = RequestDecisions(request_id, tenant, model, sla_class)
            self._requests[request_id] = entry
            while len(self._requests) > self.capacity:
                self._requests.popitem(last=False)
        if len(entry.routes) >= self.max_routes_per_request:
            return
        entry.routes.append(RouteRecord(at, policy, decode, prefill, trace, fallback))

    def get(self, request_id: str) -> RequestDecisions | None:
        """The decisions of a recent request (by request id or response id)."""
        return self._requests.get(request_id) or self._requests.get(
            normalize_request_id(request_id)
        )
