"""SLA classes: defaults, validation naming the field, and the config edge."""

from __future__ import annotations

from typing import Any

import pytest

from controlplane.core.sla import (
    DEFAULT_SLA_CLASSES,
    SlaClass,
    index_sla_classes,
    sla_classes_from_dict,
)
from controlplane.errors import InvalidArgument


def test_defaults_are_ordered_and_meet_the_issue_targets() -> None:
    by_name = index_sla_classes(DEFAULT_SLA_CLASSES)
    assert list(by_name) == ["interactive", "standard", "batch"]
    interactive, standard, batch = by_name.values()
    assert interactive.priority < standard.priority < batch.priority
    assert interactive.ttft_p95_ms == 500 and interactive.itl_p95_ms == 50
    assert standard.ttft_p95_ms == 2000 and standard.itl_p95_ms == 100
    assert batch.ttft_p95_ms is None and batch.deadline_s == 3600
    assert interactive.queue_timeout_s < standard.queue_timeout_s < batch.queue_timeout_s
    assert interactive.max_queue < batch.max_queue


@pytest.mark.parametrize(
    ("cls", "target_s", "max_wait_s"),
    [
        (SlaClass("a", 0, ttft_p95_ms=500, queue_timeout_s=2), 0.5, 2.0),
        (SlaClass("b", 2, deadline_s=600, queue_timeout_s=3600), 600.0, 600.0),
        (SlaClass("c", 2, ttft_p95_ms=1000, deadline_s=60, queue_timeout_s=30), 1.0, 30.0),
    ],
)
def test_target_and_max_wait(cls: SlaClass, target_s: float, max_wait_s: float) -> None:
    assert cls.target_s == target_s
    assert cls.max_wait_s == max_wait_s


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "bad name"}, "name 'bad name'"),
        ({"name": ""}, "name ''"),
        ({"priority": -1}, "sla_classes.x.priority"),
        ({"priority": True}, "sla_classes.x.priority"),
        ({"ttft_p95_ms": 0}, "sla_classes.x.ttft_p95_ms"),
        ({"itl_p95_ms": -5}, "sla_classes.x.itl_p95_ms"),
        ({"deadline_s": float("inf")}, "sla_classes.x.deadline_s"),
        ({"queue_timeout_s": 0}, "sla_classes.x.queue_timeout_s"),
        ({"max_queue": -1}, "sla_classes.x.max_queue"),
        ({"max_queue": 1.5}, "sla_classes.x.max_queue"),
        ({"ttft_p95_ms": None}, "set ttft_p95_ms (online) or deadline_s (batch)"),
    ],
)
def test_validation_names_the_field(kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"name": "x", "priority": 0, "ttft_p95_ms": 100.0} | kwargs
    with pytest.raises(InvalidArgument, match=message.replace("(", r"\(").replace(")", r"\)")):
        SlaClass(**args)


def test_index_rejects_duplicates_and_empty() -> None:
    a = SlaClass("a", 0, ttft_p95_ms=1)
    with pytest.raises(InvalidArgument, match="duplicate class 'a'"):
        index_sla_classes([a, a])
    with pytest.raises(InvalidArgument, match="at least one"):
        index_sla_classes([])


def test_from_dict_round_trip_and_defaults() -> None:
    doc = {
        "interactive": {"priority": 0, "ttft_p95_ms": 500, "itl_p95_ms": 50,
                        "queue_timeout_s": 2, "max_queue": 100},
        "batch": {"priority": 2, "deadline_s": 3600, "itl_p95_ms": None},
    }  # fmt: skip
    interactive, batch = sla_classes_from_dict(doc)
    assert interactive == SlaClass("interactive", 0, 500.0, 50.0, None, 2.0, 100)
    assert batch.deadline_s == 3600.0 and batch.itl_p95_ms is None
    assert batch.queue_timeout_s == 30.0 and batch.max_queue == 1000  # dataclass defaults
    assert isinstance(interactive.queue_timeout_s, float)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ([], "expected a mapping of class name"),
        ({"a": 3}, "sla_classes.a: expected a mapping"),
        ({"a": {"priority": 0, "ttft_p95_ms": 1, "ttft": 2}}, "sla_classes.a: unknown field"),
        ({"a": {"ttft_p95_ms": 1}}, "sla_classes.a.priority: required"),
        ({"a": {"priority": "0", "ttft_p95_ms": 1}}, "sla_classes.a.priority"),
        ({"a": {"priority": 0, "ttft_p95_ms": "fast"}}, "sla_classes.a.ttft_p95_ms"),
        ({"a": {"priority": 0, "ttft_p95_ms": 1, "max_queue": 2.0}}, "sla_classes.a.max_queue"),
        ({"a": {"priority": 0, "deadline_s": -1}}, "sla_classes.a.deadline_s"),
        ({"a": {"priority": 0}}, "sla_classes.a: set ttft_p95_ms"),
    ],
)
def test_from_dict_errors_name_the_field(doc: object, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        sla_classes_from_dict(doc)
