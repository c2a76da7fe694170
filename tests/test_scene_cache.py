"""Scene cache: the prefix encoded once gives the same logits, answers and masks as re-encoding it."""

import pytest
import torch

from scene3d.heads.mask_decoder import MaskDecoderConfig
from scene3d.llm.loader import LLMConfig
from scene3d.llm.prompt import build_prompt
from scene3d.llm.tiny import TinyLLMConfig
from scene3d.models.cache import SceneCache
from scene3d.models.referring import ReferringConfig, ReferringSegmenter, synthetic_scene

TINY = TinyLLMConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = ReferringSegmenter(ReferringConfig(
        llm=LLMConfig(tiny=TINY, num_obj_tokens=32, lora_r=4),
        decoder=MaskDecoderConfig(dim=32, num_queries=2, num_layers=1, num_heads=4),
        obj_dim=8, point_dim=8, projector_hidden=32, max_new_tokens=6))
    with torch.no_grad():  # make LoRA active so the cached path runs through it too
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return m.eval()


@pytest.fixture(scope="module")
def scene():
    return synthetic_scene((20,), points_per_object=4, obj_dim=8, point_dim=8, seed=5)


def test_prefix_matches_prompt(model, scene):
    emb, slots = model.prefix_embeds(scene)
    p = build_prompt(model.tokenizer, model.vocab, 20, "the chair", [3], keep=torch.arange(20))
    full = model._embed_prompt(scene, 0, p, scene.tokens.feat)
    assert p.prefix_len == emb.shape[0]
    torch.testing.assert_close(full[: p.prefix_len], emb, atol=0, rtol=0)
    assert torch.equal(slots, p.slot_of_object)


@pytest.mark.parametrize("text,targets", [("the brown chair left of the desk", [3]), ("all the lamps", [1, 7, 19]),
                                          ("the piano", [])])
def test_cached_logits_equal_uncached(model, scene, text, targets):
    p = build_prompt(model.tokenizer, model.vocab, 20, text, targets)
    with torch.no_grad():
        full = model._embed_prompt(scene, 0, p, scene.tokens.feat)
        ref = model.lm(full[None])
        sc = SceneCache(model, scene)
        before = sc.cache.get_seq_length()
        out = model.lm(full[None, p.prefix_len:], cache=sc.fork(), use_cache=True)
    assert sc.prefix_len == p.prefix_len and sc.cache.get_seq_length() == before == p.prefix_len  # not mutated
    torch.testing.assert_close(out.logits, ref.logits[:, p.prefix_len:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.hidden, ref.hidden[:, p.prefix_len:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sc.last_logits, ref.logits[0, p.prefix_len - 1], atol=1e-5, rtol=1e-5)


def test_predict_cached_equals_uncached(model, scene):
    texts = ["the brown chair", "the table near the window", "two lamps", "the piano"]
    a = model.predict(scene, texts, use_cache=True)
    b = model.predict(scene, texts, use_cache=False)
    for x, y in zip(a, b):
        assert x.answer_ids == y.answer_ids and x.source == y.source
        torch.testing.assert_close(x.obj_scores, y.obj_scores, atol=1e-5, rtol=1e-5)
        assert torch.equal(x.point_mask, y.point_mask) and torch.equal(x.objects, y.objects)
        assert torch.equal(x.decoder_mask, y.decoder_mask)


def test_cache_needs_one_scene(model):
    two = synthetic_scene((3, 4), points_per_object=2, obj_dim=8, point_dim=8)
    with pytest.raises(ValueError, match="one scene"):
        SceneCache(model, two)
