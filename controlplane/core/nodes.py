"""Pure rules about nodes: validation, label selectors, the status column SREs read.

Every function here is deterministic and free of I/O; time comes in as ``now``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from controlplane.core.model import GIB, Node, NodeHealth, NodeInventory, SchedulingState
from controlplane.errors import InvalidArgument

MAX_NODE_ID_LEN = 63
_NODE_ID_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_LABEL_NAME_RE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_DNS_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")

MIN_LEASE_TTL_S = 2  # etcd's own floor is 1.5 s with default election settings
MAX_LEASE_TTL_S = 300


def validate_node_id(node_id: str) -> str:
    """Return ``node_id`` when it is a DNS-1123 label-style name; raise InvalidArgument."""
    if not node_id:
        raise InvalidArgument("node_id is empty")
    if len(node_id) > MAX_NODE_ID_LEN:
        raise InvalidArgument(f"node_id {node_id[:20]!r}... is longer than {MAX_NODE_ID_LEN}")
    if not _NODE_ID_RE.match(node_id):
        raise InvalidArgument(
            f"node_id {node_id!r} must be lowercase alphanumerics, '-' or '.', "
            "starting and ending with an alphanumeric"
        )
    return node_id


def validate_label_key(key: str) -> None:
    prefix, _, name = key.rpartition("/")
    if "/" in key and (not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN_RE.match(prefix)):
        raise InvalidArgument(f"label key {key!r}: prefix must be a DNS subdomain")
    if not name or len(name) > 63 or not _LABEL_NAME_RE.match(name):
        raise InvalidArgument(
            f"label key {key!r}: name must be 1-63 alphanumerics, '-', '_' or '.', "
            "starting and ending with an alphanumeric"
        )


def validate_label_value(key: str, value: str) -> None:
    if value and (len(value) > 63 or not _LABEL_NAME_RE.match(value)):
        raise InvalidArgument(
            f"label {key}={value!r}: value must be empty or 1-63 alphanumerics, '-', '_' or '.'"
        )


def validate_labels(labels: Mapping[str, str]) -> None:
    for key, value in labels.items():
        validate_label_key(key)
        validate_label_value(key, value)


def validate_inventory(inv: NodeInventory) -> NodeInventory:
    """Check a registration; the error names the field and what is wrong."""
    validate_node_id(inv.node_id)
    validate_labels(inv.labels)
    seen: set[int] = set()
    for gpu in inv.gpus:
        where = f"gpus[{gpu.index}]"
        if gpu.index < 0:
            raise InvalidArgument(f"{where}.index is negative")
        if gpu.index in seen:
            raise InvalidArgument(f"{where}: duplicate GPU index {gpu.index}")
        seen.add(gpu.index)
        if gpu.memory_total_bytes <= 0:
            raise InvalidArgument(
                f"{where}.memory_total_bytes must be > 0, got {gpu.memory_total_bytes}"
            )
        if gpu.memory_free_bytes < 0:
            raise InvalidArgument(
                f"{where}.memory_free_bytes must be >= 0, got {gpu.memory_free_bytes}"
            )
        if gpu.memory_free_bytes > gpu.memory_total_bytes:
            raise InvalidArgument(
                f"{where}.memory_free_bytes {gpu.memory_free_bytes} exceeds "
                f"memory_total_bytes {gpu.memory_total_bytes}"
            )
        if not gpu.model:
            raise InvalidArgument(f"{where}.model is empty")
    return inv


def validate_lease_ttl(ttl_s: int) -> int:
    if not MIN_LEASE_TTL_S <= ttl_s <= MAX_LEASE_TTL_S:
        raise InvalidArgument(
            f"lease TTL {ttl_s}s is outside [{MIN_LEASE_TTL_S}, {MAX_LEASE_TTL_S}] seconds"
        )
    return ttl_s


# --- label selectors -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Requirement:
    """One term of a selector: ``key=value``, ``key!=value``, ``key`` or ``!key``."""

    key: str
    op: str  # "=", "!=", "exists", "!exists"
    value: str = ""

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        if self.op == "exists":
            return present
        if self.op == "!exists":
            return not present
        if self.op == "=":
            return present and labels[self.key] == self.value
        return labels.get(self.key) != self.value  # "!=": absent keys match, as in Kubernetes


@dataclass(frozen=True, slots=True)
class LabelSelector:
    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(r.matches(labels) for r in self.requirements)

    @property
    def empty(self) -> bool:
        return not self.requirements


def parse_selector(text: str) -> LabelSelector:
    """Parse a Kubernetes-style equality selector: ``zone=a,rack!=r2,gpu,!spot``."""
    text = text.strip()
    if not text:
        return LabelSelector()
    reqs: list[Requirement] = []
    for i, raw in enumerate(text.split(",")):
        term = raw.strip()
        if not term:
            raise InvalidArgument(f"label selector {text!r}: term {i + 1} is empty")
        if "!=" in term:
            key, _, value = term.partition("!=")
            op = "!="
        elif "==" in term:
            key, _, value = term.partition("==")
            op = "="
        elif "=" in term:
            key, _, value = term.partition("=")
            op = "="
        elif term.startswith("!"):
            key, value, op = term[1:], "", "!exists"
        else:
            key, value, op = term, "", "exists"
        key, value = key.strip(), value.strip()
        try:
            validate_label_key(key)
            if op in ("=", "!="):
                if any(c in value for c in "=!"):
                    raise InvalidArgument(f"value {value!r} contains '=' or '!'")
                validate_label_value(key, value)
        except InvalidArgument as e:
            raise InvalidArgument(f"label selector {text!r}: term {term!r}: {e}") from None
        reqs.append(Requirement(key=key, op=op, value=value))
    return LabelSelector(tuple(reqs))


# --- presentation ---------------------------------------------------------------------------


def node_status(node: Node) -> str:
    """kubectl-style STATUS column: ``Ready``, ``NotReady``, ``Ready,SchedulingDisabled``..."""
    health = node.inventory.health
    parts = [
        {
            NodeHealth.HEALTHY: "Ready",
            NodeHealth.DEGRADED: "Degraded",
            NodeHealth.UNHEALTHY: "NotReady",
        }[health]
    ]
    if node.scheduling.state is SchedulingState.CORDONED:
        parts.append("SchedulingDisabled")
    elif node.scheduling.state is SchedulingState.DRAINING:
        parts.append("SchedulingDisabled,Draining")
    return ",".join(parts)


def format_age(seconds: float) -> str:
    """kubectl-style age: 45s, 3m12s, 5h4m, 12d."""
    s = max(0, int(seconds))
    if s < 120:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 10:
        return f"{m}m{s}s" if s else f"{m}m"
    if m < 60:
        return f"{m}m"
    h, m = divmod(m, 60)
    if h < 8:
        return f"{h}h{m}m" if m else f"{h}h"
    if h < 48:
        return f"{h}h"
    return f"{h // 24}d"


def format_gib(n_bytes: int) -> str:
    return f"{n_bytes / GIB:.0f}Gi" if n_bytes >= 10 * GIB else f"{n_bytes / GIB:.1f}Gi"


def nodes_table(nodes: Iterable[Node], now: float, wide: bool = False) -> str:
    """Render nodes as kubectl renders them: NAME STATUS GPUS FREE MEM LABELS AGE."""
    headers = ["NAME", "STATUS", "GPUS", "FREE MEM", "LABELS", "AGE"]
    if wide:
        headers += ["GPU MODEL", "NVLINK DOMAINS", "RAY NODE"]
    rows: list[list[str]] = []
    for node in sorted(nodes, key=lambda n: n.node_id):
        inv = node.inventory
        healthy = sum(1 for g in inv.gpus if g.healthy)
        gpus = f"{inv.gpu_count}" if healthy == inv.gpu_count else f"{healthy}/{inv.gpu_count}"
        labels = ",".join(f"{k}={v}" for k, v in inv.labels.items()) or "<none>"
        row = [
            node.node_id,
            node_status(node),
            gpus,
            f"{format_gib(inv.memory_free_bytes)}/{format_gib(inv.memory_total_bytes)}",
            labels,
            format_age(now - inv.registered_at),
        ]
        if wide:
            models = sorted({g.model for g in inv.gpus}) or ["<none>"]
            domains = sorted({g.nvlink_domain for g in inv.gpus if g.nvlink_domain}) or ["<none>"]
            row += [",".join(models), ",".join(domains), inv.ray_node_id[:12] or "<none>"]
        rows.append(row)
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    lines = [
        "   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [headers, *rows]
    ]
    return "\n".join(lines)
