#!/usr/bin/env python
"""SLA planner on a simulated fleet: static peak-sized vs static average-sized vs the planner.

A deterministic, virtual-time discrete-event simulation (no sleeping, no wall clock): every
replica is the real simulated engine's scheduler (``workers.engines.sim_core.SimScheduler``)
with the ``llama-3.1-8b-h100`` profile, every request is placed by the real pure
``SlaAwareRouter`` (decode worker first, conditional remote prefill, prefix index), and the
planner run is the real pure ``controlplane.core.planner.plan`` fed what the shell would
measure. Same seed, same results.

Trace. Request sizes are drawn from the Azure LLM inference trace 2023, conversation service
(``../shared/traces/AzureLLMInferenceTrace_conv.csv``; prompt and output lengths of real rows,
prompts capped at 8k tokens), arrivals are Poisson with a rate shaped in ``--phase``-second
phases: base for one, a 3x step held for two, a linear ramp back down over one, base for two.
60 % of requests are ``interactive`` (TTFT 500 ms, ITL 50 ms p95), 40 % ``standard`` (2 s,
100 ms); 30 % start with one of 16 shared 512-token system prompts (prefix hits).

Fleets. *peak*: static, sized by the planner's own model for the peak rate; *average*: static,
sized for the trace's mean rate; *planner*: starts at the average fleet's size, pools within
[1, 12], ``plan`` every 10 s. A new replica serves ``--startup`` s after it is asked for (engine
start-up; it holds its GPU from the request); a removed one stops taking requests and leaves
when its last request is done (drain), so no request is ever dropped.

Reported per fleet: SLO attainment per class per 10 s bin (a request attains when its TTFT and
its time per output token, TPOT = mean inter-token gap, are within its class targets: the
per-request definition of DistServe and Dynamo; bins by arrival), overall
attainment per class, attainment over the peak, **time to recover** after the step (from the
step to the first bin from which every later peak bin has >= 90 % attainment in every class),
GPU-hours (replica-seconds on GPUs, starting and draining included), replica counts over time
and the planner's decisions. Results: ``benchmarks/results/planner.json`` and ``planner.png``.

Usage (from the repository root)::

    .venv/bin/python benchmarks/planner.py             # ~3-5 min on 2 cores
    .venv/bin/python benchmarks/planner.py --quick     # short phases, smoke run
"""

from __future__ import annotations

import argparse
import csv
import heapq
import itertools
import json
import math
import platform
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from controlplane.core.deployments import PoolRole  # noqa: E402
from controlplane.core.planner import (  # noqa: E402
    ClassObservation,
    DeploymentInput,
    LengthStats,
    LoadObservation,
    PlannerConfig,
    PlannerState,
    PoolDecision,
    PoolInput,
    plan,
    sizing_for_rate,
)
from controlplane.core.routing import (  # noqa: E402
    Decision,
    RouteRequest,
    SlaAwareRouter,
    WorkerState,
)
from controlplane.core.sla import DEFAULT_SLA_CLASSES, SlaClass  # noqa: E402
from workers.engines.sim_core import (  # noqa: E402
    SimConfig,
    SimRequest,
    SimScheduler,
    StepResult,
    hash_blocks,
)
from workers.profiles import SimProfile, load_profile  # noqa: E402

TRACE = ROOT.parent / "shared" / "traces" / "AzureLLMInferenceTrace_conv.csv"
PROFILE = "llama-3.1-8b-h100"
CLASSES: dict[str, SlaClass] = {c.name: c for c in DEFAULT_SLA_CLASSES[:2]}
CLASS_MIX = (("interactive", 0.6), ("standard", 0.4))
BIN_S = 10.0
PHASES = 6
MAX_PROMPT = 8192
SYSTEM_PROMPTS, SYSTEM_LEN, SYSTEM_SHARE = 16, 512, 0.3


# --- the trace ----------------------------------------------------------------------------------


def load_lengths(path: Path, limit: int = 20000) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    with path.open() as f:
        for row in itertools.islice(csv.DictReader(f), limit):
            isl = min(int(row["ContextTokens"]), MAX_PROMPT)
            osl = max(1, int(row["GeneratedTokens"]))
            if isl > 0:
                out.append((isl, osl))
    return out


def rate_at(t: float, base: float, phase: float) -> float:
    """base | 3x step, held two phases | linear ramp down | base for two phases."""
    if t < phase:
        return base
    if t < 3 * phase:
        return 3 * base
    if t < 4 * phase:
        return base * (3 - 2 * (t - 3 * phase) / phase)
    return base


@dataclass
class Arrival:
    t: float
    rid: str
    cls: str
    isl: int
    osl: int
    prompt: tuple[int, ...]


def make_trace(base: float, phase: float, seed: int) -> list[Arrival]:
    rng = random.Random(seed)
    lengths = load_lengths(TRACE)
    end = PHASES * phase
    peak = 3 * base
    out: list[Arrival] = []
    t, n = 0.0, 0
    while True:  # thinning of a Poisson process at the peak rate
        t += rng.expovariate(peak)
        if t >= end:
            break
        if rng.random() > rate_at(t, base, phase) / peak:
            continue
        isl, osl = lengths[rng.randrange(len(lengths))]
        cls = "interactive" if rng.random() < CLASS_MIX[0][1] else "standard"
        head: list[int] = []
        if rng.random() < SYSTEM_SHARE and isl > SYSTEM_LEN:
            s = rng.randrange(SYSTEM_PROMPTS)
            head = [1 + (s * SYSTEM_LEN + i) % 120_000 for i in range(SYSTEM_LEN)]
        start = 200_000 + n * 997
        tail = [(start + i) % 128_000 + 1 for i in range(isl - len(head))]
        out.append(Arrival(t, f"r{n}", cls, isl, osl, tuple(head + tail)))
        n += 1
    return out


# --- the fleet ----------------------------------------------------------------------------------


@dataclass
class Req:
    a: Arrival
    first_at: float | None = None
    last_at: float | None = None
    gaps: int = 0
    gap_s: float = 0.0
    done_at: float | None = None
    cached: int = 0


@dataclass
class Worker:
    wid: str
    role: str  # "prefill" | "decode"
    sched: SimScheduler
    asked_at: float
    ready_at: float
    draining: bool = False
    stopped_at: float | None = None
    stepping: bool = False
    batch: int = 0
    queued_prompt_tokens: int = 0
    pending: int = 0  # KV hand-offs on their way to this decode worker
    prompt_of: dict[str, int] = field(default_factory=dict)

    def serving(self, now: float) -> bool:
        return not self.draining and self.stopped_at is None and now >= self.ready_at

    def busy(self) -> bool:
        return self.sched.has_work() or self.pending > 0


class Sim:
    """The event loop: arrivals, engine steps, KV hand-offs, planner ticks."""

    def __init__(
        self,
        profile: SimProfile,
        prefill: int,
        decode: int,
        *,
        startup_s: float,
        use_planner: bool,
        seed: int,
        config: PlannerConfig,
    ) -> None:
        self.profile = profile
        self.startup_s = startup_s
        self.use_planner = use_planner
        self.config = config
        self.rng = random.Random(seed)
        self.router = SlaAwareRouter()
        self.events: list[tuple[float, int, str, Any]] = []
        self.seq = itertools.count()
        self.workers: dict[str, Worker] = {}
        self.reqs: dict[str, Req] = {}
        self.nid = itertools.count()
        self.state = PlannerState()
        self.desired = {"prefill": prefill, "decode": decode}
        self.decisions: list[dict[str, Any]] = []
        self.replicas: list[dict[str, Any]] = []
        # planner window
        self.win_arrivals: list[Arrival] = []
        self.win_ttft: dict[str, list[float]] = {c: [] for c in CLASSES}
        self.win_tpot: dict[str, list[float]] = {c: [] for c in CLASSES}
        self.win_prompt = 0
        self.win_cached = 0
        self.unroutable = 0
        for _ in range(prefill):
            self.start_worker("prefill", 0.0, ready=True)
        for _ in range(decode):
            self.start_worker("decode", 0.0, ready=True)

    # -- events ----------------------------------------------------------------------------------

    def push(self, t: float, kind: str, payload: Any = None) -> None:
        heapq.heappush(self.events, (t, next(self.seq), kind, payload))

    def start_worker(self, role: str, now: float, *, ready: bool = False) -> None:
        wid = f"{role}-{next(self.nid)}"
        sched = SimScheduler(self.profile, SimConfig(held_kv_ttl_s=600.0))
        ready_at = now if ready else now + self.startup_s
        self.workers[wid] = Worker(wid, role, sched, now, ready_at)

    def run(self, trace: Sequence[Arrival], end: float) -> None:
        for a in trace:
            self.push(a.t, "arrive", a)
        t = 0.0
        while t < end:
            self.push(t, "sample")
            t += BIN_S
        if self.use_planner:
            t = BIN_S
            while t < end:
                self.push(t, "plan")
                t += BIN_S
        while self.events:
            now, _, kind, payload = heapq.heappop(self.events)
            if kind == "arrive":
                self.arrive(payload, now)
            elif kind == "step":
                self.step(payload, now)
            elif kind == "kv":
                self.kv_arrived(payload, now)
            elif kind == "plan":
                self.plan(now)
            elif kind == "sample":
                self.sample(now)
        for w in self.workers.values():
            if w.stopped_at is None:
                w.stopped_at = max(end, w.asked_at)

    def kick(self, w: Worker, now: float) -> None:
        if not w.stepping:
            w.stepping = True
            self.push(now, "step", w.wid)

    # -- routing ---------------------------------------------------------------------------------

    def view(self, now: float) -> list[WorkerState]:
        out = []
        for w in self.workers.values():
            if not w.serving(now):
                continue
            s = w.sched
            used = s.kv_blocks_used
            out.append(
                WorkerState(
                    worker_id=w.wid,
                    model="m",
                    role=w.role,
                    timing=self.profile,
                    pool=w.role,
                    running=len(s._running),
                    waiting=len(s._waiting),
                    inflight_here=w.pending,
                    queued_prefill_tokens=w.queued_prompt_tokens,
                    batch_size=w.batch,
                    context_tokens=used * s.block_size,
                    kv_blocks_used=used,
                    kv_blocks_total=s.num_blocks,
                    max_context_tokens=self.profile.max_context_tokens,
                )
            )
        return out

    def arrive(self, a: Arrival, now: float) -> None:
        self.reqs[a.rid] = Req(a)
        self.win_arrivals.append(a)
        cls = CLASSES[a.cls]
        hashes = hash_blocks(a.prompt, self.profile.block_size)
        request = RouteRequest.for_class(
            cls,
            model="m",
            prompt_tokens=a.isl,
            max_tokens=a.osl,
            block_size=self.profile.block_size,
            block_hashes=hashes,
        )
        decision = self.router.route(request, self.view(now), self.rng)
        if not isinstance(decision, Decision):
            self.unroutable += 1  # counted as a miss; never happens with pools >= 1
            return
        d = self.workers[decision.decode.worker_id]
        if decision.prefill is None:
            d.sched.add_request(SimRequest(a.rid, a.prompt, a.osl), now)
            d.queued_prompt_tokens += a.isl
            d.prompt_of[a.rid] = a.isl
            self.kick(d, now)
            return
        p = self.workers[decision.prefill.worker_id]
        p.sched.add_request(SimRequest(a.rid, a.prompt, 1, hold_kv_as=f"{a.rid}|{d.wid}"), now)
        p.queued_prompt_tokens += a.isl
        p.prompt_of[a.rid] = a.isl
        d.pending += 1
        self.kick(p, now)

    def kv_arrived(self, payload: tuple[str, str, int], now: float) -> None:
        rid, dwid, first = payload
        d = self.workers[dwid]
        d.pending -= 1
        r = self.reqs[rid]
        a = r.a
        d.sched.add_request(
            SimRequest(
                rid, a.prompt, a.osl, initial_output_token_ids=(first,), kv_imported_tokens=a.isl
            ),
            now,
        )
        self.kick(d, now)

    # -- engine steps ----------------------------------------------------------------------------

    def step(self, wid: str, now: float) -> None:
        w = self.workers[wid]
        res: StepResult = w.sched.step(now)
        if res.duration_s <= 0:
            w.stepping = False
            w.batch = 0
            self.maybe_stop(w, now)
            return
        end = now + res.duration_s
        w.batch = res.decode_batch_size
        for o in res.outputs:
            r = self.reqs[o.request_id]
            if not o.new_token_ids:
                continue
            if r.first_at is None:
                # the prompt is done here (local prefill, or the prefill worker's pass)
                w.queued_prompt_tokens -= w.prompt_of.pop(o.request_id, 0)
                self.win_prompt += r.a.isl
                self.win_cached += o.num_cached_tokens
                if o.held_kv is not None:
                    w.sched.take_held(o.held_kv.kv_id, end)
                    dwid = o.held_kv.kv_id.split("|", 1)[1]
                    xfer = self.profile.kv_transfer_ms(r.a.isl * self.profile.kv_bytes_per_token)
                    arrive = end + xfer / 1e3
                    r.first_at = r.last_at = arrive
                    self.win_ttft[r.a.cls].append(arrive - r.a.t)
                    if r.a.osl <= 1:
                        self.workers[dwid].pending -= 1
                        r.done_at = arrive
                    else:
                        self.push(arrive, "kv", (r.a.rid, dwid, o.new_token_ids[0]))
                    continue
                r.first_at = r.last_at = end
                self.win_ttft[r.a.cls].append(end - r.a.t)
            else:
                assert r.last_at is not None
                gap = end - r.last_at
                r.gaps += 1
                r.gap_s += gap
                r.last_at = end
            if o.finish_reason is not None and o.held_kv is None:
                r.done_at = end
                if r.gaps:
                    self.win_tpot[r.a.cls].append(tpot(r))
        self.push(end, "step", wid)

    def maybe_stop(self, w: Worker, now: float) -> None:
        if w.draining and w.stopped_at is None and not w.busy():
            w.stopped_at = now

    # -- the planner -----------------------------------------------------------------------------

    def observation(self, now: float) -> LoadObservation:
        arr = self.win_arrivals
        rate = len(arr) / BIN_S
        isl = [a.isl for a in arr] or [1]
        osl = [a.osl for a in arr] or [1]
        classes = []
        for name in CLASSES:
            n = sum(1 for a in arr if a.cls == name)
            ttfts = self.win_ttft[name]
            tpots = self.win_tpot[name]
            classes.append(
                ClassObservation(
                    name,
                    n / BIN_S,
                    ttft_p95_ms=percentile(ttfts, 95) * 1e3 if ttfts else None,
                    itl_p95_ms=percentile(tpots, 95) * 1e3 if tpots else None,
                )
            )
        queued = sum(len(w.sched._waiting) for w in self.workers.values() if w.stopped_at is None)
        hit = self.win_cached / self.win_prompt if self.win_prompt else 0.0
        return LoadObservation(
            arrival_rps=rate,
            input_tokens=length_stats(isl),
            output_tokens=length_stats(osl),
            prefix_hit_rate=hit,
            queued_requests=queued,
            classes=tuple(classes),
            window_s=BIN_S,
        )

    def deployment(self, obs: LoadObservation | None, now: float) -> DeploymentInput:
        pools = []
        for role, prole in (("prefill", PoolRole.PREFILL), ("decode", PoolRole.DECODE)):
            ready = sum(1 for w in self.workers.values() if w.role == role and w.serving(now))
            pools.append(PoolInput(prole, self.desired[role], ready, 1, 12, True))
        return DeploymentInput(
            name="llama-8b",
            priority=0,
            gpus_per_replica=1,
            pools=tuple(pools),
            timing=self.profile,
            sla_classes=tuple(CLASSES.values()),
            observation=obs,
            kv_capacity_tokens=self.profile.kv_capacity_tokens,
        )

    def plan(self, now: float) -> None:
        obs = self.observation(now)
        result = plan([self.deployment(obs, now)], self.state, now, self.config)
        self.state = result.state
        for d in result.decisions:
            role = d.role.value
            if d.direction != "hold":
                self.decisions.append(decision_doc(d, now))
            self.resize(role, d.desired, now)
        self.reset_window()

    def resize(self, role: str, want: int, now: float) -> None:
        self.desired[role] = want
        live = [
            w
            for w in self.workers.values()
            if w.role == role and not w.draining and w.stopped_at is None
        ]
        for _ in range(want - len(live)):
            self.start_worker(role, now)
        if want < len(live):
            # drain the least loaded (not-yet-ready ones first)
            live.sort(key=lambda w: (w.serving(now), len(w.sched._running) + w.pending))
            for w in live[: len(live) - want]:
                w.draining = True
                self.maybe_stop(w, now)

    def sample(self, now: float) -> None:
        """Every bin: replica counts, and reset the planner's window."""
        counts = {"t": now}
        for role in ("prefill", "decode"):
            counts[role] = sum(
                1 for w in self.workers.values() if w.role == role and w.stopped_at is None
            )
            counts[f"{role}_serving"] = sum(
                1 for w in self.workers.values() if w.role == role and w.serving(now)
            )
        self.replicas.append(counts)

    def reset_window(self) -> None:
        self.win_arrivals = []
        self.win_ttft = {c: [] for c in CLASSES}
        self.win_tpot = {c: [] for c in CLASSES}
        self.win_prompt = self.win_cached = 0


def decision_doc(d: PoolDecision, now: float) -> dict[str, Any]:
    return {
        "t": round(now, 1),
        "pool": d.role.value,
        "from": d.current,
        "to": d.desired,
        "reason": d.reason,
    }


def percentile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    k = min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))
    return s[k]


def length_stats(xs: Sequence[int]) -> LengthStats:
    mean = sum(xs) / len(xs)
    var = sum((x - mean) ** 2 for x in xs) / len(xs)
    return LengthStats(mean, var / mean**2 if mean else 0.0, float(percentile(xs, 95)))


# --- scoring ------------------------------------------------------------------------------------


def attained(r: Req) -> bool:
    cls = CLASSES[r.a.cls]
    if r.first_at is None or r.done_at is None:
        return False
    if cls.ttft_p95_ms is not None and (r.first_at - r.a.t) * 1e3 > cls.ttft_p95_ms:
        return False
    return cls.itl_p95_ms is None or r.gaps == 0 or tpot(r) * 1e3 <= cls.itl_p95_ms


def tpot(r: Req) -> float:
    """Time per output token after the first (the request's mean inter-token latency)."""
    return r.gap_s / r.gaps if r.gaps else 0.0


def score(sim: Sim, phase: float, end: float) -> dict[str, Any]:
    nbins = int(end // BIN_S)
    per_bin = {c: [[0, 0] for _ in range(nbins)] for c in CLASSES}
    ttft: dict[str, list[float]] = {c: [] for c in CLASSES}
    for r in sim.reqs.values():
        b = min(int(r.a.t // BIN_S), nbins - 1)
        ok = attained(r)
        per_bin[r.a.cls][b][0] += ok
        per_bin[r.a.cls][b][1] += 1
        if r.first_at is not None:
            ttft[r.a.cls].append((r.first_at - r.a.t) * 1e3)
    series = {c: [round(ok / n, 4) if n else None for ok, n in bins] for c, bins in per_bin.items()}

    def attainment(lo: float, hi: float) -> dict[str, float]:
        out = {}
        for c, bins in per_bin.items():
            sel = bins[int(lo // BIN_S) : int(hi // BIN_S)]
            ok, n = sum(b[0] for b in sel), sum(b[1] for b in sel)
            out[c] = round(ok / n, 4) if n else 1.0
        return out

    # recovery: from the step (t = phase) to the first bin after which every bin until the
    # ramp-down starts has >= 90 % in every class
    step_bin, peak_end = int(phase // BIN_S), int(3 * phase // BIN_S)
    recover: float | None = None
    for b in range(step_bin, peak_end):
        if all(
            (series[c][k] is None or series[c][k] >= 0.9)  # type: ignore[operator]
            for c in CLASSES
            for k in range(b, peak_end)
        ):
            recover = (b - step_bin) * BIN_S
            break
    gpu_s = sum(
        ((w.stopped_at if w.stopped_at is not None else end) - w.asked_at)
        for w in sim.workers.values()
    )
    return {
        "attainment": attainment(0, end),
        "attainment_peak": attainment(phase, 3 * phase),
        "attainment_after_recovery": attainment(phase + (recover or 0.0), end)
        if recover is not None
        else None,
        "time_to_recover_s": recover,
        "gpu_hours": round(gpu_s / 3600, 3),
        "requests": len(sim.reqs),
        "unfinished": sum(1 for r in sim.reqs.values() if r.done_at is None),
        "unroutable": sim.unroutable,
        "ttft_p95_ms": {c: round(percentile(v, 95), 1) if v else None for c, v in ttft.items()},
        "attainment_series": series,
        "replicas_series": sim.replicas,
        "decisions": sim.decisions,
        "final_planner_desired": dict(sim.desired),
    }


# --- main ---------------------------------------------------------------------------------------


def static_size(profile: SimProfile, rate: float, trace: Sequence[Arrival]) -> dict[str, int]:
    isl = length_stats([a.isl for a in trace])
    osl = length_stats([a.osl for a in trace])
    obs = LoadObservation(
        rate,
        isl,
        osl,
        prefix_hit_rate=0.1,
        classes=tuple(ClassObservation(c, rate / 2) for c in CLASSES),
    )
    dep = DeploymentInput(
        "llama-8b",
        0,
        1,
        (
            PoolInput(PoolRole.PREFILL, 1, 1, 1, 64, True),
            PoolInput(PoolRole.DECODE, 1, 1, 1, 64, True),
        ),
        profile,
        tuple(CLASSES.values()),
        obs,
        profile.kv_capacity_tokens,
    )
    s = sizing_for_rate(dep, rate)
    return {"prefill": max(1, s[PoolRole.PREFILL]), "decode": max(1, s[PoolRole.DECODE])}


def plot(results: dict[str, Any], phase: float, base: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    end = PHASES * phase
    ts = [i * BIN_S for i in range(int(end // BIN_S))]
    axes[0].plot(ts, [rate_at(t, base, phase) for t in ts], color="black")
    axes[0].set_ylabel("offered load (req/s)")
    colors = {"peak": "tab:blue", "average": "tab:orange", "planner": "tab:green"}
    for name, r in results.items():
        for cls, style in (("interactive", "-"), ("standard", ":")):
            ys = [v if v is not None else float("nan") for v in r["attainment_series"][cls]]
            axes[1].plot(ts[: len(ys)], ys, style, color=colors[name], label=f"{name} {cls}")
        rep = r["replicas_series"]
        axes[2].step(
            [x["t"] for x in rep],
            [x["prefill"] + x["decode"] for x in rep],
            where="post",
            color=colors[name],
            label=f"{name} ({r['gpu_hours']:.2f} GPU-h)",
        )
    axes[1].axhline(0.9, color="grey", lw=0.8)
    axes[1].set_ylabel("SLO attainment (10 s bins)")
    axes[1].set_ylim(0, 1.05)
    axes[1].legend(fontsize=7, ncol=3)
    axes[2].set_ylabel("GPUs (prefill + decode)")
    axes[2].set_xlabel("time (s)")
    axes[2].legend(fontsize=8)
    for ax in axes:
        for x in (phase, 3 * phase, 4 * phase):
            ax.axvline(x, color="grey", lw=0.5, ls="--")
    fig.suptitle(f"SLA planner: {PROFILE}, 3x load step at t={phase:.0f}s (virtual time)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--base-rps", type=float, default=16.0)
    ap.add_argument("--phase", type=float, default=120.0, help="seconds per trace phase")
    ap.add_argument("--startup", type=float, default=30.0, help="replica start-up seconds")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="phase 60 s, base 6 rps")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/planner.json")
    ap.add_argument("--fleets", default="peak,average,planner")
    args = ap.parse_args()
    if args.quick:
        args.phase, args.base_rps = 60.0, 6.0
    profile = load_profile(PROFILE)
    trace = make_trace(args.base_rps, args.phase, args.seed)
    end = PHASES * args.phase
    mean_rate = len(trace) / end
    peak = static_size(profile, 3 * args.base_rps, trace)
    avg = static_size(profile, mean_rate, trace)
    config = PlannerConfig(
        lead_time_s=args.startup, down_stabilization_s=60.0, down_cooldown_s=30.0
    )
    fleets = {
        "peak": (peak, False),
        "average": (avg, False),
        "planner": (avg, True),
    }
    results: dict[str, Any] = {}
    timings: dict[str, float] = {}
    for name in args.fleets.split(","):
        size, use = fleets[name]
        t0 = time.perf_counter()
        sim = Sim(
            profile,
            size["prefill"],
            size["decode"],
            startup_s=args.startup,
            use_planner=use,
            seed=args.seed,
            config=config,
        )
        sim.run(trace, end)
        timings[name] = round(time.perf_counter() - t0, 1)
        results[name] = score(sim, args.phase, end)
        r = results[name]
        print(
            f"{name:8s} start P{size['prefill']}/D{size['decode']}  attainment "
            f"{r['attainment']}  peak {r['attainment_peak']}  recover "
            f"{r['time_to_recover_s']}s  GPU-h {r['gpu_hours']}  unfinished {r['unfinished']}"
            f"  ({timings[name]} s wall)",
            flush=True,
        )
    doc = {
        "benchmark": "planner",
        "profile": PROFILE,
        "trace": {
            "source": "Azure LLM inference trace 2023, conversation (lengths); Poisson arrivals",
            "base_rps": args.base_rps,
            "peak_rps": 3 * args.base_rps,
            "mean_rps": round(mean_rate, 2),
            "phase_s": args.phase,
            "requests": len(trace),
            "class_mix": dict(CLASS_MIX),
            "shape": "base | 3x step held 2 phases | linear ramp to base | base 2 phases",
        },
        "startup_s": args.startup,
        "fleet_sizes": {"peak": peak, "average": avg, "planner_start": avg},
        "planner_config": {
            k: getattr(config, k)
            for k in (
                "itl_headroom",
                "ttft_headroom",
                "lead_time_s",
                "down_margin",
                "down_stabilization_s",
                "down_cooldown_s",
                "max_down_step",
            )
        },
        "results": results,
        "wall_s": timings,
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    png = args.out.with_suffix(".png")
    if len(results) == 3:
        plot(results, args.phase, args.base_rps, png)
    print(f"wrote {args.out}" + (f" and {png}" if len(results) == 3 else ""))


if __name__ == "__main__":
    main()
