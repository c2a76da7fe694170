"""ReferringSegmenter: splicing, labels, trainable parameters, losses, hard negatives, prediction, checkpoints."""

import dataclasses
import pytest
import torch

from scene3d.constants import IGNORE_INDEX
from scene3d.heads.mask_decoder import MaskDecoderConfig
from scene3d.llm.loader import LLMConfig
from scene3d.llm.tiny import TinyLLMConfig
from scene3d.engine.checkpoint import (MODEL_FILE, CheckpointError, load_checkpoint, load_model_weights,
                                      save_checkpoint, trainable_state_dict)
from scene3d.models.referring import (GateSelection, ReferringBatch, ReferringConfig, ReferringSegmenter,
                                      SceneInputs, synthetic_scene)

TINY = TinyLLMConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2)


def _config(**kw):
    return ReferringConfig(llm=LLMConfig(tiny=TINY, num_obj_tokens=16, lora_r=4),
                           decoder=MaskDecoderConfig(dim=32, num_queries=2, num_layers=1, num_heads=4),
                           obj_dim=8, point_dim=8, projector_hidden=32, **kw)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ReferringSegmenter(_config())


@pytest.fixture(scope="module")
def scene():
    return synthetic_scene((5, 7), points_per_object=6, obj_dim=8, point_dim=8, seed=1)


def _batch(scene, **kw):
    return ReferringBatch(scene, ["the brown chair left of the desk", "the two tables"], [[20], [10, 30]],
                          seeds=[3, 4], **kw)


def test_splice_positions_and_ignored_labels(model, scene):
    for training in (False, True):
        model.train(training)
        inp = model.build_inputs(_batch(scene))
        model.eval()
        base = model.lm.get_input_embeddings().weight
        t = scene.tokens
        for b, p in enumerate(inp.prompts):
            o0 = [0, 5][b]
            L = p.input_ids.numel()
            ph = set(p.placeholder_pos.tolist())
            for i in range(L):
                tid = int(p.input_ids[i])
                if i in ph:
                    continue
                if tid < model.lm.n_base_rows and int(model.lm.new_index[tid]) < 0:
                    assert torch.equal(inp.inputs_embeds[b, i], base[tid])
            for pos, obj in zip(p.placeholder_pos.tolist(), p.placeholder_obj.tolist()):
                r = o0 + obj
                ref = model.projector(torch.cat([t.feat[r], t.center[r], t.size[r]]))
                torch.testing.assert_close(inp.inputs_embeds[b, pos], ref)
                # the identifier before the placeholder is the object's identifier
                k = model.vocab.obj_token_ids.index(int(p.input_ids[pos - 1]))
                assert k == int(p.slot_of_object[obj])
            assert (inp.labels[b, : p.answer_start] == IGNORE_INDEX).all()
            assert (inp.labels[b, L:] == IGNORE_INDEX).all() and (inp.attention_mask[b, L:] == 0).all()
            assert torch.equal(inp.labels[b, p.answer_start : L], p.input_ids[p.answer_start:])
            assert int(p.input_ids[p.seg_pos]) == model.vocab.seg_token_id == int(inp.labels[b, L - 1])
        slots = [p.slot_of_object for p in inp.prompts]
        if training:
            assert not torch.equal(slots[1], torch.arange(7))  # shuffled
        else:
            assert torch.equal(slots[0], torch.arange(5)) and torch.equal(slots[1], torch.arange(7))


def test_gradients_only_to_trainable(model, scene):
    model.train()
    model.zero_grad(set_to_none=True)
    model(_batch(scene)).total.backward()
    model.eval()
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith(("projector.", "decoder.", "text_proj.", "lm.new_embed", "lm.new_head")) or "lora_" in n
               for n in names)
    assert any(n.startswith("projector.") for n in names) and any(n.startswith("decoder.") for n in names)
    for n, p in model.named_parameters():
        if p.requires_grad and "lora_A" not in n:  # lora_A gets no grad while lora_B is still zero
            assert p.grad is not None, n
        if not p.requires_grad:
            assert p.grad is None, n
    assert model.projector[0].weight.grad.abs().sum() > 0  # the LM loss reaches the spliced features
    model.zero_grad(set_to_none=True)


def test_hard_negative_weights(model):
    scene = synthetic_scene((4,), points_per_object=3, obj_dim=8, point_dim=8)
    cls = torch.tensor([1, 2, 1, 3])
    batch = ReferringBatch(scene, ["the chair"], [[10]], distractors=[[40]], object_class=cls)
    gt_point, label, weight = model._targets(batch)
    assert label.tolist() == [1, 0, 0, 0]
    hw = model.config.hard_negative_weight
    assert weight.tolist() == [1, 1, hw, hw]  # object 2: same class; object 3: Sr3D distractor
    assert torch.equal(gt_point.bool(), scene.tokens.point2obj == 0)
    with pytest.raises(ValueError, match="target object id 99"):
        model._targets(ReferringBatch(scene, ["the chair"], [[99]]))


def test_loss_decreases_and_zero_targets(scene):
    torch.manual_seed(0)
    m = ReferringSegmenter(_config())
    batch = ReferringBatch(scene, ["the brown chair", "the piano"], [[20, 40], []], seeds=[3, 4],
                           distractors=[[30], []])
    m.train()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(10):
        loss = m(batch)
        assert all(torch.isfinite(x) for x in loss)
        opt.zero_grad()
        loss.total.backward()
        opt.step()
        losses.append(loss)
    assert losses[-1].total < 0.6 * losses[0].total
    assert losses[-1].lm < losses[0].lm and losses[-1].obj < losses[0].obj


def test_predict_and_reconcile(model, scene):
    model.eval()
    one = scene.scene(1)
    preds = model.predict(one, ["the table", "a chair"])
    assert len(preds) == 2
    for p in preds:
        assert p.point_mask.shape == (one.points.coord.shape[0],) and p.obj_scores.shape == (7,)
        assert p.answer_ids[-1] == model.vocab.seg_token_id
    v = model.vocab
    dec = type("D", (), {})()
    dec.obj_logits = torch.tensor([-5.0, 5.0, -5.0, 5.0, -5.0, -5.0, -5.0])
    dec.point_logits = torch.full((one.points.coord.shape[0],), -5.0)
    dec.null_logits = None
    ident = torch.arange(7)
    p2o = one.tokens.point2obj
    # identifiers named -> those objects, exact instance points
    r = model._reconcile(one, [v.obj_token_ids[2], v.obj_token_ids[5], v.seg_token_id], ident, dec)
    assert r.source == "identifiers" and r.objects.tolist() == [2, 5] and r.object_ids.tolist() == [30, 60]
    assert torch.equal(r.point_mask, (p2o == 2) | (p2o == 5)) and torch.equal(r.identifier_mask, r.point_mask)
    # none named -> decoder objects above threshold
    r = model._reconcile(one, [v.seg_token_id], ident, dec)
    assert r.source == "decoder" and r.objects.tolist() == [1, 3]
    assert torch.equal(r.point_mask, (p2o == 1) | (p2o == 3))
    # reconcile="decoder": the decoder's objects lead, the named identifiers are the fallback
    named = [v.obj_token_ids[2], v.seg_token_id]
    model.config = dataclasses.replace(model.config, reconcile="decoder")
    try:
        r = model._reconcile(one, named, ident, dec)
        assert r.source == "decoder" and r.objects.tolist() == [1, 3]
        assert torch.equal(r.identifier_mask, p2o == 2)  # the identifier path is still reported beside it
        dec.obj_logits = torch.full((7,), -5.0)
        r = model._reconcile(one, named, ident, dec)
        assert r.source == "identifiers" and r.objects.tolist() == [2]
    finally:
        model.config = dataclasses.replace(model.config, reconcile="identifiers")
    # none anywhere -> zero targets
    r = model._reconcile(one, [v.seg_token_id], ident, dec)
    assert r.source == "none" and r.objects.numel() == 0 and not r.point_mask.any()
    with pytest.raises(ValueError, match="reconcile"):
        ReferringConfig(reconcile="both")


def test_null_logit_decides_none_or_the_best_object(model, scene):
    """With a "no target" logit the decoder picks nothing when the null beats every object, else its best
    object (even under the threshold) plus any object over the threshold; in ``reconcile="decoder"`` mode its
    "none" is final (no fallback to the named identifiers)."""
    one = scene.scene(1)
    v = model.vocab
    p2o = one.tokens.point2obj
    logits = torch.tensor([-3.0, -1.0, -4.0, 2.0, -5.0, -2.0, -6.0])  # sigmoid >= 0.5 only at object 3
    assert model.select_objects(logits).tolist() == [3]
    assert model.select_objects(logits, torch.tensor(0.0)).tolist() == [3]
    assert model.select_objects(logits, torch.tensor(2.5)).tolist() == []  # the null wins
    low = logits - 3.0  # nothing over the threshold: the best object still wins against a lower null
    assert model.select_objects(low).tolist() == []
    assert model.select_objects(low, torch.tensor(-3.0)).tolist() == [3]
    assert model.select_objects(torch.zeros(0), torch.tensor(0.0)).tolist() == []
    dec = type("D", (), {})()
    dec.obj_logits, dec.null_logits = low, torch.tensor(1.0)
    dec.point_logits = torch.full((one.points.coord.shape[0],), -5.0)
    named = [v.obj_token_ids[2], v.seg_token_id]
    model.config = dataclasses.replace(model.config, reconcile="decoder")
    try:
        r = model._reconcile(one, named, torch.arange(7), dec)
        assert r.source == "none" and r.objects.numel() == 0 and not r.point_mask.any()
        dec.null_logits = torch.tensor(-3.0)
        r = model._reconcile(one, named, torch.arange(7), dec)
        assert r.source == "decoder" and r.objects.tolist() == [3] and torch.equal(r.point_mask, p2o == 3)
    finally:
        model.config = dataclasses.replace(model.config, reconcile="identifiers")
    # the identifiers lead by default: the named object, whatever the decoder decided
    r = model._reconcile(one, named, torch.arange(7), dec)
    assert r.source == "identifiers" and r.objects.tolist() == [2]


def test_rank_loss_only_on_single_target_samples():
    logits = torch.tensor([0.5, 2.0, -1.0, 0.3, 0.1, 0.0, 1.0])
    offset = torch.tensor([3, 5, 7])  # three samples: 3, 2 and 2 objects
    label = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0])  # one target, two targets, zero targets
    loss = ReferringSegmenter._rank_loss(logits, label, offset)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits[None, :3], torch.tensor([1])))
    zero = ReferringSegmenter._rank_loss(logits[3:], label[3:], torch.tensor([2, 4]))
    assert float(zero) == 0.0


def test_rank_loss_with_null_covers_every_sample():
    """With "no target" logits: zero targets -> cross-entropy to the null; one -> to the target; several ->
    -log of the softmax mass on the targets; all against the objects and the null together."""
    logits = torch.tensor([0.5, 2.0, -1.0, 0.3, 0.1, 0.0, 1.0], requires_grad=True)
    null = torch.tensor([0.2, -0.4, 0.7], requires_grad=True)
    offset = torch.tensor([3, 5, 7])
    label = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    loss = ReferringSegmenter._rank_loss(logits, label, offset, null)
    ce = torch.nn.functional.cross_entropy
    z1 = torch.cat([logits[:3], null[:1]])
    z2 = torch.cat([logits[3:5], null[1:2]])
    z3 = torch.cat([logits[5:], null[2:]])
    want = (ce(z1[None], torch.tensor([1])) - torch.log(z2.softmax(0)[:2].sum()) + ce(z3[None], torch.tensor([2]))) / 3
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert null.grad[2] < 0 and null.grad[0] > 0 and null.grad[1] > 0  # the null rises only where nothing is meant
    # a scene without objects: the null is the only choice, no loss
    torch.testing.assert_close(ReferringSegmenter._rank_loss(torch.zeros(0), torch.zeros(0), torch.tensor([0]),
                                                             torch.tensor([0.3])), torch.tensor(0.0))


def test_overflow_error_and_topk(model):
    big = synthetic_scene((20,), points_per_object=2, obj_dim=8, point_dim=8)
    with pytest.raises(ValueError, match="identifiers"):
        model.build_inputs(ReferringBatch(big, ["a chair"], [[10]]))
    # top-K keeps the objects with the most points: the 5 unassigned points go to objects 15..19
    t = big.tokens
    p2o = t.point2obj.clone()
    p2o[-5:] = torch.tensor([15, 16, 17, 18, 19])
    big2 = type(big)(t.replace(point2obj=p2o), big.point_feat, big.points)
    m2 = ReferringSegmenter(_config(overflow="topk"), lm=model.lm)
    inp = m2.build_inputs(ReferringBatch(big2, ["a chair"], [[10]]))
    kept = (inp.prompts[0].slot_of_object >= 0).nonzero().flatten().tolist()
    assert kept == sorted(set(range(15, 20)) | set(range(11)))  # ties among the rest: lower index first


def test_pluggable_gate(model, scene):
    def gate(tokens, query):
        assert query.shape == (tokens.batch_size, model.lm.hidden_size)
        keep = torch.arange(0, tokens.num_objects, 2)
        return GateSelection(keep, tokens.feat[keep] * 0.5)

    m = ReferringSegmenter(_config(), gate=gate, lm=model.lm)
    m.projector.load_state_dict(model.projector.state_dict())
    m.eval()
    inp = m.build_inputs(_batch(scene))
    p0, p1 = inp.prompts
    assert p0.placeholder_obj.tolist() == [0, 2, 4] and p1.placeholder_obj.tolist() == [1, 3, 5]  # rows 6, 8, 10
    t = scene.tokens
    ref = m.projector(torch.cat([t.feat[6] * 0.5, t.center[6], t.size[6]]))
    torch.testing.assert_close(inp.inputs_embeds[1, p1.placeholder_pos[0]], ref)
    with pytest.raises(ValueError, match="gate"):
        from scene3d.models.cache import SceneCache
        SceneCache(m, scene.scene(0))


def test_checkpoint_round_trip(tmp_path, scene):
    torch.manual_seed(0)
    m = ReferringSegmenter(_config())
    m.train()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        m(_batch(scene)).total.backward()
        opt.step()
    m.eval()
    ck = save_checkpoint(tmp_path / "ck", 2, trainable_state_dict(m), config=m.config.to_dict())
    from safetensors import safe_open
    with safe_open(str(ck / MODEL_FILE), "pt") as f:
        keys = set(f.keys())
    assert any("lora_B" in k for k in keys) and "lm.new_embed.weight" in keys and "lm.new_head.weight" in keys
    assert not any(("embed_tokens" in k or "lm_head" in k) for k in keys)  # frozen base not stored
    torch.manual_seed(123)  # different init: everything must come from the checkpoint
    m2 = ReferringSegmenter(ReferringConfig.from_dict(load_checkpoint(ck).config))
    load_model_weights(m2, ck)
    m2.eval()
    with torch.no_grad():
        a, b = m(_batch(scene)), m2(_batch(scene))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=0, rtol=0)
    pa, pb = m.predict(scene.scene(0), ["the chair"])[0], m2.predict(scene.scene(0), ["the chair"])[0]
    assert pa.answer_ids == pb.answer_ids and torch.equal(pa.obj_scores, pb.obj_scores)
    # a corrupt weights file is a clear error
    (ck / MODEL_FILE).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_model_weights(m2, ck)


def test_take_spreads_scenes_and_shared_decoding_equals_expanded():
    """Several questions on one scene: ``take`` builds the per-sample layout from shared rows (gradients flow
    back into them), and decoding each scene once for all its questions gives the same losses as decoding
    the expanded batch sample by sample."""
    torch.manual_seed(0)
    m = ReferringSegmenter(dataclasses.replace(_config(), decoder=MaskDecoderConfig(
        dim=32, num_queries=2, num_layers=1, num_heads=4, relation_layers=1, pair_hidden=8, text_layers=1,
        null_object=True)))
    m.train()
    shared = synthetic_scene((5, 7), points_per_object=6, obj_dim=8, point_dim=8, seed=1)
    feat = shared.tokens.feat.clone().requires_grad_(True)
    shared = SceneInputs(shared.tokens.replace(feat=feat), shared.point_feat, shared.points)
    index = [1, 0, 1, 1]
    taken = shared.take(index)
    assert taken.tokens.obj_counts.tolist() == [7, 5, 7, 7]
    for b, i in enumerate(index):
        a, ref = taken.scene(b), shared.scene(i)
        assert torch.equal(a.tokens.feat, ref.tokens.feat) and torch.equal(a.tokens.point2obj, ref.tokens.point2obj)
        assert torch.equal(a.points.coord, ref.points.coord) and a.points.scene_ids == ref.points.scene_ids
    texts = ["the table", "the chair", "the lamp left of the desk", "all the chairs"]
    targets = [[20], [10], [], [10, 30]]
    kw = dict(seeds=[1, 2, 3, 4])
    with torch.random.fork_rng():
        expanded = m(ReferringBatch(taken, texts, targets, **kw))
    with torch.random.fork_rng():
        grouped = m(ReferringBatch(taken, texts, targets, shared=shared, scene_index=index, **kw))
    for x, y in zip(expanded, grouped):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    grouped.total.backward()
    assert feat.grad[:5].abs().sum() > 0 and feat.grad[5:].abs().sum() > 0
    with pytest.raises(ValueError, match="together"):
        ReferringBatch(taken, texts, targets, scene_index=index)
    with pytest.raises(ValueError, match="out of range"):
        shared.take([0, 2])


def test_similarity_loss_trains_the_decoder_to_tell_classes_apart():
    """With ``rank_pairs`` the decoder's object similarity is trained on "same class" pairs where classes are
    known; a few steps on that loss alone separate the classes (objects of one class share a feature direction)."""
    torch.manual_seed(0)
    m = ReferringSegmenter(dataclasses.replace(_config(), decoder=MaskDecoderConfig(
        dim=32, num_queries=2, num_layers=1, num_heads=4, relation_layers=1, pair_hidden=8, text_layers=1,
        rank_pairs=True)))
    sc = synthetic_scene((6, 5), points_per_object=4, obj_dim=8, point_dim=8, seed=2)
    cls = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 1, 1, 2])
    proto = torch.randn(3, 8)
    sc = SceneInputs(sc.tokens.replace(feat=proto[cls] + 0.1 * torch.randn(11, 8)), sc.point_feat, sc.points)
    batch = ReferringBatch(sc, ["the chair", "the lamp"], [[10], []], object_class=cls)
    assert float(m._similarity_loss(ReferringBatch(sc, ["a", "b"], [[10], []]))) == 0.0  # no classes: no loss
    opt = torch.optim.Adam(m.decoder.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss = m._similarity_loss(batch)
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < 0.3 * first
    with torch.no_grad():
        p = torch.sigmoid(m.decoder.similarity_logits(m.decoder.obj_proj(sc.tokens.feat[:6])))
    same = cls[:6, None] == cls[None, :6]
    assert p[same].min() > p[~same].max()
    assert torch.isfinite(m(batch).obj_sim)


def test_lm_loss_on_answer_positions_equals_the_full_shifted_loss(model, scene):
    """forward computes logits only where a label follows; the loss is the shifted cross-entropy over all."""
    import torch.nn.functional as F

    model.eval()
    batch = _batch(scene)
    with torch.no_grad():
        got = model(batch).lm
        inp = model.build_inputs(batch)
        full = model.lm(inp.inputs_embeds, attention_mask=inp.attention_mask).logits
        ref = F.cross_entropy(full[:, :-1].flatten(0, 1).float(), inp.labels[:, 1:].flatten(),
                              ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_training_and_predict_cut_a_300_token_text_the_same_way(scene):
    """Texts past prompt.max_text_tokens are cut (warned), not an error, in training and in predict, and the
    decoder's words are the same cut as the prompt's."""
    from scene3d.llm.prompt import TextTruncatedWarning, build_query

    torch.manual_seed(0)
    cfg = dataclasses.replace(_config(), decoder=MaskDecoderConfig(dim=32, num_queries=2, num_layers=1, num_heads=4,
                                                                   relation_layers=1, pair_hidden=8, text_layers=1))
    m = ReferringSegmenter(cfg)
    long = "the brown chair left of the desk and near the window , " * 30
    cap = m.config.prompt.max_text_tokens
    assert len(m.tokenizer(long, add_special_tokens=False)["input_ids"]) >= 300
    with pytest.warns(TextTruncatedWarning):
        q = build_query(m.tokenizer, long, m.config.prompt)
    head = len(m.tokenizer(m.config.prompt.question_prefix, add_special_tokens=False)["input_ids"])
    tail = len(m.tokenizer(m.config.prompt.answer_prefix, add_special_tokens=False)["input_ids"])
    assert q.numel() == head + cap + tail
    m.train()
    with pytest.warns(TextTruncatedWarning):
        loss = m(ReferringBatch(scene, [long, "the two tables"], [[20], [10, 30]], seeds=[3, 4])).total
    assert torch.isfinite(loss)
    m.eval()
    _, words, mask = m._decoder_query(torch.zeros(1, m.lm.hidden_size), [long])
    assert int(mask.sum()) == cap
    with pytest.warns(TextTruncatedWarning):
        assert len(m.predict(scene.scene(0), [long])) == 1
