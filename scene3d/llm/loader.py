"""Load any Hugging Face causal LM from a local directory and give it object identifier tokens.

``load_llm`` returns an :class:`IdentifierLM`: the base causal LM (frozen, LoRA adapters injected by peft on
its attention/MLP projections), the tokenizer with ``<OBJ000>``...``<OBJ{K-1}>``, ``[SEG]`` and the object
placeholder added as special tokens, and two small trainable tables for those new tokens.

How the new tokens train (one of the two options the design allows; this one is chosen): the base
embedding matrix and LM head are NOT resized. The new tokens live in a separate ``new_embed``
(``nn.Embedding(n_new, H)``) for the input side and ``new_head`` (``nn.Linear(H, n_new)``) for the output side.
:meth:`IdentifierLM.embed` looks new ids up in ``new_embed`` and :meth:`IdentifierLM.forward` writes
``new_head`` logits into the columns of the new ids. Why: every base weight stays frozen with
``requires_grad=False`` (no gradient masks that an optimizer's weight decay could still move), the new rows
are small to checkpoint, and it works for tied and untied heads and for tokenizers whose length differs from
the model's (padded) vocabulary — e.g. Qwen's added ids fall inside its padded embedding; they are routed to
``new_embed`` all the same. The logits cover ``vocab_size = max(base rows, largest new id + 1)`` columns.

=====================  ===============  ==========================================================
:meth:`embed`          [B, L] -> [B, L, H]   token embeddings (base table or new table)
:meth:`forward`        [B, L, H] -> :class:`LMOutput` (hidden [B, L, H], logits [B, L, V], cache)
=====================  ===============  ==========================================================

No hub access ever: a path is loaded with ``local_files_only=True``.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

import torch
from torch import nn

from scene3d.constants import DEFAULT_NUM_OBJ_TOKENS, OBJ_PLACEHOLDER, OBJ_TOKEN_TEMPLATE, SEG_TOKEN
from scene3d.llm.registry import resolve_model_path
from scene3d.llm.tiny import TinyLLMConfig, build_tiny_llm

#: Tokenizer classes that mean "the tokenizer.json as it is"; loaded as PreTrainedTokenizerFast.
_GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


@dataclass
class LLMConfig:
    """Which causal LM to load and how to adapt it.

    ``path`` is a local directory holding any Hugging Face causal LM (config.json, safetensors weights,
    tokenizer files), or the name of a model converted by ``scene3d llm convert`` (``smollm2``; see
    :mod:`scene3d.llm.registry` — a name keeps checkpoints portable between machines); when it is ``None`` a
    tiny randomly initialised Qwen2 model is built in memory from ``tiny`` (tests). LoRA (``lora_r > 0``) is
    injected by peft on ``lora_target_modules`` — ``"all-linear"`` means every attention/MLP projection and
    never the output head. ``num_layers: k`` keeps only the first ``k`` decoder layers of a pretrained model
    (CPU budgets; the final norm and the head stay), recorded with the config in every checkpoint.
    """

    path: Optional[str] = None
    num_layers: Optional[int] = None
    tiny: TinyLLMConfig = field(default_factory=TinyLLMConfig)
    num_obj_tokens: int = DEFAULT_NUM_OBJ_TOKENS
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: Union[str, list] = "all-linear"
    #: Train every weight of the base model instead of LoRA adapters (needs ``lora_r=0``). Meant for the
    #: tiny randomly initialised model: it has no pretrained knowledge to protect, so a low-rank update of
    #: random frozen weights would only restrict it. The base weights then go into the checkpoint.
    train_base: bool = False
    dtype: str = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.tiny, dict):
            self.tiny = TinyLLMConfig(**self.tiny)
        if not 1 <= self.num_obj_tokens <= 1000:
            raise ValueError(f"num_obj_tokens must lie in [1, 1000] (3-digit identifiers), got {self.num_obj_tokens}")
        if self.lora_r < 0:
            raise ValueError(f"lora_r must be >= 0, got {self.lora_r}")
        if self.train_base and self.lora_r > 0:
            raise ValueError(f"train_base=true trains the whole base model; set lora_r=0 (got {self.lora_r})")
        if self.num_layers is not None and self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1 (or null for all layers), got {self.num_layers}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")


class LMOutput(NamedTuple):
    hidden: torch.Tensor  # [B, L, H] last-layer hidden states (after the final norm)
    logits: torch.Tensor  # [B, L, V]
    cache: Any  # transformers Cache (DynamicCache) or None


def identifier_tokens(k: int) -> list[str]:
    """``["<OBJ000>", ..., "<OBJ{k-1}>"]``."""
    return [OBJ_TOKEN_TEMPLATE.format(i) for i in range(k)]


def load_tokenizer(path: str | os.PathLike):
    """Tokenizer of a local model directory (never the hub).

    A ``tokenizer_config.json`` that names a generic backend is loaded as ``PreTrainedTokenizerFast`` from
    its ``tokenizer.json`` (AutoTokenizer would map a Qwen2 config to Qwen2Tokenizer and rebuild a BPE
    that our WordLevel tiny tokenizer is not); anything else goes through ``AutoTokenizer``.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(path)
    cfg_file = path / "tokenizer_config.json"
    declared = None
    if cfg_file.exists():
        try:
            declared = json.loads(cfg_file.read_text()).get("tokenizer_class")
        except json.JSONDecodeError as e:
            raise ValueError(f"corrupt tokenizer config {cfg_file}: {e}") from e
    if declared in _GENERIC_TOKENIZER_CLASSES:
        return PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _load_base(config: LLMConfig):
    """(base causal LM, tokenizer, fingerprint of the base weights or None for the tiny model)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if config.path is None:
        tiny = build_tiny_llm(config.tiny)
        if config.num_layers is not None:
            raise ValueError("llm.num_layers truncates a pretrained model; the tiny model sets tiny.num_hidden_layers")
        return tiny.model, tiny.tokenizer, None
    path = resolve_model_path(config.path)
    try:
        hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"unreadable model config {path / 'config.json'}: {e}") from e
    n = int(getattr(hf_config, "num_hidden_layers", 0) or 0)
    if config.num_layers is not None:
        if config.num_layers > n:
            raise ValueError(f"llm.num_layers={config.num_layers} but {path} has only {n} layers")
        hf_config.num_hidden_layers = config.num_layers
        if getattr(hf_config, "layer_types", None):
            hf_config.layer_types = list(hf_config.layer_types)[: config.num_layers]
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the dropped layers' weights are "unexpected keys": intended here
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a sub-second local load needs no "Loading weights" bar
    try:
        model = AutoModelForCausalLM.from_pretrained(path, config=hf_config, local_files_only=True,
                                                     dtype=getattr(torch, config.dtype))
    except OSError as e:
        raise FileNotFoundError(f"cannot load model weights from {path}: {e}") from e
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    tokenizer = load_tokenizer(path)
    if tokenizer.pad_token is None:  # batching needs one; the end-of-sequence token is the usual choice
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, weights_fingerprint(model)


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over the names, shapes and values of a model's weights (tied tensors once), the values taken in
    bfloat16 so that a float32 and a bfloat16 load of the same base agree. Identifies the base a checkpoint's
    adapters were trained on (~0.3 s for SmolLM2-135M)."""
    import hashlib

    h = hashlib.sha256()
    seen = set()
    for name, t in sorted(model.state_dict().items()):
        if not t.is_floating_point():
            continue
        key = (t.data_ptr(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(t.detach().to("cpu", torch.bfloat16).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fingerprint_tensor(hexdigest: str) -> torch.Tensor:
    """The checkpoint form of a fingerprint: its 32 bytes as a uint8 tensor (safetensors holds no strings)."""
    return torch.tensor(list(bytes.fromhex(hexdigest)), dtype=torch.uint8)


def fingerprint_hex(t: torch.Tensor) -> str:
    """Inverse of :func:`fingerprint_tensor`."""
    return bytes(t.tolist()).hex()


class IdentifierLM(nn.Module):
    """A frozen causal LM + LoRA + trainable tables for the new tokens (see the module docstring)."""

    def __init__(self, base: nn.Module, tokenizer, config: LLMConfig, fingerprint: Optional[str] = None) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        #: sha256 of the frozen base weights (:func:`weights_fingerprint`); None for the tiny model, whose
        #: weights a checkpoint stores whole. Saved in checkpoints as the buffer ``base_fingerprint``.
        self.fingerprint = fingerprint
        if fingerprint is not None:
            self.register_buffer("base_fingerprint", fingerprint_tensor(fingerprint))
        n_base_rows = base.get_input_embeddings().weight.shape[0]
        hidden = base.get_input_embeddings().weight.shape[1]

        obj_tokens = identifier_tokens(config.num_obj_tokens)
        new_tokens = obj_tokens + [SEG_TOKEN, OBJ_PLACEHOLDER]
        existing = set(tokenizer.get_vocab())
        clash = [t for t in new_tokens if t in existing]
        if clash:
            raise ValueError(f"tokenizer already holds {clash[:3]}...; pass a base tokenizer without scene3d tokens")
        tokenizer.add_tokens(new_tokens, special_tokens=True)  # same call in transformers 4.x and 5.x
        new_ids = tokenizer.convert_tokens_to_ids(new_tokens)
        if len(set(new_ids)) != len(new_ids):
            raise RuntimeError("tokenizer gave duplicate ids to the new tokens")
        self.obj_token_ids: list[int] = new_ids[: config.num_obj_tokens]
        self.seg_token_id: int = new_ids[-2]
        self.placeholder_id: int = new_ids[-1]
        self.vocab_size = max(n_base_rows, max(new_ids) + 1)
        self.n_base_rows = n_base_rows

        # id -> row of the new tables (-1 for base ids); buffers so they follow .to(device)
        new_index = torch.full((self.vocab_size,), -1, dtype=torch.long)
        new_index[torch.tensor(new_ids)] = torch.arange(len(new_ids))
        self.register_buffer("new_index", new_index, persistent=False)
        self.register_buffer("new_ids", torch.tensor(new_ids, dtype=torch.long), persistent=False)

        for p in base.parameters():
            p.requires_grad_(config.train_base)
        if config.lora_r > 0:
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                              target_modules=config.lora_target_modules, bias="none")
            with warnings.catch_warnings():
                # peft reads transformers' deprecated `is_gradient_checkpointing` (a FutureWarning on every
                # load); it is peft's call, not ours, and says nothing about this model
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                base = get_peft_model(base, lora)
        self.lm = base

        # New rows start near the mean of the base rows plus noise of the base spread, so they are in
        # distribution yet distinct (identifiers must be told apart from the start).
        gen = torch.Generator().manual_seed(config.seed)
        w_in = self.causal_lm.get_input_embeddings().weight.detach().float()
        w_out_mod = self.causal_lm.get_output_embeddings()
        w_out = w_out_mod.weight.detach().float() if w_out_mod is not None else w_in
        dtype = w_in.dtype if config.dtype == "float32" else getattr(torch, config.dtype)
        self.new_embed = nn.Embedding(len(new_ids), hidden)
        self.new_head = nn.Linear(hidden, len(new_ids), bias=False)
        with torch.no_grad():
            self.new_embed.weight.copy_(w_in.mean(0) + torch.randn(len(new_ids), hidden, generator=gen) * w_in.std())
            self.new_head.weight.copy_(w_out.mean(0) + torch.randn(len(new_ids), hidden, generator=gen) * w_out.std())
        self.new_embed.to(dtype)
        self.new_head.to(dtype)
        self._cache_kw = _cache_kwarg(self.causal_lm.get_decoder())

    # -- views ----------------------------------------------------------------------------------------
    @property
    def causal_lm(self) -> nn.Module:
        """The underlying ``*ForCausalLM`` (LoRA layers are injected into it in place)."""
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

    @property
    def hidden_size(self) -> int:
        return int(self.new_embed.weight.shape[1])

    def get_input_embeddings(self) -> nn.Module:
        return self.causal_lm.get_input_embeddings()

    def new_cache(self, max_len: int):
        """An empty preallocated KV cache (transformers ``StaticCache``) of ``max_len`` positions for inference:
        decoding writes in place instead of concatenating the whole cache at every step."""
        from transformers import StaticCache

        return StaticCache(config=self.causal_lm.config, max_cache_len=int(max_len))

    @contextlib.contextmanager
    def merged_lora(self):
        """Inference with the LoRA adapters folded into the base weights (``W + s B A``): each adapted projection
        is then one matmul instead of three plus an add (~20% off a tiny-model decoding step on CPU).

        The merged weight of each adapted layer is a separate tensor that replaces the base layer's ``weight``
        for the duration of the context, and peft is told the adapter is merged (so its LoRA branch is
        skipped); on exit the original ``Parameter`` objects are put back untouched, so the base weights are
        bit-exact afterwards (peft's ``unmerge`` subtracts and leaves rounding error, large in bfloat16). The
        merged tensors are kept between calls and recomputed only when a base or adapter weight changed (its
        version counter moved: optimizer steps, ``load_state_dict``), so repeated ``predict`` calls pay no
        merge. They cost the adapted weights' memory once more. The context does nothing in training mode,
        without LoRA, or when the adapters are merged already."""
        layers = []
        if self.config.lora_r > 0 and not self.training:
            from peft.tuners.lora import LoraLayer

            layers = [m for m in self.lm.modules() if isinstance(m, LoraLayer) and not m.merged]
        swapped = []
        try:
            for m in layers:
                base = m.get_base_layer()
                original = base.weight
                base.weight = self._merged_weight(m, original)  # nn.Module.__setattr__ registers it
                swapped.append((m, base, original))
                m.merged_adapters.extend(m.active_adapters)
            yield self
        finally:
            for m, base, original in swapped:
                base.weight = original
                m.merged_adapters.clear()

    def _merged_weight(self, layer, weight: nn.Parameter) -> nn.Parameter:
        """``W + sum of the active adapters' delta`` for one LoRA layer, from the cache when nothing changed."""
        adapters = list(layer.active_adapters)
        parts = [weight] + [t for a in adapters for t in (layer.lora_A[a].weight, layer.lora_B[a].weight)]
        key = tuple((t.data_ptr(), t._version) for t in parts) + tuple(float(layer.scaling[a]) for a in adapters)
        cache = self.__dict__.setdefault("_merged_cache", {})  # plain dict: not a buffer, never saved
        hit = cache.get(id(layer))
        if hit is not None and hit[0] == key:
            return hit[1]
        with torch.no_grad(), torch.inference_mode(False):  # a normal tensor, usable outside inference mode
            w = weight.detach().clone()
            for a in adapters:
                w += layer.get_delta_weight(a).to(w.dtype)
        merged = nn.Parameter(w, requires_grad=False)
        cache[id(layer)] = (key, merged)
        return merged

    # -- compute --------------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embeddings ``[B, L, H]`` of ``input_ids [B, L]``; new ids come from ``new_embed``."""
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.vocab_size):
            raise ValueError(f"input_ids must lie in [0, {self.vocab_size}), got "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]")
        row = self.new_index[input_ids]  # [B, L]
        is_new = row >= 0
        base_ids = torch.where(is_new | (input_ids >= self.n_base_rows), torch.zeros_like(input_ids), input_ids)
        emb = self.get_input_embeddings()(base_ids)
        new = self.new_embed(row.clamp_min(0)).to(emb.dtype)
        return torch.where(is_new.unsqueeze(-1), new, emb)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                cache: Any = None, use_cache: bool = False, position_ids: Optional[torch.Tensor] = None,
                logits_at: Optional[torch.Tensor] = None) -> LMOutput:
        """Run the decoder on ``inputs_embeds [B, L, H]``; ``cache`` continues a previous prefix.

        ``attention_mask [B, S]`` (S = cached + L) marks real tokens with 1 and padding with 0;
        ``position_ids [B, L]`` are the rotary positions of the new tokens (default: cache length + 0..L-1),
        needed when rows hold different numbers of real tokens before these. ``attention_mask`` may also be a
        4D additive mask ``[B, 1, L, S]`` (0 where allowed, a large negative where not), passed through as is.
        ``logits_at`` (inference) computes logits only at some positions: ``[B]`` (one per row) gives
        ``logits [B, 1, V]``, ``[B, K]`` gives ``[B, K, V]`` — the head over every prefix position is skipped;
        ``hidden`` always covers all ``L`` positions.
        """
        decoder = self.causal_lm.get_decoder()
        kwargs = {self._cache_kw: cache} if cache is not None else {}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        out = decoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=use_cache, **kwargs)
        hidden = out.last_hidden_state  # (B, L, H)
        h = hidden
        if logits_at is not None:
            idx = logits_at.to(hidden.device).long()
            idx = idx[:, None] if idx.dim() == 1 else idx  # (B, K)
            if idx.dim() != 2 or idx.shape[0] != hidden.shape[0]:
                raise ValueError(f"logits_at must be [B={hidden.shape[0]}] or [B, K], got {tuple(logits_at.shape)}")
            h = hidden.gather(1, idx[..., None].expand(-1, -1, hidden.shape[-1]))  # (B, K, H)
        head = self.causal_lm.get_output_embeddings()
        base_logits = head(h)  # (B, L', V_base)
        new_logits = self.new_head(h.to(self.new_head.weight.dtype)).to(base_logits.dtype)  # (B, L', n_new)
        b, l, _ = base_logits.shape
        logits = base_logits.new_full((b, l, self.vocab_size), float("-inf"))
        logits[..., : base_logits.shape[-1]] = base_logits
        logits[..., self.new_ids] = new_logits  # new ids overwrite padded base rows where they fall inside
        new_cache = getattr(out, "cache", None) if hasattr(out, "cache") else getattr(out, "past_key_values", None)
        return LMOutput(hidden, logits, new_cache if use_cache else None)


def _cache_kwarg(decoder: nn.Module) -> str:
    """``cache`` (transformers >= 5.2x) or ``past_key_values`` (earlier) — whichever the decoder takes."""
    params = inspect.signature(decoder.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def load_llm(path_or_config: Union[str, os.PathLike, LLMConfig, None] = None, **overrides) -> IdentifierLM:
    """An :class:`IdentifierLM` from a local model directory, an :class:`LLMConfig`, or ``None`` (tiny).

    ``overrides`` are :class:`LLMConfig` fields (a misspelled one raises ``TypeError``).
    """
    if isinstance(path_or_config, LLMConfig):
        config = path_or_config if not overrides else LLMConfig(**{**path_or_config.__dict__, **overrides})
    elif path_or_config is None:
        config = LLMConfig(**overrides)
    else:
        config = LLMConfig(path=str(path_or_config), **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        base, tokenizer, fingerprint = _load_base(config)
        return IdentifierLM(base, tokenizer, config, fingerprint)
