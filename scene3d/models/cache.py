"""Scene cache: encode a scene's prefix (system prompt + object tokens) once, reuse it for every query.

Everything before a question's own words is the same for every question on a scene: the scene prefix of
:func:`scene3d.llm.prompt.build_prompt` (identifiers are the identity at inference and pieces are tokenized
separately) and the fixed question head (``PromptConfig.question_prefix``, e.g. "user : find all objects
referred by the description :"). Its keys/values are computed once into a transformers ``DynamicCache``.
Queries never write into it: :meth:`SceneCache.fork` gives a private one-row copy, :meth:`SceneCache.expand`
a private ``B``-row preallocated cache (``StaticCache``) holding the shared part in every row, so that ``B``
questions are answered as one batch — each question's remaining tokens right-padded behind the shared part,
padding masked out, rotary positions continuing from each row's own length. The cached path computes the
same numbers as re-encoding the whole sequence (``tests/test_scene_cache.py`` compares them).

=====================  ==========================================================================
``cache``              DynamicCache, batch 1, ``cached_len`` positions (scene prefix + question head)
``prefix_len``         int, tokens in the scene prefix (``ScenePrompt.prefix_len``)
``head_ids``           [Lh] long, ids of the question head cached behind the scene prefix
``cached_len``         int, ``prefix_len + Lh``
``system_len``         int, leading tokens taken from the model's system-turn cache (not computed here)
``slot_of_object``     [M] long, identifier of each object (-1 where left out)
``last_logits``        [V] logits after the last cached token
``obj_states``         [P, H] the LLM's states at the prefix's object tokens; ``obj_slots [P]`` their identifiers
=====================  ==========================================================================

Not available with a query-conditioned gate: the gate changes which objects enter the prefix per query.

The system turn (``PromptConfig.system``: the chat template's system message and the start of the user turn,
44 of SmolLM2's tokens) opens every prompt on every scene, gated or not. Its keys/values are computed once per
state of the LLM's weights (:func:`system_turn_cache`, as serving stacks cache a shared prompt head) and every
scene cache starts from a copy of them, so a scene's prefill runs over its own tokens only: identifiers, object
tokens, the end of the scene and the question head. The rest of the computation is unchanged (rotary positions
continue behind the system turn; ``tests/test_scene_cache.py`` compares against whole-sequence encoding).
"""

from __future__ import annotations

import copy
import weakref

import torch

from scene3d.llm.prompt import _tok, build_query


def _weights_key(lm, device, dtype) -> tuple:
    """What the system turn's keys/values depend on: every parameter of the LLM (identity and in-place version:
    an optimizer step or a LoRA merge changes one of them), the device, the dtype and inference mode."""
    return (str(device), str(dtype), torch.is_inference_mode_enabled(),
            tuple((weakref.ref(p), p._version) for p in lm.parameters()))


def _same_key(a: tuple, b: tuple) -> bool:
    if a[:3] != b[:3] or len(a[3]) != len(b[3]):
        return False
    return all(ra() is not None and ra() is rb() and va == vb for (ra, va), (rb, vb) in zip(a[3], b[3]))


def system_turn_cache(model, embeds: torch.Tensor):
    """A private copy of the LLM's keys/values over the system turn ``embeds [Ls, H]`` (the first ``Ls`` rows of
    every prefix), computed on the first call and again only when the weights changed (:func:`_weights_key`).
    Kept on the model as a plain attribute: never saved, never a buffer."""
    key = _weights_key(model.lm, embeds.device, embeds.dtype)
    held = model.__dict__.get("_system_turn_kv")  # (weights key, system-turn embeddings, their cache)
    # the key first: it also holds the device, where torch.equal across devices would raise
    if held is None or not _same_key(held[0], key) or not torch.equal(held[1], embeds):
        with torch.no_grad():
            out = model.lm(embeds[None], use_cache=True, logits_at=torch.tensor([embeds.shape[0] - 1]))
        held = (key, embeds.detach().clone(), out.cache)
        model.__dict__["_system_turn_kv"] = held
    return copy.deepcopy(held[2])


class SceneCache:
    """The shared start of every prompt on one scene in the LLM's KV cache, plus each object's identifier."""

    def __init__(self, model, scene) -> None:
        if model.gate is not None:
            raise ValueError("the scene cache needs a query-independent prefix; the model has a gate")
        if scene.batch_size != 1:
            raise ValueError(f"SceneCache takes one scene, got {scene.batch_size}")
        self._lm = model.lm
        self._text_tokenizer = model.text_tokenizer
        self._prompt_config = model.config.prompt
        q = model.config.prompt.question_prefix
        self.head_ids = torch.tensor(model.text_tokenizer(q, add_special_tokens=False)["input_ids"] if q else [],
                                     dtype=torch.long)
        with torch.no_grad():
            embeds, self.slot_of_object, prompt = model.prefix_embeds(scene)  # (Lp, H)
            head = model.lm.embed(self.head_ids.to(embeds.device)[None])[0]  # (Lh, H)
            x = torch.cat([embeds, head.to(embeds.dtype)])
            # the system turn opens every prefix (build_prefix): its keys/values come from the model's copy
            ls = len(_tok(model.text_tokenizer, model.config.prompt.system))
            ls = ls if ls < x.shape[0] else 0
            past = system_turn_cache(model, x[:ls]) if ls else None
            last = torch.tensor([x.shape[0] - 1 - ls], device=x.device)
            out = model.lm(x[None, ls:], cache=past, use_cache=True, logits_at=last)  # logits of the last token
        self.cache = out.cache
        self.system_len = ls
        # the LLM's states at the object tokens and their identifiers (the identifier pointer's keys)
        self.obj_states = out.hidden[0, prompt.placeholder_pos.to(x.device) - ls]  # (P, H)
        self.obj_slots = prompt.slot_of_object[prompt.placeholder_obj]  # (P,)
        self.prefix_len = int(embeds.shape[0])
        self.cached_len = int(x.shape[0])
        self.last_logits = out.logits[0, -1]

    def query_tail(self, text: str) -> torch.Tensor:
        """Ids of the question ``text`` that follow the cached head (:func:`build_query` minus the head)."""
        q = build_query(self._text_tokenizer, text, self._prompt_config)
        h = self.head_ids.numel()
        if not torch.equal(q[:h], self.head_ids):
            raise RuntimeError("build_query no longer starts with the tokenized question_prefix; the scene "
                               "cache cannot hold it")
        if q.numel() == h:
            raise ValueError(f"referring text {text!r} adds no tokens to the question head")
        return q[h:]

    def fork(self):
        """A private one-row copy of the cache (the original stays untouched)."""
        return copy.deepcopy(self.cache)

    def expand(self, batch: int, max_len: int):
        """A private ``batch``-row preallocated cache of ``max_len`` positions whose first ``cached_len`` hold
        the cached keys/values in every row (:meth:`IdentifierLM.new_cache`)."""
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        if max_len < self.cached_len:
            raise ValueError(f"max_len {max_len} is shorter than the cached {self.cached_len} positions")
        out = self._lm.new_cache(max_len)
        for i, layer in enumerate(self.cache.layers):
            k, v = layer.keys, layer.values  # (1, heads, cached_len, d)
            out.update(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1), i)
        return out
