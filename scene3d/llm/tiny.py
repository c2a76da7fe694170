"""A tiny randomly initialised causal LM of a current family (Qwen2) with a locally built tokenizer.

It serves tests, benchmarks and the demo: no hub access ever. The tokenizer is a ``tokenizers`` WordLevel
model over a small in-code vocabulary of referring-expression words (ScanNet classes, colours, spatial
relations, prompt words), wrapped as :class:`transformers.PreTrainedTokenizerFast` and saved with
``save_pretrained`` so that :func:`scene3d.llm.loader.load_llm` loads it like any other local model.

Why WordLevel and not a trained BPE: the vocabulary is closed and tiny, so one id per word keeps prompts
short and deterministic (no training randomness); unknown words map to ``[UNK]``.

==========================  ======================================================================
:class:`TinyLLMConfig`      sizes of the model (hidden 64..256, a few layers)
:func:`build_tiny_tokenizer`  the fast tokenizer (base vocabulary only; identifiers are added by the loader)
:func:`build_tiny_llm`      ``(model, tokenizer)`` randomly initialised with a seed
:func:`save_tiny_llm`       writes both into a local directory (atomically) and returns its path
==========================  ======================================================================
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from scene3d.utils.io import atomic_dir
from scene3d.utils.text import plural

#: Special tokens of the base vocabulary (ids 0..3).
PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "<s>", "</s>"

_CLASSES = (
    "wall floor cabinet bed chair sofa table door window bookshelf picture counter desk curtain refrigerator "
    "shower curtain toilet sink bathtub otherfurniture kitchen cabinets lamp pillow monitor tv box shelf "
    "trash can bin couch armchair nightstand dresser mirror towel clothes backpack bag plant radiator stool "
    "whiteboard board printer computer keyboard laptop microwave oven stove fan blinds book books bottle cup "
    "coffee rug mat ottoman bench piano suitcase basket paper ceiling light stairs rail column object objects "
    "furniture thing things item items"
)
_COLOURS = "white black brown gray grey red blue green yellow orange purple pink beige wooden dark light silver gold"
_RELATIONS = (
    "left right front behind back above below under on top bottom near next to beside close closest far "
    "farthest between middle center corner side against facing opposite across from with of in at by the a an "
    "this that these those is are it its which who one two three four five first second third last other "
    "another same different large larger largest smaller smallest big bigger small tall taller short long round "
    "square rectangular open closed empty full there here when you look while standing sitting entering "
    "room wall-mounted and or not"
)
_PROMPT = (
    "system user assistant scene objects : , . ? ! ( ) ; you are given a 3d with find all referred by "
    "description answer none targets target segment the no matching object"
)
_DIGITS = " ".join(str(i) for i in range(10))
_VIEWPOINTS = "looking towards toward north south east west viewpoint view seen from"


def tiny_vocabulary() -> list[str]:
    """The base word list: special tokens first, then every distinct word of the in-code corpus."""
    words: list[str] = [PAD, UNK, BOS, EOS]
    seen = set(words)
    plurals = " ".join(plural(w) for w in _CLASSES.split())  # "all the chairs ..."
    for chunk in (_CLASSES, _COLOURS, _RELATIONS, _PROMPT, _DIGITS, _VIEWPOINTS, plurals):
        for w in chunk.split():
            if w not in seen:
                seen.add(w)
                words.append(w)
    return words


@dataclass
class TinyLLMConfig:
    """Sizes of the tiny Qwen2 model (randomly initialised)."""

    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if not 16 <= self.hidden_size <= 1024:
            raise ValueError(f"hidden_size must lie in [16, 1024] for the tiny model, got {self.hidden_size}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")


class TinyLLM(NamedTuple):
    model: torch.nn.Module
    tokenizer: object  # transformers.PreTrainedTokenizerFast


def build_tiny_tokenizer():
    """A WordLevel fast tokenizer over :func:`tiny_vocabulary` (lower-cased, punctuation split off)."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(tiny_vocabulary())}
    backend = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                    pre_tokenizers.Punctuation(behavior="isolated")])
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, unk_token=UNK,
                                   bos_token=BOS, eos_token=EOS)


def build_tiny_llm(config: TinyLLMConfig | None = None) -> TinyLLM:
    """A randomly initialised ``Qwen2ForCausalLM`` sized by ``config`` and its tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = config or TinyLLMConfig()
    tokenizer = build_tiny_tokenizer()
    hf_config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = Qwen2ForCausalLM(hf_config)
    model.eval()
    return TinyLLM(model, tokenizer)


def save_tiny_llm(path: str | os.PathLike, config: TinyLLMConfig | None = None) -> Path:
    """Build the tiny model and write it (safetensors weights + config + tokenizer) to ``path`` atomically."""
    tiny = build_tiny_llm(config)
    path = Path(path)
    with atomic_dir(path) as tmp:
        tiny.model.save_pretrained(tmp, safe_serialization=True)
        tiny.tokenizer.save_pretrained(tmp)
    return path
