"""Hand-built workers and requests for the router's tests (real timing: llama-3.1-8b-h100)."""

from __future__ import annotations

from controlplane.core.routing.framework import RouteRequest, TimingModel, WorkerState
from controlplane.core.sla import DEFAULT_SLA_CLASSES, SlaClass
from workers.engines.sim_core import hash_blocks
from workers.profiles import load_profile

PROFILE = load_profile("llama-3.1-8b-h100")
TIMING: TimingModel = PROFILE  # the sim profile is a TimingModel (checked by mypy here)
BLOCK = PROFILE.block_size
MODEL = "llama"
SLA = {c.name: c for c in DEFAULT_SLA_CLASSES}
INTERACTIVE = SLA["interactive"]


def worker(worker_id: str, role: str = "decode", **kw: object) -> WorkerState:
    """A worker of ``MODEL`` with the 8B timing, 10k free KV blocks, 128k context."""
    fields: dict[str, object] = {
        "model": MODEL,
        "timing": TIMING,
        "kv_blocks_total": 10_000,
        "max_context_tokens": 131_072,
    }
    fields.update(kw)
    return WorkerState(worker_id=worker_id, role=role, **fields)  # type: ignore[arg-type]


def tokens(n: int, seed: int = 0) -> list[int]:
    """``n`` tokens; the same seed gives the same prefix."""
    return [(seed * 7919 + i * 31) % 50_000 for i in range(n)]


def request(
    prompt: int | list[int],
    *,
    max_tokens: int = 128,
    sla: SlaClass = INTERACTIVE,
    model: str = MODEL,
) -> RouteRequest:
    ids = tokens(prompt) if isinstance(prompt, int) else prompt
    return RouteRequest.for_class(
        sla,
        model=model,
        prompt_tokens=len(ids),
        max_tokens=max_tokens,
        block_size=BLOCK,
        block_hashes=hash_blocks(ids, BLOCK),
    )
