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
``slot_of_object``     [M] long, identifier of each object (-1 where left out)
``last_logits``        [V] logits after the last cached token
``obj_states``         [P, H] the LLM's states at the prefix's object tokens; ``obj_slots [P]`` their identifiers
=====================  ==========================================================================

Not available with a query-conditioned gate: the gate changes which objects enter the prefix per query.
"""

from __future__ import annotations

import copy

import torch

from scene3d.llm.prompt import build_query


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
            last = torch.tensor([x.shape[0] - 1], device=x.device)
            out = model.lm(x[None], use_cache=True, logits_at=last)  # logits of the last token only
        self.cache = out.cache
        # the LLM's states at the object tokens and their identifiers (the identifier pointer's keys)
        self.obj_states = out.hidden[0, prompt.placeholder_pos.to(x.device)]  # (P, H)
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
