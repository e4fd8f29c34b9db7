"""`switchboard apply / get / describe / scale / delete / explain`: the Deployments API client."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from controlplane.errors import SwitchboardError


def _age(seconds: float) -> str:
    s = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit}"
    return f"{s}s"


def _stub(channel: Any) -> Any:
    from switchboard.v1 import deployments_pb2_grpc

    return deployments_pb2_grpc.DeploymentsStub(channel)


def cmd_apply(args: argparse.Namespace, call: Callable[[Callable[[Any], Any]], Any]) -> None:
    import yaml
    from switchboard.v1 import deployments_pb2

    from controlplane.adapters.grpc.deployments import spec_to_pb
    from controlplane.deployspec import spec_from_dict

    text = Path(args.file).read_text() if args.file != "-" else __import__("sys").stdin.read()
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    if not docs:
        raise SystemExit(f"error: {args.file} holds no deployment")
    for doc in docs:
        try:
            spec = spec_from_dict(doc)
        except SwitchboardError as e:
            raise SystemExit(f"error: {args.file}: {e}") from None
        request = deployments_pb2.ApplyDeploymentRequest(
            spec=spec_to_pb(spec), dry_run=args.dry_run
        )

        def apply(ch: Any, r: Any = request) -> Any:
            return _stub(ch).Apply(r, timeout=args.timeout)

        resp = call(apply)
        verb = "validated (dry run)" if args.dry_run else "applied"
        gen = "" if args.dry_run else f" (generation {resp.deployment.generation})"
        print(f"deployment/{spec.name} {verb}{gen}")


def _pools(d: Any) -> dict[str, tuple[int, int]]:
    from controlplane.adapters.grpc.deployments import ROLE_FROM_PB

    return {ROLE_FROM_PB[p.role].value: (p.ready, p.desired) for p in d.status.pools}


def _condition(d: Any, type_: str) -> Any:
    return next((c for c in d.status.conditions if c.type == type_), None)


def cmd_get(args: argparse.Namespace, call: Callable[[Callable[[Any], Any]], Any]) -> None:
    from google.protobuf import json_format
    from switchboard.v1 import deployments_pb2

    if args.name:
        request = deployments_pb2.GetDeploymentRequest(name=args.name)
        items = [call(lambda ch: _stub(ch).Get(request, timeout=args.timeout))]
    else:
        items = list(
            call(
                lambda ch: _stub(ch).List(
                    deployments_pb2.ListDeploymentsRequest(), timeout=args.timeout
                )
            ).deployments
        )
    if args.output == "json":
        print(json.dumps([json_format.MessageToDict(d) for d in items], indent=2))
        return
    rows = [("NAME", "MODEL", "ENGINE", "POOLS (ready/desired)", "AVAILABLE", "AGE")]
    now = time.time()
    for d in items:
        pools = ", ".join(f"{r} {a}/{b}" for r, (a, b) in _pools(d).items()) or "-"
        avail = _condition(d, "Available")
        engine = d.spec.engine
        from controlplane.adapters.grpc.deployments import ENGINE_FROM_PB

        rows.append(
            (
                d.spec.name,
                d.spec.model,
                ENGINE_FROM_PB[engine].value if engine in ENGINE_FROM_PB else "?",
                pools,
                avail.status if avail else "Unknown",
                _age(now - d.created_at.ToSeconds()),
            )
        )
    _table(rows)


def _table(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def cmd_describe(args: argparse.Namespace, call: Callable[[Callable[[Any], Any]], Any]) -> None:
    from switchboard.v1 import deployments_pb2

    from controlplane.adapters.grpc.deployments import ROLE_FROM_PB, spec_from_pb
    from controlplane.deployspec import spec_to_dict

    d = call(lambda ch: _stub(ch).Get(
        deployments_pb2.GetDeploymentRequest(name=args.name), timeout=args.timeout))  # fmt: skip
    spec = spec_from_pb(d.spec)
    print(f"Name:               {spec.name}")
    print(f"Model:              {spec.model}  ({spec.engine.value})")
    print(f"Generation:         {d.generation} (observed {d.status.observed_generation})")
    print(f"Resource version:   {d.resource_version}")
    print("Spec:")
    import yaml

    for line in yaml.safe_dump(spec_to_dict(spec), sort_keys=False).splitlines():
        print(f"  {line}")
    print("Pools:")
    for p in d.status.pools:
        print(f"  {ROLE_FROM_PB[p.role].value:<13} desired {p.desired}  ready {p.ready}  "
              f"updated {p.updated}")  # fmt: skip
        for reason in p.unschedulable[:10]:
            print(f"    unschedulable: {reason}")
    print("Conditions:")
    rows = [("  TYPE", "STATUS", "REASON", "SINCE", "MESSAGE")]
    now = time.time()
    for c in d.status.conditions:
        since = _age(now - c.last_transition_time.ToSeconds())
        rows.append((f"  {c.type}", c.status, c.reason, since, c.message))
    _table(rows)
    if d.HasField("planner"):
        _describe_planner(d.planner, now)


def _describe_planner(view: Any, now: float) -> None:
    """The SLA planner's last pass and its recent decisions (newest last)."""
    from controlplane.adapters.grpc.deployments import ROLE_FROM_PB

    def role(r: Any) -> str:
        return ROLE_FROM_PB[r].value if r in ROLE_FROM_PB else "?"

    mode = "advisory (reports only)" if view.advisory else "active"
    print(f"Planner:            {mode}, updated {_age(now - view.updated_at.ToSeconds())} ago, "
          f"load {view.observed_rps:.1f} rps, sized for {view.forecast_rps:.1f} rps")  # fmt: skip
    head = ("  POOL", "READY", "CURRENT", "DESIRED", "P95 PREDICTED", "OBSERVED", "TARGET", "AUTO")
    rows = [head]
    for p in view.pools:
        kind = p.kind.upper() or "-"
        pred = f"{kind} {p.predicted_p95_ms:.0f} ms" if p.predicted_p95_ms else "-"
        rows.append((f"  {role(p.role)}", str(p.ready), str(p.current), str(p.desired), pred,
                     f"{p.observed_p95_ms:.0f} ms" if p.observed_p95_ms else "-",
                     f"{p.target_p95_ms:.0f} ms" if p.target_p95_ms else "-",
                     "yes" if p.autoscaling else "no"))  # fmt: skip
    _table(rows)
    for p in view.pools:
        print(f"  {role(p.role)}: {p.reason}")
    if view.decisions:
        print("Planner decisions (newest last):")
        for dec in view.decisions[-10:]:
            flag = "" if dec.applied else " [not applied]"
            print(f"  {_age(now - dec.time.ToSeconds()):>4} ago  {role(dec.role):<8} "
                  f"{dec.from_replicas} -> {dec.to_replicas}  {dec.reason}{flag}")  # fmt: skip


def cmd_scale(args: argparse.Namespace, call: Callable[[Callable[[Any], Any]], Any]) -> None:
    from switchboard.v1 import deployments_pb2

    from controlplane.adapters.grpc.deployments import ROLE_TO_PB
    from controlplane.core.deployments import PoolRole

    try:
        role = PoolRole(args.role)
    except ValueError:
        raise SystemExit(f"error: unknown role {args.role!r}") from None
    resp = call(
        lambda ch: _stub(ch).Scale(
            deployments_pb2.ScaleDeploymentRequest(
                name=args.name, role=ROLE_TO_PB[role], replicas=args.replicas
            ),
            timeout=args.timeout,
        )
    )
    print(f"deployment/{args.name} {role.value} scaled to {args.replicas} "
          f"(generation {resp.deployment.generation})")  # fmt: skip


def cmd_delete(args: argparse.Namespace, call: Callable[[Callable[[Any], Any]], Any]) -> None:
    from switchboard.v1 import deployments_pb2

    call(lambda ch: _stub(ch).Delete(
        deployments_pb2.DeleteDeploymentRequest(name=args.name), timeout=args.timeout))  # fmt: skip
    print(f"deployment/{args.name} deleted")


def cmd_explain(args: argparse.Namespace, call: Callable[[Callable[[Any], Any]], Any]) -> None:
    from switchboard.v1 import deployments_pb2

    from controlplane.adapters.grpc.deployments import ROLE_FROM_PB

    request = deployments_pb2.ExplainDeploymentRequest(name=args.name)
    resp = call(lambda ch: _stub(ch).Explain(request, timeout=args.timeout))
    if not resp.placements:
        print(f"deployment/{args.name}: no replicas placed or pending")
    for p in resp.placements:
        head = f"{ROLE_FROM_PB[p.role].value}/{p.replica}"
        if p.node_id:
            scores = ", ".join(f"{k} {v:.2f}" for k, v in sorted(p.scores.items()))
            print(f"{head}: on {p.node_id} ({scores or 'no scores recorded'})")
        else:
            print(f"{head}: not placed")
        for r in p.rejections[:20]:
            print(f"  - {r}")
