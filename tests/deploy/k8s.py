"""Pure checks over rendered Kubernetes objects (plain dicts), for tests/deploy.

Three kinds of check, none of which needs a cluster:

* ``crd_validator``: a ``jsonschema`` validator for a CRD version's OpenAPI schema, adapted to
  behave like the API server (shared/kuberay/README.md): fields with a ``default`` are not
  required (the server defaults them first), nulls are pruned before validation, and every
  object schema that lists ``properties`` forbids others (strict, as ``kubectl --validate``).
* ``raycluster_operator_errors``: what KubeRay's operator rejects that its CRD schema does not.
* helpers that line objects up: pod templates, selectors, container ports, probes.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml

Obj = dict[str, Any]

DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
POD_TEMPLATE_PATHS = {
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "Job": ("spec", "template"),
}


# --- CRD schemas ---------------------------------------------------------------------------------


def crd_version_schema(crd_file: Path, version: str) -> Obj:
    crd = yaml.safe_load(crd_file.read_text())
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            schema: Obj = v["schema"]["openAPIV3Schema"]
            return schema
    raise KeyError(f"{crd_file}: no version {version}")


def adapt_schema(schema: Any) -> Any:
    """A copy of an OpenAPI v3 CRD schema that validates like the API server, strictly."""
    if isinstance(schema, list):
        return [adapt_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: adapt_schema(v) for k, v in schema.items()}
    props = out.get("properties")
    if isinstance(props, dict):
        if "required" in out:
            out["required"] = [
                r
                for r in out["required"]
                if not (isinstance(props.get(r), dict) and "default" in props[r])
            ]
        out.setdefault("additionalProperties", False)
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)  # the anyOf beside it says integer or string
    return out


def prune_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: prune_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [prune_nulls(v) for v in value]
    return value


def crd_validator(crd_file: Path, version: str = "v1") -> jsonschema.Draft7Validator:
    schema = adapt_schema(crd_version_schema(crd_file, version))
    # metadata is the API server's ObjectMeta, not part of the CRD schema's concern here
    schema.setdefault("properties", {})["metadata"] = {"type": "object"}
    return jsonschema.Draft7Validator(schema)


def schema_errors(validator: jsonschema.Draft7Validator, obj: Obj) -> list[str]:
    data = prune_nulls(copy.deepcopy(obj))
    return sorted(
        f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
        for e in validator.iter_errors(data)
    )


def _containers_ok(template: Any, where: str) -> list[str]:
    containers = (template or {}).get("spec", {}).get("containers") or []
    return [] if containers else [f"{where}: a pod template needs at least one container"]


def raycluster_operator_errors(rc: Obj) -> list[str]:
    """Checks KubeRay's operator makes (ray-operator's validation) beyond the CRD schema."""
    errors: list[str] = []
    name = str(rc.get("metadata", {}).get("name", ""))
    if not DNS1035.match(name) or len(name) > 53:
        errors.append(f"metadata.name {name!r}: must be a DNS-1035 label of at most 53 chars")
    spec = rc.get("spec", {})
    head = spec.get("headGroupSpec")
    if not head:
        errors.append("spec.headGroupSpec: required")
    else:
        errors += _containers_ok(head.get("template"), "spec.headGroupSpec.template")
    groups = spec.get("workerGroupSpecs") or []
    seen: set[str] = set()
    for i, g in enumerate(groups):
        where = f"spec.workerGroupSpecs[{i}]"
        group = str(g.get("groupName", ""))
        if group in seen:
            errors.append(f"{where}.groupName {group!r}: used twice")
        seen.add(group)
        if not DNS1035.match(group):
            errors.append(f"{where}.groupName {group!r}: must be a DNS-1035 label")
        lo = int(g.get("minReplicas", 0))
        hi = int(g.get("maxReplicas", 2**31 - 1))
        if lo < 0 or lo > hi:
            errors.append(f"{where}: minReplicas {lo} must be in [0, maxReplicas {hi}]")
        if "replicas" in g and not lo <= int(g["replicas"]) <= hi:
            errors.append(f"{where}.replicas {g['replicas']}: outside [{lo}, {hi}]")
        if int(g.get("numOfHosts", 1)) < 1:
            errors.append(f"{where}.numOfHosts: must be >= 1")
        errors += _containers_ok(g.get("template"), f"{where}.template")
    return errors


# --- lining objects up ---------------------------------------------------------------------------


def load_all(text: str) -> list[Obj]:
    return [d for d in yaml.safe_load_all(text) if d]


def pod_template(obj: Obj) -> Obj | None:
    if obj["kind"] == "CronJob":
        tmpl: Obj = obj["spec"]["jobTemplate"]["spec"]["template"]
        return tmpl
    path = POD_TEMPLATE_PATHS.get(obj["kind"])
    if path is None:
        return None
    node: Any = obj
    for key in path:
        node = node[key]
    return dict(node)


def ray_pod_templates(rc: Obj) -> Iterator[tuple[str, Obj]]:
    yield "head", rc["spec"]["headGroupSpec"]["template"]
    for g in rc["spec"].get("workerGroupSpecs") or []:
        yield str(g["groupName"]), g["template"]


def all_pod_templates(objs: list[Obj]) -> Iterator[tuple[str, Obj]]:
    """(a name for messages, pod template) of every workload, RayCluster pods included."""
    for o in objs:
        tmpl = pod_template(o)
        if tmpl is not None:
            yield f"{o['kind']}/{o['metadata']['name']}", tmpl
        if o["kind"] == "RayCluster":
            for group, t in ray_pod_templates(o):
                yield f"RayCluster/{o['metadata']['name']}[{group}]", t


def selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def label_selector_matches(sel: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """A metav1.LabelSelector (matchLabels + matchExpressions) against labels."""
    for k, v in (sel.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in sel.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def container_ports(container: Obj) -> dict[str, int]:
    """name -> port, and str(port) -> port, for lookups by name or number."""
    out: dict[str, int] = {}
    for p in container.get("ports") or []:
        out[str(p["containerPort"])] = int(p["containerPort"])
        if "name" in p:
            out[str(p["name"])] = int(p["containerPort"])
    return out


def pod_ports(template: Obj) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in template["spec"]["containers"]:
        out.update(container_ports(c))
    return out


def probe_ports(container: Obj) -> Iterator[tuple[str, str]]:
    """(probe name, port as written) of every probe of a container."""
    probes = {k: container.get(k) for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    for name, probe in probes.items():
        if not probe:
            continue
        for handler in ("httpGet", "tcpSocket", "grpc"):
            if handler in probe:
                yield name, str(probe[handler]["port"])


# --- schemas for the Prometheus Operator kinds we use (no CRD copy is at hand) ----------------

_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": _STR_MAP,
        "matchExpressions": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["key", "operator"],
                "properties": {
                    "key": {"type": "string"},
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}
_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)(y|w|d|h|m|s|ms))+)$"}
_RELABEL = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "sourceLabels": {"type": "array", "items": {"type": "string"}},
        "targetLabel": {"type": "string"},
        "regex": {"type": "string"},
        "replacement": {"type": "string"},
        "action": {"type": "string"},
        "separator": {"type": "string"},
    },
}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"}},
}


def _kind(api_version: str, kind: str, spec: Obj) -> Obj:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": _METADATA,
            "spec": spec,
        },
    }


SELF_VALIDATED_SCHEMAS: dict[str, Obj] = {
    "ServiceMonitor": _kind(
        "monitoring.coreos.com/v1",
        "ServiceMonitor",
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": _LABEL_SELECTOR,
                "namespaceSelector": {"type": "object"},
                "jobLabel": {"type": "string"},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["port"],
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": _DURATION,
                            "scrapeTimeout": _DURATION,
                            "relabelings": {"type": "array", "items": _RELABEL},
                        },
                    },
                },
            },
        },
    ),
    "PrometheusRule": _kind(
        "monitoring.coreos.com/v1",
        "PrometheusRule",
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["groups"],
            "properties": {
                "groups": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["name", "rules"],
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "interval": _DURATION,
                            "limit": {"type": "integer"},
                            "rules": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "required": ["expr"],
                                    "oneOf": [{"required": ["record"]}, {"required": ["alert"]}],
                                    "properties": {
                                        "record": {"type": "string"},
                                        "alert": {"type": "string"},
                                        "expr": {"type": ["string", "integer"]},
                                        "for": _DURATION,
                                        "keep_firing_for": _DURATION,
                                        "labels": _STR_MAP,
                                        "annotations": _STR_MAP,
                                    },
                                },
                            },
                        },
                    },
                }
            },
        },
    ),
    "ScrapeConfig": _kind(
        "monitoring.coreos.com/v1alpha1",
        "ScrapeConfig",
        {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "jobName": {"type": "string", "minLength": 1},
                "httpSDConfigs": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["url"],
                        "properties": {
                            "url": {"type": "string", "pattern": "^https?://"},
                            "refreshInterval": _DURATION,
                        },
                    },
                },
                "metricsPath": {"type": "string", "pattern": "^/"},
                "scrapeInterval": _DURATION,
                "relabelings": {"type": "array", "items": _RELABEL},
            },
        },
    ),
}
