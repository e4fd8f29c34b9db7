"""``switchboard make-model``: a small Llama-architecture model with random weights, made locally.

Weights cannot be downloaded on dev and CI machines, so the ``cpu`` engine serves a model built
here: a byte-level BPE tokenizer trained in about a second on local text (the Python standard
library's sources, read in sorted order, so every machine with the same Python trains the same
vocabulary), a Llama-3-style chat template, and a ``LlamaForCausalLM`` with seeded random
weights, written with ``save_pretrained`` like any Hugging Face model directory. Everything that
loads a Hugging Face Llama (transformers, vLLM) loads it.

The weights are random, so the text is gibberish; what is real is the arithmetic: prefill, the
KV cache, its hand-off between processes, and batched decode cost what a model of this shape
costs. ``initializer_range`` is raised from the usual 0.02 to 0.1 so the top two logits are well
apart (median gap ~0.27 instead of ~0.06) and greedy decoding does not flip on float rounding
between batched and unbatched runs.

``ensure_model`` is idempotent: a directory that already holds a model made with the same
``ModelShape`` is reused (tests and ``make up`` call it on every start).
"""

from __future__ import annotations

import json
import os
import shutil
import sysconfig
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from controlplane.errors import InvalidArgument

MARKER = "switchboard-model.json"
DEFAULT_MODEL_NAME = "tiny-llama"
FORMAT = "switchboard-random-llama/1"

SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)

# Llama-3 layout: a header per message, <|eot_id|> after each, an open assistant header to end.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)


@dataclass(frozen=True)
class ModelShape:
    """The shape of the random model. The default is ~4M parameters, 4 KiB of KV per token."""

    vocab_size: int = 2048
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 16384
    initializer_range: float = 0.1
    seed: int = 0
    corpus_chars: int = 4_000_000
    """Characters of local text the tokenizer is trained on."""

    def validate(self) -> ModelShape:
        if self.vocab_size < 512:
            raise InvalidArgument("vocab_size must be >= 512 (the byte alphabet + merges)")
        if self.hidden_size % self.num_attention_heads:
            raise InvalidArgument("hidden_size must be a multiple of num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise InvalidArgument("num_attention_heads must be a multiple of num_key_value_heads")
        if min(self.num_hidden_layers, self.max_position_embeddings) <= 0:
            raise InvalidArgument("num_hidden_layers and max_position_embeddings must be > 0")
        return self

    @property
    def kv_bytes_per_token(self) -> int:
        head_dim = self.hidden_size // self.num_attention_heads
        return 2 * self.num_hidden_layers * self.num_key_value_heads * head_dim * 4  # float32


def quiet_hf() -> None:
    """No download progress bars or advisory warnings from Hugging Face libraries in our logs."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging

    hf_logging: Any = logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _corpus(max_chars: int) -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    total = 0
    for path in sorted(stdlib.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="ignore")
        texts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    if not texts:
        raise FileNotFoundError(f"no local text to train a tokenizer on under {stdlib}")
    return texts


def _train_tokenizer(shape: ModelShape, out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=shape.vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(shape.corpus_chars), trainer)
    fast_cls: Any = PreTrainedTokenizerFast
    fast = fast_cls(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|end_of_text|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))


def _build_weights(shape: ModelShape, out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from transformers import PreTrainedTokenizerFast  # isort: skip

    tok = PreTrainedTokenizerFast.from_pretrained(str(out))
    config = LlamaConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=shape.max_position_embeddings,
        initializer_range=shape.initializer_range,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(shape.seed)
    model: Any = LlamaForCausalLM(config)
    model.eval().save_pretrained(str(out))


def default_model_dir() -> Path:
    """Where ``make up`` and the tests keep the default model: made once, reused after.

    ``$SWITCHBOARD_MODEL_CACHE`` if set, else ``$XDG_CACHE_HOME/switchboard/models`` (default
    ``~/.cache/switchboard/models``), plus ``/tiny-llama``.
    """
    root = os.environ.get("SWITCHBOARD_MODEL_CACHE")
    if root:
        return Path(root) / DEFAULT_MODEL_NAME
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "switchboard" / "models" / DEFAULT_MODEL_NAME


def is_model_dir(path: str | Path, shape: ModelShape | None = None) -> bool:
    """True when ``path`` holds a whole model made by ``make_model`` (with ``shape``, if given)."""
    marker = Path(path) / MARKER
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if meta.get("format") != FORMAT:
        return False
    return shape is None or meta.get("shape") == asdict(shape)


def make_model(path: str | Path, shape: ModelShape | None = None) -> Path:
    """Write a tokenizer + random-weight Llama to ``path`` (replacing what is there)."""
    shape = (shape or ModelShape()).validate()
    quiet_hf()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    # build beside the target and rename, so a crash never leaves a half-written model behind
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _train_tokenizer(shape, tmp)
        _build_weights(shape, tmp)
        (tmp / MARKER).write_text(json.dumps({"format": FORMAT, "shape": asdict(shape)}, indent=2))
        tmp.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def ensure_model(path: str | Path, shape: ModelShape | None = None) -> Path:
    """``path`` if it already holds this model, else make it there."""
    shape = (shape or ModelShape()).validate()
    if is_model_dir(path, shape):
        return Path(path)
    return make_model(path, shape)
