"""Text <-> token ids for the HTTP edge: the ``Tokenizer`` contract and ``SimTokenizer``.

Engines work on token ids (workers/engine.py); the OpenAI-compatible HTTP server
(workers/openai_http.py) turns prompts and chat messages into ids with a ``Tokenizer`` and the
generated ids back into text with an ``IncrementalDecoder``.

``SimTokenizer`` serves the simulated engine: no vocabulary file, no model. It is

- **deterministic**: the same text gives the same ids in every process and on every run (a
  CRC-32 of each piece, never Python's salted ``hash``);
- **prefix-stable**: text is cut into pieces by a left-to-right regular expression and each piece
  is at most ``MAX_PIECE_CHARS`` characters counted from the piece's start, so a shared text
  prefix yields a shared token prefix (up to the piece at the boundary, as with real BPE) and
  prefix caching and prefix-aware routing see what they would see with a real tokenizer;
- **about 4 characters per token** on English text, like a real BPE vocabulary;
- **within the engine's vocabulary**: ids are in ``[0, vocab_size)``;
- **readable**: ``decode`` maps each id to a word from a fixed list (id modulo the list length),
  so generated text looks like text and has exactly one word per token. It does not invert
  ``encode`` (a hash cannot be inverted); nothing needs it to.

A Hugging Face implementation (``tokenizers`` / ``transformers``) fits the same protocol:
``encode`` -> ``tokenizer.encode(text, add_special_tokens=...)``, ``decode`` ->
``tokenizer.decode(ids, skip_special_tokens=True)``, ``apply_chat_template`` ->
``tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)``.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from controlplane.errors import InvalidArgument

Message = Mapping[str, str]
"""One chat message: ``{"role": ..., "content": ...}`` with text content."""


class Tokenizer(Protocol):
    """Text to token ids and back, for one model."""

    vocab_size: int
    eos_token_ids: tuple[int, ...]
    """Ids that end generation unless the request says ``ignore_eos`` (may be empty)."""

    def encode(self, text: str, *, add_special_tokens: bool = True) -> tuple[int, ...]:
        """Token ids of ``text``; ``add_special_tokens`` adds BOS etc. where the model has them
        (the server passes False for text that ``apply_chat_template`` produced)."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, special tokens left out."""
        ...

    def apply_chat_template(self, messages: Sequence[Message]) -> str:
        """The prompt text for a conversation, ending where the assistant's answer starts."""
        ...


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas, for streaming.

    Decoding each chunk of ids on its own goes wrong with real tokenizers (a leading space that
    depends on the previous token, a multi-byte character split over two tokens). This keeps a
    small window: it decodes ``ids[prefix:]`` and ``ids[prefix:read]`` and emits the difference,
    holding text back while it ends in an incomplete character (U+FFFD). The window moves on
    after every emitted delta, so the cost per token stays constant.
    """

    __slots__ = ("_ids", "_prefix", "_read", "_tokenizer")

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def push(self, token_ids: Sequence[int]) -> str:
        """Add ids; the text they complete (possibly empty)."""
        if not token_ids:
            return ""
        self._ids.extend(token_ids)
        decode = self._tokenizer.decode
        before = decode(self._ids[self._prefix : self._read])
        after = decode(self._ids[self._prefix :])
        if after.endswith("\ufffd") or len(after) <= len(before):
            return ""
        self._prefix = self._read
        self._read = len(self._ids)
        return after[len(before) :]

    def flush(self) -> str:
        """Whatever is still held back (at the end of generation)."""
        text = self._tokenizer.decode(self._ids[self._prefix :])
        before = self._tokenizer.decode(self._ids[self._prefix : self._read])
        self._prefix = self._read = len(self._ids)
        return text[len(before) :]


# Pieces, left to right, each at most MAX_PIECE_CHARS (6) characters: a word with at most one
# leading space (a longer word goes on in 6-letter pieces), up to 3 digits, a run of punctuation
# (cut the same way), or whitespace. No look-ahead, so where a piece ends never depends on text
# more than 6 characters on.
_PIECE = re.compile(r"[^\W\d]{1,6}| ?[^\W\d]{1,5}| ?\d{1,3}|[^\s\w]{1,6}| ?[^\s\w]{1,5}|\s{1,6}")

MAX_PIECE_CHARS = 6
"""Longer words and runs are cut every 6 characters: ~4 characters per token on prose."""

_WORD_LIST = (
    "the of and to in a is that for it as was with be by on not he this are or his from at "
    "which but have an they you were her she there been one all we their has would when if "
    "more will what so no can said who up out about into some them other than time only could "
    "new these two may first then do any like my now over such our man me even most made after "
    "also did many before must through back years where much your way well down should because "
    "each just those people how too little state good very make world still own see men work "
    "long get here between both life being under never day same another know while last might "
    "us great old year off come since against go came right used take three states himself few "
    "house use during without again place around however home small found thought went say part "
    "once general high upon school every does got united left number course war until "
    "always away something fact though water less public put think almost hand enough far took "
    "head yet government system better set told nothing night end why called eyes find going "
    "look asked later knew point next program city business give group toward young days let "
    "room president side social given present several order national possible rather second "
    "face per among form important often things looked early white case john become large big "
    "need four within felt along children saw best church ever least power development light "
    "thing seemed family interest want members mind country area others done turned although "
    "open god service problem certain kind different thus began door help sense whole matter "
    "perhaps itself york times law human line above name example action company hands local show "
    "five history whether gave either today act feet across taken past quite anything seen having "
    "death week experience body word half really field"
)
_TOKEN_TEXT = tuple(" " + w for w in _WORD_LIST.split())


class SimTokenizer:
    """Deterministic, prefix-stable, ~4 characters per token; see the module docstring.

    Args:
        vocab_size: the engine's vocabulary; every id is below it.
        eos_token_id: an id that ends generation (default none: the simulated model never emits
            an end-of-sequence token by itself, so outputs run to ``max_tokens`` as benchmarks
            with ``ignore_eos`` expect, and as Switchboard's own gRPC path serves them).
        cache_size: pieces whose ids are remembered (encoding is a dict look-up once warm).
    """

    def __init__(
        self, vocab_size: int, *, eos_token_id: int | None = None, cache_size: int = 1 << 16
    ) -> None:
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
        if eos_token_id is not None and not 0 <= eos_token_id < vocab_size:
            raise ValueError(f"eos_token_id {eos_token_id} is outside [0, {vocab_size})")
        self.vocab_size = vocab_size
        self.eos_token_ids: tuple[int, ...] = () if eos_token_id is None else (eos_token_id,)
        self._cache: dict[str, int] = {}
        self._cache_size = cache_size

    def encode(self, text: str, *, add_special_tokens: bool = True) -> tuple[int, ...]:
        del add_special_tokens  # no BOS in the simulated vocabulary
        pieces = _PIECE.findall(text)
        get = self._cache.get
        ids = [get(p, -1) for p in pieces]
        if -1 in ids:  # pieces not seen before
            cache, vocab = self._cache, self.vocab_size
            for i, token in enumerate(ids):
                if token < 0:
                    piece = pieces[i]
                    ids[i] = token = zlib.crc32(piece.encode()) % vocab
                    if len(cache) < self._cache_size:
                        cache[piece] = token
        return tuple(ids)

    def decode(self, ids: Sequence[int]) -> str:
        words = _TOKEN_TEXT
        n = len(words)
        eos = self.eos_token_ids
        return "".join(words[i % n] for i in ids if i not in eos)

    def apply_chat_template(self, messages: Sequence[Message]) -> str:
        parts = [f"<|{m['role']}|>\n{m['content']}\n" for m in messages]
        parts.append("<|assistant|>\n")
        return "".join(parts)


class HfTokenizer:
    """A Hugging Face tokenizer from a model directory (the cpu engine's model, for instance).

    ``eos_token_ids``: the tokenizer's EOS plus the generation config's ``eos_token_id`` (Llama-3
    style models end a chat turn with ``<|eot_id|>`` and a document with ``<|end_of_text|>``).
    """

    def __init__(self, model_path: str) -> None:
        import json
        from pathlib import Path

        from transformers import AutoTokenizer

        loader: Any = AutoTokenizer
        self._tok: Any = loader.from_pretrained(model_path)
        self.vocab_size = len(self._tok)
        eos: set[int] = set()
        if self._tok.eos_token_id is not None:
            eos.add(int(self._tok.eos_token_id))
        gen = Path(model_path) / "generation_config.json"
        if gen.is_file():
            value = json.loads(gen.read_text()).get("eos_token_id")
            eos.update(
                int(v) for v in (value if isinstance(value, list) else [value]) if v is not None
            )
        self.eos_token_ids = tuple(sorted(eos))

    def encode(self, text: str, *, add_special_tokens: bool = True) -> tuple[int, ...]:
        return tuple(self._tok.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=True))

    def apply_chat_template(self, messages: Sequence[Message]) -> str:
        if not self._tok.chat_template:
            raise InvalidArgument("this model has no chat template; use /v1/completions")
        text = self._tok.apply_chat_template(
            [dict(m) for m in messages], tokenize=False, add_generation_prompt=True
        )
        return str(text)
