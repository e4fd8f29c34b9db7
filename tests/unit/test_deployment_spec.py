"""Model deployment specs: the YAML edge (deployspec) and the rules (core.deployments)."""

from __future__ import annotations

import dataclasses
import json
import re
import textwrap
from typing import Any

import pytest

from controlplane import deployspec
from controlplane.core.deployments import (
    Engine,
    ModelDeploymentSpec,
    Parallelism,
    Pool,
    PoolRole,
    format_selector,
    validate_spec,
)
from controlplane.core.model import GIB
from controlplane.core.nodes import parse_selector
from controlplane.deployspec import spec_from_dict, spec_from_yaml, spec_to_dict
from controlplane.errors import InvalidArgument


def doc(**overrides: Any) -> dict[str, Any]:
    """A valid P/D spec as a user writes it, with top-level fields replaced."""
    base: dict[str, Any] = {
        "name": "llama-8b",
        "model": "meta-llama/Llama-3.1-8B",
        "engine": "vllm",
        "parallelism": {"tensor": 2},
        "pools": [{"role": "prefill", "replicas": 1}, {"role": "decode", "replicas": 2}],
    }
    base.update(overrides)
    return base


def pools(*extra: dict[str, Any], decode: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    return [{"role": "prefill"}, {"role": "decode", **(decode or {})}, *extra]


def test_the_docstring_example_is_a_valid_spec() -> None:
    text = deployspec.__doc__ or ""
    block = text.split("The shape (the document *is* the spec; field names follow")[1]
    yaml_text = textwrap.dedent(block.split("::\n")[1].split("\nA ``prefill``")[0])
    spec = spec_from_yaml(yaml_text)
    assert spec.name == "llama-70b"
    assert spec.engine is Engine.VLLM
    assert spec.parallelism == Parallelism(tensor=4)
    assert spec.gpu_memory_bytes_per_gpu == 60 * GIB
    assert spec.gpus_per_replica == 4
    assert spec.engine_args == {"max_model_len": "32768"}
    decode = spec.pool(PoolRole.DECODE)
    assert decode is not None
    assert (decode.replicas, decode.min_replicas, decode.max_replicas) == (4, 2, 8)
    assert format_selector(decode.node_selector) == "gpu=h100,!spot"
    assert decode.affinity == {"zone": "a"}
    prefill = spec.pool(PoolRole.PREFILL)
    assert prefill is not None and (prefill.min_replicas, prefill.max_replicas) == (2, 2)
    long_context = spec.pool(PoolRole.LONG_CONTEXT)
    assert long_context is not None and long_context.context_threshold_tokens == 32768


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (doc(engine="tensorflow"), r"spec.engine 'tensorflow' is unknown \(one of vllm, trtllm"),
        (doc(name="Llama"), "spec.name 'Llama' must be a DNS-1123 label"),
        (doc(name="-x"), "spec.name '-x' must be a DNS-1123 label"),
        (doc(name="x" * 64), "spec.name 'xxxxxxxxxxxxxxxxxxxx'... is longer than 63"),
        (doc(model=" "), "spec.model is empty"),
        (doc(parallelism={"tensor": 0}), r"spec.parallelism.tensor must be >= 1, got 0"),
        (doc(parallelism={"pipeline": -1}), r"spec.parallelism.pipeline must be >= 1, got -1"),
        (doc(parallelism={"tensor": 4, "expert": 3}), "expert 3 must divide tensor \\* data = 4"),
        (doc(parallelism={"tp": 2}), r"spec.parallelism.tp: unknown field \(known: tensor,"),
        (doc(replicas=2), "spec.replicas: unknown field"),
        (doc(engine="cpu"), "the cpu engine runs one process per replica"),
        (doc(gpu_memory_bytes_per_gpu=-1), "spec.gpu_memory_bytes_per_gpu -1 is negative"),
        (doc(gpu_memory_bytes_per_gpu="80GB"), "not a byte count or a quantity like 80Gi"),
        (doc(priority=2**31), "spec.priority 2147483648 is outside the int32 range"),
        (doc(pools=[]), "spec.pools is empty"),
        (doc(pools=pools(decode={"replicas": -1})), r"spec.pools\[decode\].replicas -1 is neg"),
        (
            doc(pools=pools(decode={"min_replicas": 3, "max_replicas": 2})),
            r"spec.pools\[decode\].min_replicas 3 > max_replicas 2",
        ),
        (
            doc(pools=pools(decode={"replicas": 5, "max_replicas": 4})),
            r"spec.pools\[decode\].replicas 5 is outside \[min_replicas 4, max_replicas 4\]",
        ),
        (doc(pools=pools(decode={"replicas": "2"})), r"pools\[decode\].replicas: Input should"),
        (doc(pools=pools(decode={"replcas": 2})), r"spec.pools\[decode\].replcas: unknown field"),
        (doc(pools=pools({"role": "decode"})), r"spec.pools\[decode\]: duplicate pool role"),
        (doc(pools=pools({"role": "embed"})), r"spec.pools\[2\].role 'embed' is unknown"),
        (doc(pools=[{"role": "prefill"}]), "a prefill pool needs a decode pool"),
        (doc(pools=[{"role": "decode"}]), "a decode pool needs a prefill pool"),
        (
            doc(pools=[{"role": "long_context", "context_threshold_tokens": 9}]),
            "needs an aggregated pool or a prefill \\+ decode pair",
        ),
        (
            doc(pools=pools({"role": "long_context"})),
            r"spec.pools\[long_context\].context_threshold_tokens must be > 0",
        ),
        (
            doc(pools=pools(decode={"context_threshold_tokens": 10})),
            r"pools\[decode\].context_threshold_tokens is only for a long_context pool",
        ),
        (doc(pools=pools(decode={"node_selector": "gpu=,,"})), r"\[decode\].node_selector: "),
        (
            doc(pools=pools(decode={"node_selector": 5})),
            r"spec.pools\[decode\].node_selector: must be a selector string or a mapping",
        ),
        (doc(pools=pools(decode={"affinity": {"zone": "a b"}})), r"\[decode\].affinity: label"),
        (doc(pools=pools(decode={"sla_classes": ["a", "a"]})), "sla_classes: duplicate 'a'"),
        (doc(pools=pools(decode={"sla_classes": [""]})), "sla_classes: '' must be 1-63"),
        (doc(engine_args={"x": [1]}), r"spec.engine_args.x: Input should be a valid string"),
        ({"name": "x"}, "spec.model: required; spec.engine: required; spec.pools: required"),
    ],
)
def test_bad_specs_name_the_field(data: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        spec_from_dict(data)


def spec(**overrides: Any) -> ModelDeploymentSpec:
    base = ModelDeploymentSpec(
        name="m",
        model="m",
        engine=Engine.SIM,
        pools=(Pool(PoolRole.AGGREGATED, 2, 1, 3),),
    )
    return dataclasses.replace(base, **overrides)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (spec(engine="foo"), "spec.engine 'foo' is unknown"),
        (spec(pools=(Pool(PoolRole.AGGREGATED, -2, 0, 3),)), "replicas -2 is negative"),
        (spec(pools=(Pool(PoolRole.AGGREGATED, 1, 0, -1),)), "max_replicas -1 is negative"),
        (spec(pools=(Pool(PoolRole.AGGREGATED, 2, 3, 2),)), "min_replicas 3 > max_replicas 2"),
        (spec(pools=(Pool(PoolRole.AGGREGATED, 4, 1, 3),)), "replicas 4 is outside"),
        (spec(pools=(Pool("mixed", 1, 1, 1),)), r"spec.pools\[0\].role 'mixed' is unknown"),  # type: ignore[arg-type]
        (spec(parallelism=Parallelism(tensor=0)), "spec.parallelism.tensor must be >= 1"),
    ],
)
def test_validate_spec_on_dataclasses(bad: ModelDeploymentSpec, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        validate_spec(bad)


def test_tensor_parallel_need_not_be_a_power_of_two() -> None:
    # tp 3 is a legal spec; whether any node holds it is placement's answer.
    s = spec_from_dict(doc(parallelism={"tensor": 3}))
    assert s.gpus_per_replica == 3


def test_defaults() -> None:
    s = spec_from_dict(doc())
    assert s.model_path == "" and s.priority == 0 and s.engine_args == {}
    assert s.parallelism == Parallelism(tensor=2, pipeline=1, expert=1, data=1)
    decode = s.pool(PoolRole.DECODE)
    assert decode == Pool(PoolRole.DECODE, 2, 2, 2)
    assert s.disaggregated and s.pool(PoolRole.AGGREGATED) is None


def test_round_trip_through_json() -> None:
    s = spec_from_dict(
        doc(
            model_path="/models/x",
            engine="trtllm",
            parallelism={"tensor": 4, "pipeline": 2, "expert": 4, "data": 1},
            gpu_memory_bytes_per_gpu="70Gi",
            priority=-5,
            engine_args={"max_model_len": 8192, "enforce_eager": True, "dtype": "bf16"},
            pools=[
                {"role": "prefill", "replicas": 1, "max_replicas": 4, "sla_classes": ["batch"]},
                {"role": "decode", "replicas": 3, "min_replicas": 2, "max_replicas": 9},
                {"role": "long_context", "replicas": 0, "context_threshold_tokens": 65536},
                {
                    "role": "aggregated",
                    "node_selector": {"gpu": "h100", "zone": "a"},
                    "affinity": {"rack": 7},
                },
            ],
        )
    )
    assert s.engine_args == {"dtype": "bf16", "enforce_eager": "true", "max_model_len": "8192"}
    stored = json.loads(json.dumps(spec_to_dict(s)))
    assert spec_from_dict(stored) == s
    assert stored["pools"][3]["node_selector"] == "gpu=h100,zone=a"
    assert stored["pools"][3]["affinity"] == {"rack": "7"}
    assert stored["gpu_memory_bytes_per_gpu"] == 70 * GIB


def test_selector_string_and_mapping_are_the_same_selector() -> None:
    by_text = spec_from_dict(doc(pools=pools(decode={"node_selector": "zone=a, gpu=h100"})))
    by_map = spec_from_dict(
        doc(pools=pools(decode={"node_selector": {"gpu": "h100", "zone": "a"}}))
    )
    assert by_text == by_map
    decode = by_text.pool(PoolRole.DECODE)
    assert decode is not None and decode.node_selector == parse_selector("gpu=h100,zone=a")


@pytest.mark.parametrize(
    ("quantity", "expected"),
    [(0, 0), (1234, 1234), ("512Mi", 512 * 2**20), ("80Gi", 80 * GIB), ("2G", 2 * 10**9)],
)
def test_memory_quantities(quantity: object, expected: int) -> None:
    assert spec_from_dict(doc(gpu_memory_bytes_per_gpu=quantity)).gpu_memory_bytes_per_gpu == (
        expected
    )


def test_cpu_engine_takes_no_gpus() -> None:
    s = spec_from_dict(doc(engine="cpu", parallelism={}))
    assert s.gpus_per_replica == 0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: [unclosed", "spec.yaml: not valid YAML"),
        ("- a\n- b\n", "spec.yaml: the document must be a mapping"),
        ("", "spec.yaml: the document must be a mapping"),
    ],
)
def test_yaml_errors(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        spec_from_yaml(text, source="spec.yaml")


def test_not_a_mapping() -> None:
    with pytest.raises(InvalidArgument, match="spec must be a mapping"):
        spec_from_dict([1, 2])  # type: ignore[arg-type]


def test_sla_classes_per_deployment() -> None:
    classes = {
        "realtime": {"priority": 0, "ttft_p95_ms": 200, "itl_p95_ms": 30, "queue_timeout_s": 1},
        "bulk": {"priority": 5, "deadline_s": 600},
    }
    s = spec_from_dict(doc(sla_classes=classes, pools=pools(decode={"sla_classes": ["bulk"]})))
    assert [c.name for c in s.effective_sla_classes] == ["realtime", "bulk"]
    assert s.sla_classes[0].ttft_p95_ms == 200.0 and s.sla_classes[1].deadline_s == 600.0
    assert spec_from_dict(json.loads(json.dumps(spec_to_dict(s)))) == s
    assert [c.name for c in spec_from_dict(doc()).effective_sla_classes] == [
        "interactive", "standard", "batch"
    ]  # fmt: skip
    # the classes are not part of the workers' template: editing them restarts nothing
    from controlplane.core.reconcile import template_hash

    plain = spec_from_dict(doc())
    assert template_hash(plain, plain.pools[0]) == template_hash(s, s.pools[0])


@pytest.mark.parametrize(
    ("classes", "pool_classes", "message"),
    [
        ({"rt": {"priority": 0}}, [], "spec.sla_classes.rt: set ttft_p95_ms"),
        ({"rt": {"priority": 0, "ttft_ms": 1}}, [], "spec.sla_classes.rt: unknown field"),
        ({"rt": {"priority": -1, "ttft_p95_ms": 1}}, [], "spec.sla_classes.rt.priority"),
        ({"rt": {"priority": 0, "ttft_p95_ms": 1}}, ["interactive"], "not one of the deployment"),
    ],
)
def test_bad_sla_classes_name_the_field(
    classes: dict[str, Any], pool_classes: list[str], message: str
) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        spec_from_dict(doc(sla_classes=classes, pools=pools(decode={"sla_classes": pool_classes})))
