"""Request ids (workers/openai_protocol.py ``new_request_id``): 32 hex digits, unique within a
process and across processes, forked ones included."""

from __future__ import annotations

import os
import re

from workers.openai_protocol import new_request_id


def test_ids_are_32_hex_digits_and_unique_in_a_process() -> None:
    ids = [new_request_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert len({i[:16] for i in ids}) == 1  # one prefix, a counter after it


def test_a_forked_child_draws_its_own_prefix() -> None:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its id and leave at once
        os.write(write, new_request_id().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    mine = new_request_id()
    assert len(child) == 32 and child[:16] != mine[:16]
