"""Find the id of the Ray node on this host and write it to a file (node agent init container).

The Ray GPU worker pods run on the host network, so their Ray node's address is the host's IP
(``status.hostIP``, passed as ``--host-ip``). This waits (up to ``--timeout`` seconds) until
Ray lists a live node at that address, through Ray Client (``SWITCHBOARD_RAY_ADDRESS``), then
writes its id to ``--out``. A GPU host with no Ray node yet (just added, or its worker pod still
pulling) keeps the agent waiting rather than registering a node nothing can be placed on.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


def pick_ray_node(nodes: Iterable[Mapping[str, Any]], host_ip: str) -> str:
    """The id of the live Ray node whose address is ``host_ip``; "" if none.

    More than one live node at one address means two Ray pods share the host network, which
    the RayCluster's anti-affinity forbids: that is an error, not a choice to make here.
    """
    live = [
        str(n["NodeID"])
        for n in nodes
        if n.get("Alive") and str(n.get("NodeManagerAddress", "")) == host_ip
    ]
    if len(live) > 1:
        raise RuntimeError(f"{len(live)} live Ray nodes at {host_ip}: expected one per host")
    return live[0] if live else ""


def ray_nodes(address: str) -> list[dict[str, Any]]:
    import logging

    import ray

    if not ray.is_initialized():
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    nodes: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call]
    return nodes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--host-ip", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--ray-address", default=os.environ.get("SWITCHBOARD_RAY_ADDRESS", ""))
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--interval", type=float, default=5.0)
    args = p.parse_args(argv)
    if not args.ray_address:
        raise SystemExit("error: no Ray address (--ray-address or SWITCHBOARD_RAY_ADDRESS)")
    deadline = time.monotonic() + args.timeout
    while True:
        try:
            node_id = pick_ray_node(ray_nodes(args.ray_address), args.host_ip)
        except (ConnectionError, TimeoutError) as e:
            print(f"ray not reachable yet: {e}", file=sys.stderr, flush=True)
            node_id = ""
        if node_id:
            Path(args.out).write_text(node_id + "\n")
            print(f"ray node at {args.host_ip}: {node_id}", flush=True)
            return 0
        if time.monotonic() > deadline:
            raise SystemExit(f"error: no live Ray node at {args.host_ip} after {args.timeout:g}s")
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())
