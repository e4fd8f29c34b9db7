"""Sim engine timing profiles: loading, validation, and predictions against published anchors."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from workers.profiles import (
    PROFILE_DIR,
    Prediction,
    ProfileError,
    SimProfile,
    available_profiles,
    load_profile,
    parse_profile,
)

REQUIRED = ("llama-3.1-8b-h100", "llama-3.1-70b-tp4-h100", "mixtral-8x7b-tp2-h100", "tiny-test")
REAL = REQUIRED[:3]
# Source ids of /work/shared/CALIBRATION.md, plus its own derived tables.
CALIBRATION_SOURCES = {f"S{n}" for n in range(1, 16)} | {"CALIBRATION"}
TOLERANCE = 0.15


def within(value: float, anchor: float, tolerance: float) -> bool:
    return abs(value - anchor) <= tolerance * anchor


def test_the_required_profiles_ship_and_load() -> None:
    assert set(REQUIRED) <= set(available_profiles())
    for name in available_profiles():
        profile = load_profile(name)
        assert profile.name == name
        assert profile.kv_capacity_blocks >= 1
        assert (PROFILE_DIR / f"{name}.yaml").is_file()


@pytest.mark.parametrize("name", REAL)
def test_real_profiles_cite_calibration_sources_for_each_prediction(name: str) -> None:
    profile = load_profile(name)
    cited = {s.id for s in profile.sources}
    assert cited <= CALIBRATION_SOURCES
    assert any(s.startswith("S") for s in cited)
    assert profile.predictions, "a real profile states what it predicts"
    assert any(p.anchor_kind == "M" for p in profile.predictions), "at least one measured anchor"
    for p in profile.predictions:
        assert p.source in cited, f"{p.source} is not in the profile's sources"


def _all_predictions() -> list[tuple[str, Prediction]]:
    return [(n, p) for n in REAL for p in load_profile(n).predictions]


@pytest.mark.parametrize(
    ("name", "prediction"),
    _all_predictions(),
    ids=[f"{n}:{p.metric}:{dict(p.inputs)}" for n, p in _all_predictions()],
)
def test_each_prediction_is_what_the_formulas_give_and_near_its_anchor(
    name: str, prediction: Prediction
) -> None:
    profile = load_profile(name)
    value = profile.evaluate(prediction)
    assert within(value, prediction.predicted_ms, 0.01), "the yaml's predicted_ms is stale"
    assert prediction.tolerance <= TOLERANCE
    assert within(value, prediction.anchor_ms, prediction.tolerance), (
        f"{value:.2f} ms vs anchor {prediction.anchor_ms} ms ({prediction.source})"
    )


# CALIBRATION.md, written out here so that editing the yaml cannot move the goalposts.
LLAMA_8B_PREFILL_MS = {512: 18.7, 2048: 68.0, 8192: 296.0}  # D
LLAMA_8B_DECODE_1K_CTX_MS = {1: 7.9, 8: 8.3, 32: 9.9, 64: 12.1, 128: 16.3, 256: 25.7}  # D
LLAMA_8B_DECODE_BS8_SHORT_MS = 7.8  # M [S4]: vLLM BF16 H100 bs8, in 32 / out 128 (context ~96)


def test_llama_8b_h100_matches_calibration_anchors_within_15_percent() -> None:
    p = load_profile("llama-3.1-8b-h100")
    for n, ms in LLAMA_8B_PREFILL_MS.items():
        assert within(p.prefill_ms(n, 0), ms, TOLERANCE), (n, p.prefill_ms(n, 0))
    for b, ms in LLAMA_8B_DECODE_1K_CTX_MS.items():
        assert within(p.decode_step_ms(b, 1024 * b), ms, TOLERANCE), (b, ms)
    assert within(p.decode_step_ms(8, 8 * 96), LLAMA_8B_DECODE_BS8_SHORT_MS, TOLERANCE)
    # H100 weight-read floor for 16 GB of BF16 weights at 3.35 TB/s is 4.8 ms: never below it.
    assert p.decode_step_ms(1, 1) > 4.8


def test_70b_and_mixtral_decode_match_the_vllm_bs8_measurements() -> None:
    seventy = load_profile("llama-3.1-70b-tp4-h100")
    mixtral = load_profile("mixtral-8x7b-tp2-h100")
    assert within(seventy.decode_step_ms(8, 768), 19.1, TOLERANCE)  # [S4]
    assert within(mixtral.decode_step_ms(8, 768), 18.2, TOLERANCE)  # [S4]


def test_moe_weight_read_grows_with_batch_from_top_k_to_all_experts() -> None:
    p = load_profile("mixtral-8x7b-tp2-h100")
    reads = [p.weight_read_ms(b) for b in (1, 2, 4, 8, 16, 64)]
    assert reads == sorted(reads)
    assert reads[0] == pytest.approx(4.5, rel=0.02)
    assert reads[-1] == pytest.approx(16.4, rel=0.02)


def test_kv_transfer_matches_the_mooncake_measurements() -> None:
    p = load_profile("llama-3.1-8b-h100")
    for nbytes, ms in ((290e6, 2.51), (1.13e9, 8.84), (4.5e9, 31.65)):  # [S13]
        assert within(p.kv_transfer_ms(int(nbytes)), ms, TOLERANCE)


def test_a_mixed_step_costs_the_decode_step_plus_the_chunks_compute() -> None:
    p = load_profile("llama-3.1-8b-h100")
    decode = p.decode_step_ms(16, 16_000)
    chunk = p.prefill_ms(512, 1024) - p.prefill.t0_ms
    assert p.step_ms(16, 16_000, [(512, 1024)]) == pytest.approx(decode + chunk)
    assert p.step_ms(0, 0, [(512, 0), (256, 0)]) == pytest.approx(
        p.prefill.t0_ms + p.prefill_compute_ms(512, 0) + p.prefill_compute_ms(256, 0)
    )
    assert p.step_ms(0, 0, []) == 0.0
    # cached context makes attention, not the linear part, more expensive
    assert p.prefill_ms(512, 8192) > p.prefill_ms(512, 0)


# --- validation names the bad field ------------------------------------------------------------


def _raw(name: str = "tiny-test") -> dict[str, Any]:
    data = yaml.safe_load((PROFILE_DIR / f"{name}.yaml").read_text())
    assert isinstance(data, dict)
    return data


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda d: d["decode"].__setitem__("a_ms", -1), "'decode.a_ms'"),
        (
            lambda d: d["prefill"].__setitem__("lin_us_per_token", "fast"),
            "'prefill.lin_us_per_token'",
        ),
        (lambda d: d.pop("vocab_size"), "'vocab_size'"),
        (lambda d: d.__setitem__("tp", 0), "'tp'"),
        (lambda d: d["kv_transfer"].__setitem__("efficiency", 1.5), "'kv_transfer.efficiency'"),
        (lambda d: d["decode"].__setitem__("a_msec", 1.0), "'decode.a_msec'"),
        (
            lambda d: d["decode"].__setitem__(
                "moe", {"shared_ms": 1, "experts_ms": 2, "top_k": 9, "num_experts": 8}
            ),
            "'decode.moe.top_k'",
        ),
        (
            lambda d: d.__setitem__(
                "predictions",
                [{"metric": "prefill_ms", "new_tokens": 1, "cached_tokens": 0}],
            ),
            "'predictions[0].anchor_kind'",
        ),
    ],
)
def test_validation_names_the_bad_field(edit: Any, named: str) -> None:
    data = copy.deepcopy(_raw())
    edit(data)
    with pytest.raises(ProfileError, match=named.replace("[", r"\[").replace("]", r"\]")):
        parse_profile(data, "edited.yaml")


def test_an_unmodified_profile_parses_and_an_unknown_name_lists_the_shipped_ones() -> None:
    assert isinstance(parse_profile(_raw(), "tiny-test.yaml"), SimProfile)
    with pytest.raises(ProfileError, match=r"llama-3\.1-8b-h100"):
        load_profile("no-such-profile")
