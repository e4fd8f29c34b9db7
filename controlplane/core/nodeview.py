"""The control plane's view of nodes, assembled from two kinds of records.

Theory of operation
-------------------
A node is described by two records with different lifetimes:

* its **inventory**, written by the node agent and bound to the agent's lease: it appears when
  the agent registers and vanishes when the lease expires (agent dead, host gone);
* its **scheduling status** (cordoned / draining), written by SREs and never leased, so it
  outlives agent restarts and control-plane restarts.

``NodeView`` folds both into ``Node`` objects. Each ``apply_*`` call returns the changes a
watcher should see: a node is ADDED when its inventory appears, MODIFIED when either record
changes, DELETED when its inventory goes. A scheduling record without an inventory is kept
(invisible) so a cordoned node that re-registers comes back cordoned. ``replace`` swaps the
whole view for a fresh listing (after a watch broke) and returns the difference, so watchers
downstream see a consistent stream even across etcd restarts.

Pure and synchronous: the etcd adapter feeds it, tests drive it directly.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from controlplane.core.model import Node, NodeInventory, NodeSchedulingStatus
from controlplane.core.nodes import LabelSelector


class ChangeType(enum.Enum):
    ADDED = "ADDED"
    MODIFIED = "MODIFIED"
    DELETED = "DELETED"


@dataclass(frozen=True, slots=True)
class NodeChange:
    type: ChangeType
    node: Node  # after the change; before it, for DELETED
    revision: int


@dataclass(frozen=True, slots=True)
class LeasedInventory:
    inventory: NodeInventory
    lease_id: int


class NodeView:
    def __init__(self) -> None:
        self._inventory: dict[str, LeasedInventory] = {}
        self._scheduling: dict[str, NodeSchedulingStatus] = {}
        self._nodes: dict[str, Node] = {}
        self.revision = 0

    # --- reads ---------------------------------------------------------------------------
    def get(self, node_id: str) -> Node | None:
        return self._nodes.get(node_id)

    def list_nodes(self, selector: LabelSelector | None = None) -> list[Node]:
        nodes = sorted(self._nodes.values(), key=lambda n: n.node_id)
        if selector is None or selector.empty:
            return nodes
        return [n for n in nodes if selector.matches(n.inventory.labels)]

    def __len__(self) -> int:
        return len(self._nodes)

    def scheduling_of(self, node_id: str) -> NodeSchedulingStatus:
        return self._scheduling.get(node_id, NodeSchedulingStatus())

    # --- writes --------------------------------------------------------------------------
    def apply_inventory(
        self, node_id: str, leased: LeasedInventory | None, revision: int
    ) -> list[NodeChange]:
        if leased is None:
            self._inventory.pop(node_id, None)
        else:
            self._inventory[node_id] = leased
        return self._refresh(node_id, revision)

    def apply_scheduling(
        self, node_id: str, status: NodeSchedulingStatus | None, revision: int
    ) -> list[NodeChange]:
        if status is None:
            self._scheduling.pop(node_id, None)
        else:
            self._scheduling[node_id] = status
        return self._refresh(node_id, revision)

    def replace(
        self,
        inventories: Mapping[str, LeasedInventory],
        scheduling: Mapping[str, NodeSchedulingStatus],
        revision: int,
    ) -> list[NodeChange]:
        """Swap in a complete listing; return what changed relative to the old view."""
        touched = set(self._inventory) | set(self._scheduling) | set(inventories) | set(scheduling)
        self._inventory = dict(inventories)
        self._scheduling = dict(scheduling)
        changes: list[NodeChange] = []
        for node_id in sorted(touched):
            changes.extend(self._refresh(node_id, revision))
        self.revision = revision
        return changes

    def _refresh(self, node_id: str, revision: int) -> list[NodeChange]:
        self.revision = max(self.revision, revision)
        old = self._nodes.get(node_id)
        leased = self._inventory.get(node_id)
        if leased is None:
            if old is None:
                return []
            del self._nodes[node_id]
            return [NodeChange(ChangeType.DELETED, old, revision)]
        new = Node(
            inventory=leased.inventory,
            scheduling=self._scheduling.get(node_id, NodeSchedulingStatus()),
            lease_id=leased.lease_id,
        )
        if new == old:
            return []
        self._nodes[node_id] = new
        return [NodeChange(ChangeType.ADDED if old is None else ChangeType.MODIFIED, new, revision)]


def initial_changes(nodes: Iterable[Node], revision: int) -> list[NodeChange]:
    """The ADDED events a new watcher receives for the nodes that already exist."""
    return [NodeChange(ChangeType.ADDED, n, revision) for n in nodes]
