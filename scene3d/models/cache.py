"""Scene cache: encode a scene's prefix (system prompt + object tokens) once, reuse it for every query.

The prefix of :func:`scene3d.llm.prompt.build_prompt` does not depend on the question (identifiers are the
identity at inference and pieces are tokenized separately), so its keys/values are computed once into a
transformers ``DynamicCache``. Each query works on a deep copy (:meth:`SceneCache.fork`) because decoding
appends to the cache in place; the stored prefix is never mutated. With no padding and positions continuing
from the prefix length, the cached path computes the same numbers as re-encoding the whole sequence
(``tests/test_scene_cache.py`` compares them).

Not available with a query-conditioned gate: the gate changes which objects enter the prefix per query.
"""

from __future__ import annotations

import copy

import torch


class SceneCache:
    """``prefix_len`` tokens of one scene in the LLM's KV cache, plus the identifier of each object."""

    def __init__(self, model, scene) -> None:
        if model.gate is not None:
            raise ValueError("the scene cache needs a query-independent prefix; the model has a gate")
        if scene.batch_size != 1:
            raise ValueError(f"SceneCache takes one scene, got {scene.batch_size}")
        with torch.no_grad():
            embeds, self.slot_of_object = model.prefix_embeds(scene)
            out = model.lm(embeds[None], use_cache=True)
        self.cache = out.cache
        self.prefix_len = int(embeds.shape[0])
        self.last_logits = out.logits[0, -1]

    def fork(self):
        """A private copy of the prefix cache for one query (the original stays untouched)."""
        return copy.deepcopy(self.cache)
