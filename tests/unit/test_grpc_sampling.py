"""``Inference.Generate``'s sampling from its request, as ``prepare`` makes it over HTTP."""

from __future__ import annotations

from typing import Any

import pytest
from switchboard.v1 import inference_pb2

from controlplane.gateway.grpc_inference import sampling_from_request

EOS = (2, 9)


@pytest.mark.parametrize(
    ("fields", "max_tokens", "stop_ids", "temperature", "seed"),
    [
        ({}, 16, EOS, 0.0, None),  # unset: the default max, the model's EOS ends it, greedy
        ({"max_tokens": 5, "temperature": 0.7, "seed": 3}, 5, EOS, pytest.approx(0.7), 3),
        ({"stop_token_ids": [40, 41]}, 16, (40, 41, *EOS), 0.0, None),
        ({"ignore_eos": True}, 16, (), 0.0, None),
        ({"ignore_eos": True, "stop_token_ids": [40]}, 16, (40,), 0.0, None),
    ],
)
def test_sampling_from_request(
    fields: dict[str, Any],
    max_tokens: int,
    stop_ids: tuple[int, ...],
    temperature: float,
    seed: int | None,
) -> None:
    s = sampling_from_request(inference_pb2.SamplingParams(**fields), 16, EOS)
    assert (s.max_tokens, s.stop_token_ids, s.temperature, s.seed, s.top_p) == (
        max_tokens,
        stop_ids,
        temperature,
        seed,
        1.0,
    )
