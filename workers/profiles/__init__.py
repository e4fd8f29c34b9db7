"""Timing profiles of the simulated engine: what one model on one hardware setup costs.

A profile is a YAML file next to this module (``<name>.yaml``), loaded into a frozen
``SimProfile``. Its coefficients are those of /work/shared/CALIBRATION.md, "How to turn these
into a profile":

    prefill_ms(n_new, n_cached) = t0 + n_new*lin + n_new*(n_cached + n_new/2)*attn
    decode_step_ms(B, C)        = a + max(W(B), B*cps) + C*ctx      (C: context tokens in batch)
    W(B)                        = weight_read_ms                     (dense)
                                = shared_ms + experts_ms*(1 - (1 - k/E)^B)   (MoE, k of E)
    kv_transfer_ms(bytes)       = overhead_ms + bytes / (efficiency * link_GBps)

A step that mixes decodes and prefill chunks (continuous batching with chunked prefill) costs
the decode step plus the *compute* part of each chunk's prefill (``prefill_ms`` without ``t0``):
the fixed per-iteration overhead is paid once, by ``a``. That is additive, so an upper bound on a
roofline that would hide small chunks under the weight read; it is also the model under which
CALIBRATION.md's NIM 70B ITL check comes out within ~15% (ITL = step + chunk tokens x lin).

Every profile carries ``sources`` (ids from CALIBRATION.md and which numbers come from them) and
``predictions``: the profile's own output next to a measured (M) or derived (D) anchor, checked by
tests/unit/test_sim_profiles.py. Validation names the bad field (``ProfileError``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from controlplane.errors import InvalidArgument

PROFILE_DIR = Path(__file__).parent


class ProfileError(InvalidArgument):
    """A profile file is missing, malformed, or has a field out of range (the message names it)."""


@dataclass(frozen=True, slots=True)
class PrefillCoefficients:
    t0_ms: float
    """Fixed cost of a prefill-only forward pass."""
    lin_us_per_token: float
    """Linear (matmul) cost per new token."""
    attn_ns_per_pair: float
    """Attention cost per (new token, attended token) pair."""


@dataclass(frozen=True, slots=True)
class MoeWeights:
    """Weight bytes read per decode step grow with batch as more experts are hit."""

    shared_ms: float
    """Time to read the always-active weights (attention, embeddings, router)."""
    experts_ms: float
    """Time to read all experts' weights."""
    top_k: int
    num_experts: int

    def read_ms(self, batch: int) -> float:
        untouched = (1.0 - self.top_k / self.num_experts) ** batch
        return self.shared_ms + self.experts_ms * (1.0 - untouched)


@dataclass(frozen=True, slots=True)
class DecodeCoefficients:
    a_ms: float
    """Fixed per-step overhead (launches, sampling, scheduler)."""
    weight_read_ms: float
    """W: time to read the weights once (dense models; ignored when ``moe`` is set)."""
    cps_ms_per_seq: float
    """Compute per sequence per step; wins over W only at large batch."""
    ctx_ns_per_token: float
    """KV read per context token in the batch."""
    moe: MoeWeights | None = None


@dataclass(frozen=True, slots=True)
class KvTransferCoefficients:
    overhead_ms: float
    link_GBps: float
    """Nominal link bandwidth in GB/s (1e9 bytes/s)."""
    efficiency: float
    """Fraction of the nominal bandwidth a transfer reaches."""


@dataclass(frozen=True, slots=True)
class Source:
    id: str
    what: str


@dataclass(frozen=True, slots=True)
class Prediction:
    """One figure the profile predicts, next to the anchor it should match."""

    metric: str
    """"prefill_ms" | "decode_step_ms" | "kv_transfer_ms"."""
    inputs: Mapping[str, float]
    """prefill: new_tokens, cached_tokens; decode: batch, context_tokens; transfer: bytes."""
    predicted_ms: float
    anchor_ms: float
    anchor_kind: str
    """"M" measured/published, "D" derived (CALIBRATION.md's arithmetic)."""
    source: str
    tolerance: float
    """Allowed relative difference between the profile and the anchor."""


METRICS: Mapping[str, tuple[str, ...]] = {
    "prefill_ms": ("new_tokens", "cached_tokens"),
    "decode_step_ms": ("batch", "context_tokens"),
    "kv_transfer_ms": ("bytes",),
}


@dataclass(frozen=True, slots=True)
class SimProfile:
    """One model on one hardware setup, as the simulated engine sees it."""

    name: str
    model: str
    hardware: str
    tp: int
    dtype: str
    vocab_size: int
    max_context_tokens: int
    kv_bytes_per_token: int
    """KV bytes per token for the whole model (all TP ranks): what a transfer moves."""
    kv_capacity_tokens: int
    block_size: int
    prefill: PrefillCoefficients
    decode: DecodeCoefficients
    kv_transfer: KvTransferCoefficients
    sources: tuple[Source, ...] = ()
    predictions: tuple[Prediction, ...] = ()
    notes: str = ""

    @property
    def kv_capacity_blocks(self) -> int:
        return self.kv_capacity_tokens // self.block_size

    def prefill_compute_ms(self, new_tokens: int, cached_tokens: int) -> float:
        """The prefill cost of a chunk without the per-pass overhead ``t0``."""
        if new_tokens <= 0:
            return 0.0
        p = self.prefill
        linear = new_tokens * p.lin_us_per_token / 1e3
        attention = new_tokens * (cached_tokens + new_tokens / 2) * p.attn_ns_per_pair / 1e6
        return linear + attention

    def prefill_ms(self, new_tokens: int, cached_tokens: int = 0) -> float:
        """A prefill-only forward pass over ``new_tokens`` after ``cached_tokens`` of context."""
        if new_tokens <= 0:
            return 0.0
        return self.prefill.t0_ms + self.prefill_compute_ms(new_tokens, cached_tokens)

    def weight_read_ms(self, batch: int) -> float:
        d = self.decode
        return d.moe.read_ms(batch) if d.moe is not None else d.weight_read_ms

    def decode_step_ms(self, batch: int, context_tokens: int) -> float:
        """One decode step of ``batch`` sequences holding ``context_tokens`` in all."""
        if batch <= 0:
            return 0.0
        d = self.decode
        return (
            d.a_ms
            + max(self.weight_read_ms(batch), batch * d.cps_ms_per_seq)
            + context_tokens * d.ctx_ns_per_token / 1e6
        )

    def step_ms(
        self, decode_batch: int, decode_context_tokens: int, chunks: Sequence[tuple[int, int]]
    ) -> float:
        """One engine iteration: decodes plus prefill chunks ``(new_tokens, cached_tokens)``.

        With decodes in the batch: decode step + each chunk's prefill compute. Prefill only:
        ``t0`` once + each chunk's compute. See the module docstring for why.
        """
        compute = sum(self.prefill_compute_ms(n, c) for n, c in chunks if n > 0)
        if decode_batch > 0:
            return self.decode_step_ms(decode_batch, decode_context_tokens) + compute
        if any(n > 0 for n, _ in chunks):
            return self.prefill.t0_ms + compute
        return 0.0

    def kv_transfer_ms(self, num_bytes: int) -> float:
        """Moving ``num_bytes`` of KV cache between workers over the profile's link."""
        t = self.kv_transfer
        return t.overhead_ms + num_bytes / (t.efficiency * t.link_GBps * 1e9) * 1e3

    def evaluate(self, prediction: Prediction) -> float:
        """What this profile's formulas give for a prediction's inputs (ms)."""
        i = prediction.inputs
        if prediction.metric == "prefill_ms":
            return self.prefill_ms(int(i["new_tokens"]), int(i["cached_tokens"]))
        if prediction.metric == "decode_step_ms":
            return self.decode_step_ms(int(i["batch"]), int(i["context_tokens"]))
        if prediction.metric == "kv_transfer_ms":
            return self.kv_transfer_ms(int(i["bytes"]))
        raise ProfileError(f"unknown metric {prediction.metric!r}")


# --- loading and validation -------------------------------------------------------------------


class _Reader:
    """Reads typed fields from a YAML mapping, naming the dotted path of any bad one."""

    def __init__(self, data: object, path: str, origin: str) -> None:
        if not isinstance(data, Mapping):
            raise ProfileError(f"{origin}: {path or 'profile'} must be a mapping")
        self._data: Mapping[str, Any] = data
        self._path = path
        self._origin = origin
        self._used: set[str] = set()

    def _name(self, key: str) -> str:
        return f"{self._path}.{key}" if self._path else key

    def fail(self, key: str, why: str) -> ProfileError:
        return ProfileError(f"{self._origin}: field {self._name(key)!r} {why}")

    def _get(self, key: str, default: object) -> object:
        self._used.add(key)
        if key not in self._data:
            if default is _REQUIRED:
                raise self.fail(key, "is required")
            return default
        return self._data[key]

    def text(self, key: str, default: object = None) -> str:
        v = self._get(key, _REQUIRED if default is None else default)
        if not isinstance(v, str) or not v:
            raise self.fail(key, f"must be a non-empty string, got {v!r}")
        return v

    def integer(self, key: str, *, minimum: int, default: int | None = None) -> int:
        v = self._get(key, _REQUIRED if default is None else default)
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.fail(key, f"must be an integer, got {v!r}")
        if v < minimum:
            raise self.fail(key, f"must be >= {minimum}, got {v}")
        return v

    def number(
        self, key: str, *, minimum: float = 0.0, positive: bool = False, maximum: float = math.inf
    ) -> float:
        v = self._get(key, _REQUIRED)
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise self.fail(key, f"must be a finite number, got {v!r}")
        if v < minimum or (positive and v <= 0) or v > maximum:
            bound = "> 0" if positive else f">= {minimum}"
            upper = f" and <= {maximum}" if maximum != math.inf else ""
            raise self.fail(key, f"must be {bound}{upper}, got {v}")
        return float(v)

    def child(self, key: str, *, optional: bool = False) -> _Reader | None:
        v = self._get(key, None if optional else _REQUIRED)
        if v is None:
            return None
        return _Reader(v, self._name(key), self._origin)

    def items(self, key: str) -> list[_Reader]:
        v = self._get(key, [])
        if not isinstance(v, list):
            raise self.fail(key, "must be a list")
        return [_Reader(item, f"{self._name(key)}[{n}]", self._origin) for n, item in enumerate(v)]

    def done(self) -> None:
        unknown = sorted(set(self._data) - self._used)
        if unknown:
            raise self.fail(str(unknown[0]), "is not a known field")


_REQUIRED = object()


def _need(reader: _Reader | None) -> _Reader:
    assert reader is not None  # child(optional=False) never returns None
    return reader


def parse_profile(data: object, origin: str = "<profile>") -> SimProfile:
    """A validated ``SimProfile`` from parsed YAML; ``ProfileError`` names the first bad field."""
    r = _Reader(data, "", origin)
    pre = _need(r.child("prefill"))
    prefill = PrefillCoefficients(
        t0_ms=pre.number("t0_ms"),
        lin_us_per_token=pre.number("lin_us_per_token", positive=True),
        attn_ns_per_pair=pre.number("attn_ns_per_pair"),
    )
    pre.done()
    dec = _need(r.child("decode"))
    moe_r = dec.child("moe", optional=True)
    moe = None
    if moe_r is not None:
        num_experts = moe_r.integer("num_experts", minimum=1)
        moe = MoeWeights(
            shared_ms=moe_r.number("shared_ms"),
            experts_ms=moe_r.number("experts_ms", positive=True),
            top_k=moe_r.integer("top_k", minimum=1),
            num_experts=num_experts,
        )
        if moe.top_k > num_experts:
            raise moe_r.fail("top_k", f"must be <= num_experts ({num_experts}), got {moe.top_k}")
        moe_r.done()
    decode = DecodeCoefficients(
        a_ms=dec.number("a_ms"),
        weight_read_ms=dec.number("weight_read_ms"),
        cps_ms_per_seq=dec.number("cps_ms_per_seq"),
        ctx_ns_per_token=dec.number("ctx_ns_per_token"),
        moe=moe,
    )
    dec.done()
    tr = _need(r.child("kv_transfer"))
    transfer = KvTransferCoefficients(
        overhead_ms=tr.number("overhead_ms"),
        link_GBps=tr.number("link_GBps", positive=True),
        efficiency=tr.number("efficiency", positive=True, maximum=1.0),
    )
    tr.done()
    sources = []
    for s in r.items("sources"):
        sources.append(Source(id=s.text("id"), what=s.text("what")))
        s.done()
    predictions = []
    for p in r.items("predictions"):
        metric = p.text("metric")
        if metric not in METRICS:
            raise p.fail("metric", f"must be one of {sorted(METRICS)}, got {metric!r}")
        inputs = {k: float(p.integer(k, minimum=0)) for k in METRICS[metric]}
        kind = p.text("anchor_kind")
        if kind not in ("M", "D"):
            raise p.fail("anchor_kind", f"must be 'M' or 'D', got {kind!r}")
        predictions.append(
            Prediction(
                metric=metric,
                inputs=inputs,
                predicted_ms=p.number("predicted_ms", positive=True),
                anchor_ms=p.number("anchor_ms", positive=True),
                anchor_kind=kind,
                source=p.text("source"),
                tolerance=p.number("tolerance", positive=True, maximum=1.0),
            )
        )
        p.done()
    block_size = r.integer("block_size", minimum=1)
    profile = SimProfile(
        name=r.text("name"),
        model=r.text("model"),
        hardware=r.text("hardware"),
        tp=r.integer("tp", minimum=1),
        dtype=r.text("dtype"),
        vocab_size=r.integer("vocab_size", minimum=2),
        max_context_tokens=r.integer("max_context_tokens", minimum=2),
        kv_bytes_per_token=r.integer("kv_bytes_per_token", minimum=1),
        kv_capacity_tokens=r.integer("kv_capacity_tokens", minimum=block_size),
        block_size=block_size,
        prefill=prefill,
        decode=decode,
        kv_transfer=transfer,
        sources=tuple(sources),
        predictions=tuple(predictions),
        notes=r.text("notes", default="-"),
    )
    r.done()
    return profile


def available_profiles() -> list[str]:
    """Names of the profiles shipped next to this module."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def load_profile(name_or_path: str | Path) -> SimProfile:
    """Load a shipped profile by name (``"llama-3.1-8b-h100"``) or any YAML file by path."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = PROFILE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ProfileError(
            f"no profile {str(name_or_path)!r}; shipped: {', '.join(available_profiles())}"
        )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ProfileError(f"{path.name}: not valid YAML: {e}") from e
    return parse_profile(data, path.name)
