"""NodeView folds lease-bound inventories and durable scheduling records into nodes."""

from __future__ import annotations

from controlplane.core.model import NodeInventory, NodeSchedulingStatus, SchedulingState
from controlplane.core.nodes import parse_selector
from controlplane.core.nodeview import ChangeType, LeasedInventory, NodeChange, NodeView


def inv(node_id: str, **labels: str) -> LeasedInventory:
    return LeasedInventory(NodeInventory(node_id=node_id, labels=labels), lease_id=7)


CORDONED = NodeSchedulingStatus(state=SchedulingState.CORDONED, reason="fan")


def kinds(changes: list[NodeChange]) -> list[tuple[ChangeType, str]]:
    return [(c.type, c.node.node_id) for c in changes]


def test_add_modify_delete() -> None:
    view = NodeView()
    assert kinds(view.apply_inventory("n1", inv("n1"), 2)) == [(ChangeType.ADDED, "n1")]
    assert view.apply_inventory("n1", inv("n1"), 3) == []  # identical rewrite: no event
    changes = view.apply_inventory("n1", inv("n1", zone="a"), 4)
    assert kinds(changes) == [(ChangeType.MODIFIED, "n1")]
    assert changes[0].revision == 4
    deleted = view.apply_inventory("n1", None, 5)
    assert kinds(deleted) == [(ChangeType.DELETED, "n1")]
    assert deleted[0].node.inventory.labels == {"zone": "a"}  # the node as it was
    assert view.get("n1") is None
    assert view.revision == 5


def test_cordon_outlives_the_inventory() -> None:
    view = NodeView()
    view.apply_inventory("n1", inv("n1"), 2)
    assert kinds(view.apply_scheduling("n1", CORDONED, 3)) == [(ChangeType.MODIFIED, "n1")]
    view.apply_inventory("n1", None, 4)  # lease expired
    assert view.list_nodes() == []
    (change,) = view.apply_inventory("n1", inv("n1"), 5)  # agent registers again
    assert change.type is ChangeType.ADDED
    assert change.node.scheduling == CORDONED
    assert not change.node.schedulable


def test_scheduling_for_unknown_node_is_silent() -> None:
    view = NodeView()
    assert view.apply_scheduling("ghost", CORDONED, 2) == []
    assert view.scheduling_of("ghost") == CORDONED
    assert view.apply_scheduling("ghost", None, 3) == []


def test_replace_reports_the_difference() -> None:
    view = NodeView()
    view.apply_inventory("keep", inv("keep"), 2)
    view.apply_inventory("gone", inv("gone"), 3)
    view.apply_inventory("edit", inv("edit"), 4)
    changes = view.replace(
        {"keep": inv("keep"), "edit": inv("edit", zone="b"), "new": inv("new")},
        {"keep": CORDONED},
        revision=2,  # etcd came back with less history: the revision may go down
    )
    assert kinds(changes) == [  # in node-id order
        (ChangeType.MODIFIED, "edit"),
        (ChangeType.DELETED, "gone"),
        (ChangeType.MODIFIED, "keep"),
        (ChangeType.ADDED, "new"),
    ]
    assert view.revision == 2
    assert [n.node_id for n in view.list_nodes()] == ["edit", "keep", "new"]


def test_list_by_selector() -> None:
    view = NodeView()
    view.apply_inventory("a", inv("a", zone="a"), 2)
    view.apply_inventory("b", inv("b", zone="b"), 3)
    assert [n.node_id for n in view.list_nodes(parse_selector("zone=b"))] == ["b"]
    assert len(view) == 2
