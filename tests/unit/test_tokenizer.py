"""SimTokenizer (deterministic, prefix-stable, in-vocabulary) and the IncrementalDecoder."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from workers.tokenizer import IncrementalDecoder, Message, SimTokenizer, Tokenizer

PROSE = (
    "Level-based, like a Kubernetes controller: read desired and observed state, compute the "
    "diff with pure code, execute idempotent actions, requeue. One failing step is logged and "
    "retried with backoff; it never stops the loop. Only the elected leader acts; followers "
    "watch. The router sees workers through an etcd watch plus load reports from the workers, "
    "and picks a prefill and a decode worker for each request."
)


def test_same_text_same_ids_across_instances_and_runs() -> None:
    a, b = SimTokenizer(128_256), SimTokenizer(128_256)
    assert a.encode(PROSE) == b.encode(PROSE)
    # CRC-32 based, never Python's salted hash: these ids hold in every process, on every run.
    assert a.encode("Hello, world") == (29_826, 23_150, 31_947)


def test_ids_stay_inside_the_vocabulary() -> None:
    for vocab in (2, 7, 1000):
        ids = SimTokenizer(vocab).encode(PROSE)
        assert ids
        assert all(0 <= t < vocab for t in ids)


def test_about_four_characters_per_token_on_prose() -> None:
    ids = SimTokenizer(128_256).encode(PROSE)
    assert 3.0 <= len(PROSE) / len(ids) <= 5.0


def test_long_words_are_cut_into_several_tokens() -> None:
    tok = SimTokenizer(128_256)
    assert len(tok.encode("antidisestablishmentarianism")) == 5  # 28 characters, 6 per piece
    assert len(tok.encode(" the")) == 1


@pytest.mark.parametrize("seed", range(20))
def test_a_shared_text_prefix_gives_a_shared_token_prefix(seed: int) -> None:
    tok = SimTokenizer(32_000)
    rng = random.Random(seed)
    cut = rng.randrange(1, len(PROSE))
    head = tok.encode(PROSE[:cut])
    whole = tok.encode(PROSE[:cut] + rng.choice([" and more", "!", "tail", "\n\nnext"]))
    # As with real BPE, only the piece at the boundary may differ.
    assert whole[: len(head) - 1] == head[:-1]


def test_chat_prompts_that_share_turns_share_tokens() -> None:
    tok = SimTokenizer(32_000)
    turn1: list[Message] = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": PROSE},
    ]
    turn2: list[Message] = [
        *turn1,
        {"role": "assistant", "content": "Fine."},
        {"role": "user", "content": "More?"},
    ]
    first = tok.encode(tok.apply_chat_template(turn1), add_special_tokens=False)
    second = tok.encode(tok.apply_chat_template(turn2), add_special_tokens=False)
    shared = len(tok.encode("".join(f"<|{m['role']}|>\n{m['content']}\n" for m in turn1)))
    assert second[: shared - 1] == first[: shared - 1]
    assert tok.apply_chat_template(turn1).endswith("<|assistant|>\n")


def test_decode_gives_one_word_per_token_and_concatenates() -> None:
    tok = SimTokenizer(1000)
    ids = list(range(0, 1000, 37))
    text = tok.decode(ids)
    assert len(text.split()) == len(ids)
    assert text.startswith(" ")
    assert tok.decode(ids[:5]) + tok.decode(ids[5:]) == text


def test_eos_is_optional_and_left_out_of_text() -> None:
    assert SimTokenizer(1000).eos_token_ids == ()
    tok = SimTokenizer(1000, eos_token_id=0)
    assert tok.eos_token_ids == (0,)
    assert tok.decode([5, 0, 6]) == tok.decode([5, 6])


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        SimTokenizer(1)
    with pytest.raises(ValueError, match="eos_token_id"):
        SimTokenizer(10, eos_token_id=10)


def test_sim_tokenizer_implements_the_protocol() -> None:
    tok: Tokenizer = SimTokenizer(100)
    assert tok.vocab_size == 100


class ByteTokenizer:
    """One token per UTF-8 byte: a character may span several tokens, as with byte-level BPE."""

    vocab_size = 256
    eos_token_ids: tuple[int, ...] = ()

    def encode(self, text: str, *, add_special_tokens: bool = True) -> tuple[int, ...]:
        return tuple(text.encode())

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(ids).decode(errors="replace")

    def apply_chat_template(self, messages: Sequence[Message]) -> str:
        return "".join(m["content"] for m in messages)


def test_incremental_decoder_holds_back_split_characters() -> None:
    tok = ByteTokenizer()
    text = "naïve café — 日本"
    ids = tok.encode(text)
    decoder = IncrementalDecoder(tok)
    deltas = [decoder.push([t]) for t in ids] + [decoder.flush()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert decoder.push([]) == ""


@pytest.mark.parametrize("chunk", [1, 3, 8])
def test_incremental_decoder_matches_decoding_everything(chunk: int) -> None:
    tok = SimTokenizer(1000)
    ids = list(range(3, 400, 7))
    decoder = IncrementalDecoder(tok)
    out = "".join(decoder.push(ids[i : i + chunk]) for i in range(0, len(ids), chunk))
    assert out + decoder.flush() == tok.decode(ids)
