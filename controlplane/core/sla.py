"""SLA classes: what latency a request is promised, and how long it may wait for a slot. Pure.

A request names one class (a tenant's default when it names none). Admission
(``controlplane/core/admission.py``) orders its queue by ``priority`` (lower is more important)
and, within a class, by each request's deadline: ``arrival + target_s`` (the TTFT target, or a
batch class's completion deadline). ``queue_timeout_s`` and ``deadline_s`` are hard: a request
still queued past either is rejected with the reason. The ITL target is not used by admission;
the router and the SLA planner read it.

Config (YAML / JSON) maps a class name to its fields::

    interactive: {priority: 0, ttft_p95_ms: 500, itl_p95_ms: 50, queue_timeout_s: 2,
                  max_queue: 1000}
    batch:       {priority: 2, deadline_s: 3600, queue_timeout_s: 3600, max_queue: 10000}

``sla_classes_from_dict`` checks it strictly: an unknown or missing field, a wrong type or an
out-of-range value raises ``InvalidArgument`` naming the field (``sla_classes.batch.max_queue``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from types import MappingProxyType

from controlplane.errors import InvalidArgument

_NAME_RE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_DEFAULT_QUEUE_TIMEOUT_S = 30.0
_DEFAULT_MAX_QUEUE = 1000


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_positive(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value) and value > 0


@dataclass(frozen=True, slots=True)
class SlaClass:
    """One class of service. Validated on construction (``InvalidArgument`` names the field)."""

    name: str
    """1-63 alphanumerics, ``-``, ``_`` or ``.`` (the same rule as a pool's ``sla_classes``)."""
    priority: int
    """Lower is more important; admission serves a more important class strictly first."""
    ttft_p95_ms: float | None = None
    """Time-to-first-token target (p95); sets the queue deadline. None: no latency target."""
    itl_p95_ms: float | None = None
    """Inter-token latency target (p95), for the router and planner; admission ignores it."""
    deadline_s: float | None = None
    """Batch: complete within this many seconds of arrival. Queued past it: rejected."""
    queue_timeout_s: float = _DEFAULT_QUEUE_TIMEOUT_S
    """Longest a request may wait in the admission queue before it is rejected."""
    max_queue: int = _DEFAULT_MAX_QUEUE
    """Most requests of this class queued at once; 0: never queue (reject when no slot)."""

    def __post_init__(self) -> None:
        where = f"sla_classes.{self.name}"
        if not isinstance(self.name, str) or len(self.name) > 63 or not _NAME_RE.match(self.name):
            raise InvalidArgument(
                f"sla_classes: name {self.name!r} must be 1-63 alphanumerics, '-', '_' or '.'"
            )
        if not _is_int(self.priority) or self.priority < 0:
            raise InvalidArgument(f"{where}.priority: {self.priority!r} must be an integer >= 0")
        for name in ("ttft_p95_ms", "itl_p95_ms", "deadline_s"):
            value = getattr(self, name)
            if value is not None and not _is_positive(value):
                raise InvalidArgument(f"{where}.{name}: {value!r} must be > 0 (or null)")
        if not _is_positive(self.queue_timeout_s):
            raise InvalidArgument(
                f"{where}.queue_timeout_s: {self.queue_timeout_s!r} must be a number > 0"
            )
        if not _is_int(self.max_queue) or self.max_queue < 0:
            raise InvalidArgument(f"{where}.max_queue: {self.max_queue!r} must be an integer >= 0")
        if self.ttft_p95_ms is None and self.deadline_s is None:
            raise InvalidArgument(f"{where}: set ttft_p95_ms (online) or deadline_s (batch)")

    @property
    def target_s(self) -> float:
        """Seconds after arrival a request of this class should start by (its EDF deadline):
        the TTFT target, else the batch deadline."""
        if self.ttft_p95_ms is not None:
            return self.ttft_p95_ms / 1000.0
        assert self.deadline_s is not None  # __post_init__ requires one of them
        return self.deadline_s

    @property
    def max_wait_s(self) -> float:
        """Longest a request may stay queued: the queue timeout, or the deadline if sooner."""
        if self.deadline_s is None:
            return self.queue_timeout_s
        return min(self.queue_timeout_s, self.deadline_s)


DEFAULT_SLA_CLASSES: tuple[SlaClass, ...] = (
    SlaClass(
        "interactive",
        priority=0,
        ttft_p95_ms=500.0,
        itl_p95_ms=50.0,
        queue_timeout_s=2.0,
        max_queue=1000,
    ),
    SlaClass(
        "standard",
        priority=1,
        ttft_p95_ms=2000.0,
        itl_p95_ms=100.0,
        queue_timeout_s=30.0,
        max_queue=2000,
    ),
    SlaClass(
        "batch",
        priority=2,
        deadline_s=3600.0,
        queue_timeout_s=3600.0,
        max_queue=10000,
    ),
)
"""``interactive`` (chat), ``standard`` (API default) and ``batch`` (best effort, 1 h)."""


def index_sla_classes(classes: Sequence[SlaClass]) -> Mapping[str, SlaClass]:
    """Classes by name (read-only); raises ``InvalidArgument`` on none or a duplicate name."""
    if not classes:
        raise InvalidArgument("sla_classes: at least one class is required")
    out: dict[str, SlaClass] = {}
    for c in classes:
        if c.name in out:
            raise InvalidArgument(f"sla_classes: duplicate class {c.name!r}")
        out[c.name] = c
    return MappingProxyType(out)


_FIELDS = tuple(f.name for f in fields(SlaClass) if f.name != "name")
_REQUIRED = ("priority",)


def sla_classes_from_dict(doc: object) -> tuple[SlaClass, ...]:
    """Parse ``{name: {field: value}}`` (YAML / JSON loaded) into classes, checked strictly.

    Fields left out take the dataclass defaults; ``priority`` is required. Order of the result
    follows the document.
    """
    if not isinstance(doc, Mapping):
        raise InvalidArgument(
            f"sla_classes: expected a mapping of class name to fields, got {type(doc).__name__}"
        )
    out: list[SlaClass] = []
    for name, body in doc.items():
        if not isinstance(name, str):
            raise InvalidArgument(f"sla_classes: class name {name!r} must be a string")
        where = f"sla_classes.{name}"
        if not isinstance(body, Mapping):
            raise InvalidArgument(f"{where}: expected a mapping of fields")
        unknown = sorted(str(k) for k in body if k not in _FIELDS)
        if unknown:
            raise InvalidArgument(f"{where}: unknown field(s) {', '.join(unknown)}")
        for req in _REQUIRED:
            if req not in body:
                raise InvalidArgument(f"{where}.{req}: required")
        out.append(
            SlaClass(
                name,
                priority=_int(body, "priority", where, 0),
                ttft_p95_ms=_opt_number(body, "ttft_p95_ms", where),
                itl_p95_ms=_opt_number(body, "itl_p95_ms", where),
                deadline_s=_opt_number(body, "deadline_s", where),
                queue_timeout_s=_number(body, "queue_timeout_s", where, _DEFAULT_QUEUE_TIMEOUT_S),
                max_queue=_int(body, "max_queue", where, _DEFAULT_MAX_QUEUE),
            )
        )
    index_sla_classes(out)
    return tuple(out)


def sla_classes_to_dict(classes: Sequence[SlaClass]) -> dict[str, dict[str, object]]:
    """The inverse of ``sla_classes_from_dict``: every field, unset targets as None."""
    return {c.name: {name: getattr(c, name) for name in _FIELDS} for c in classes}


def _int(body: Mapping[object, object], key: str, where: str, default: int) -> int:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{where}.{key}: {value!r} must be an integer")
    return value


def _number(body: Mapping[object, object], key: str, where: str, default: float) -> float:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(f"{where}.{key}: {value!r} must be a number")
    return float(value)


def _opt_number(body: Mapping[object, object], key: str, where: str) -> float | None:
    if body.get(key) is None:
        return None
    return _number(body, key, where, 0.0)
