"""The router's prefix index: leading-block overlap, KV events, bounded memory."""

from __future__ import annotations

import pytest

from controlplane.core.routing.index import PrefixIndex
from controlplane.errors import InvalidArgument
from workers.engine import KvEventKind
from workers.engines.sim_core import hash_blocks

BLOCK = 4


def blocks(*token_runs: range) -> tuple[int, ...]:
    tokens = [t for run in token_runs for t in run]
    return hash_blocks(tokens, BLOCK)


A = blocks(range(16))  # 4 blocks
A_LONGER = blocks(range(16), range(100, 108))  # A's 4 blocks + 2 more
B = blocks(range(50, 66))  # 4 blocks, nothing in common with A


def test_chained_hashes_share_only_the_common_prefix() -> None:
    assert A_LONGER[:4] == A
    assert not set(A) & set(B)


@pytest.mark.parametrize(
    ("held", "query", "expected"),
    [
        (A, A, 4),
        (A, A_LONGER, 4),  # holds the first 4 of 6
        (A_LONGER, A, 4),
        (A, B, 0),
        (A[:2], A, 2),
        ((), A, 0),
        (A, (), 0),
        ((A[0], A[2], A[3]), A, 1),  # a gap stops the walk
        (A[1:], A, 0),  # no first block: nothing leading
    ],
)
def test_overlap_counts_leading_blocks_until_the_first_miss(
    held: tuple[int, ...], query: tuple[int, ...], expected: int
) -> None:
    idx = PrefixIndex()
    idx.stored("w1", held)
    assert idx.overlap("w1", query) == expected
    assert idx.overlap("w2", query) == 0
    assert idx.overlaps(query, ["w1", "w2"]) == {"w1": expected, "w2": 0}


def test_overlaps_walks_once_for_many_workers() -> None:
    idx = PrefixIndex()
    idx.stored("w1", A_LONGER)
    idx.stored("w2", A[:2])
    idx.stored("w3", B)
    got = idx.overlaps(A_LONGER, ["w1", "w2", "w3", "w4"])
    assert got == {"w1": 6, "w2": 2, "w3": 0, "w4": 0}
    assert got == {w: idx.overlap(w, A_LONGER) for w in got}


@pytest.mark.parametrize("kind", [KvEventKind.STORED, "stored"])
def test_stored_and_evicted_events(kind: str) -> None:
    idx = PrefixIndex()
    idx.apply_event("w1", kind, A)
    idx.apply_event("w2", kind, A)
    assert idx.holders(A[0]) == {"w1", "w2"}
    idx.apply_event("w1", KvEventKind.EVICTED, A[2:])  # engines evict tails first
    assert idx.overlap("w1", A) == 2
    assert idx.overlap("w2", A) == 4
    idx.apply_event("w2", "evicted", A[2:])
    assert A[3] not in idx  # emptied entries are deleted, not kept as empty sets
    assert len(idx) == 2
    idx.evicted("w9", B)  # unknown hashes and workers are ignored


def test_unknown_event_kind_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="unknown KV event kind"):
        PrefixIndex().apply_event("w1", "moved", A)


def test_routing_decisions_feed_the_index() -> None:
    idx = PrefixIndex()
    idx.record_route("w1", A)
    assert idx.overlap("w1", A_LONGER) == 4


def test_memory_is_bounded_and_prompt_tails_go_first() -> None:
    idx = PrefixIndex(max_blocks=6)
    idx.stored("w1", A)  # 4 blocks
    idx.stored("w1", B)  # 4 more: 2 of A's must go, its tail
    assert len(idx) == 6
    assert idx.overlap("w1", A) == 2
    assert idx.overlap("w1", B) == 4
    idx.stored("w2", A[:2])  # refreshing A's head makes B's tail the oldest
    idx.stored("w3", blocks(range(200, 208)))  # 2 new blocks
    assert len(idx) == 6
    assert idx.overlap("w1", A) == 2
    assert idx.overlap("w1", B) == 2


def test_lookups_do_not_refresh_entries() -> None:
    idx = PrefixIndex(max_blocks=4)
    idx.stored("w1", A)
    for _ in range(3):
        assert idx.overlap("w1", A) == 4
    idx.stored("w1", B[:1])
    assert idx.overlap("w1", A) == 3  # A's tail went, reads notwithstanding


def test_a_worker_that_leaves_is_forgotten() -> None:
    idx = PrefixIndex()
    idx.stored("w1", A)
    idx.stored("w2", A[:2])
    idx.forget_worker("w1")
    assert idx.overlap("w1", A) == 0
    assert idx.overlap("w2", A) == 2
    assert len(idx) == 2


def test_cap_must_be_positive() -> None:
    with pytest.raises(InvalidArgument, match="max_blocks"):
        PrefixIndex(max_blocks=0)
