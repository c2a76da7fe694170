"""ReferringSegmenter: splicing, the shared scene prefix, labels, trainable parameters, losses, hard negatives,
prediction, checkpoints, and that the words reach the decoder only through the LLM."""

import dataclasses
import pytest
import torch

from scene3d.constants import IGNORE_INDEX
from scene3d.heads.mask_decoder import MaskDecoderConfig
from scene3d.llm.loader import LLMConfig
from scene3d.llm.tiny import TinyLLMConfig
from scene3d.engine.checkpoint import (MODEL_FILE, CheckpointError, load_checkpoint, load_model_weights,
                                      save_checkpoint, trainable_state_dict)
from scene3d.gating.adapter import GateSelection
from scene3d.models.generation import decoder_objects, reconcile
from scene3d.models.losses import name_loss, object_targets, rank_loss, similarity_loss
from scene3d.models.referring import QueryBatch, ReferringConfig, ReferringSegmenter
from scene3d.structures.scene_inputs import SceneInputs, synthetic_scene

TINY = TinyLLMConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2)


def _config(**kw):
    return ReferringConfig(llm=LLMConfig(tiny=TINY, num_obj_tokens=16, lora_r=4),
                           decoder=MaskDecoderConfig(dim=32, num_queries=2, num_layers=1, num_heads=4, relation_layers=1,
                                                     pair_hidden=8, rank_pairs=False),
                           obj_dim=8, point_dim=8, projector_hidden=32, **kw)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ReferringSegmenter(_config())


@pytest.fixture(scope="module")
def scene():
    return synthetic_scene((5, 7), points_per_object=6, obj_dim=8, point_dim=8, seed=1)


def _batch(scene, **kw):
    return QueryBatch(scene, ["the brown chair left of the desk", "the two tables"], [[20], [10, 30]],
                          seeds=[3, 4], **kw)


def test_splice_positions_and_ignored_labels(model, scene):
    for training in (False, True):
        model.train(training)
        inp = model.pack(_batch(scene))
        model.eval()
        assert inp.shared and inp.rows.tolist() == [0, 1]  # one question per scene: one row each
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
            assert (inp.labels[b, L:] == IGNORE_INDEX).all()
            assert (inp.attention_mask[b, 0, :L, L:] < -1e30).all()  # nothing attends to the padding
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
    assert all(n.startswith(("projector.", "decoder.", "pointer.", "lm.new_embed", "lm.new_head"))
               or n == "grounding_scale" or "lora_" in n for n in names)
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
    hw = model.config.hard_negative_weight
    gt_point, label, weight = object_targets(scene.tokens, [[10]], [[40]], cls, hw)
    assert label.tolist() == [1, 0, 0, 0]
    assert weight.tolist() == [1, 1, hw, hw]  # object 2: same class; object 3: Sr3D distractor
    assert torch.equal(gt_point.bool(), scene.tokens.point2obj == 0)
    with pytest.raises(ValueError, match="target object id 99"):
        object_targets(scene.tokens, [[99]], None, None, hw)


def test_loss_decreases_and_zero_targets(scene):
    torch.manual_seed(0)
    m = ReferringSegmenter(_config())
    batch = QueryBatch(scene, ["the brown chair", "the piano"], [[20, 40], []], seeds=[3, 4],
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
    r = reconcile(model, one, [v.obj_token_ids[2], v.obj_token_ids[5], v.seg_token_id], ident, dec)
    assert r.source == "identifiers" and r.objects.tolist() == [2, 5] and r.object_ids.tolist() == [30, 60]
    assert torch.equal(r.point_mask, (p2o == 2) | (p2o == 5)) and torch.equal(r.identifier_mask, r.point_mask)
    # none named -> decoder objects above threshold
    r = reconcile(model, one, [v.seg_token_id], ident, dec)
    assert r.source == "decoder" and r.objects.tolist() == [1, 3]
    assert torch.equal(r.point_mask, (p2o == 1) | (p2o == 3))
    # reconcile="decoder": the decoder's objects lead, the named identifiers are the fallback
    named = [v.obj_token_ids[2], v.seg_token_id]
    model.config = dataclasses.replace(model.config, reconcile="decoder")
    try:
        r = reconcile(model, one, named, ident, dec)
        assert r.source == "decoder" and r.objects.tolist() == [1, 3]
        assert torch.equal(r.identifier_mask, p2o == 2)  # the identifier path is still reported beside it
        dec.obj_logits = torch.full((7,), -5.0)
        r = reconcile(model, one, named, ident, dec)
        assert r.source == "identifiers" and r.objects.tolist() == [2]
    finally:
        model.config = dataclasses.replace(model.config, reconcile="identifiers")
    # none anywhere -> zero targets
    r = reconcile(model, one, [v.seg_token_id], ident, dec)
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
    assert decoder_objects(logits, None, 0.5).tolist() == [3]
    assert decoder_objects(logits, torch.tensor(0.0), 0.5).tolist() == [3]
    assert decoder_objects(logits, torch.tensor(2.5), 0.5).tolist() == []  # the null wins
    low = logits - 3.0  # nothing over the threshold: the best object still wins against a lower null
    assert decoder_objects(low, None, 0.5).tolist() == []
    assert decoder_objects(low, torch.tensor(-3.0), 0.5).tolist() == [3]
    assert decoder_objects(torch.zeros(0), torch.tensor(0.0), 0.5).tolist() == []
    dec = type("D", (), {})()
    dec.obj_logits, dec.null_logits = low, torch.tensor(1.0)
    dec.point_logits = torch.full((one.points.coord.shape[0],), -5.0)
    named = [v.obj_token_ids[2], v.seg_token_id]
    model.config = dataclasses.replace(model.config, reconcile="decoder")
    try:
        r = reconcile(model, one, named, torch.arange(7), dec)
        assert r.source == "none" and r.objects.numel() == 0 and not r.point_mask.any()
        dec.null_logits = torch.tensor(-3.0)
        r = reconcile(model, one, named, torch.arange(7), dec)
        assert r.source == "decoder" and r.objects.tolist() == [3] and torch.equal(r.point_mask, p2o == 3)
    finally:
        model.config = dataclasses.replace(model.config, reconcile="identifiers")
    # the identifiers lead by default: the named object, whatever the decoder decided
    r = reconcile(model, one, named, torch.arange(7), dec)
    assert r.source == "identifiers" and r.objects.tolist() == [2]


def test_rank_loss_only_on_single_target_samples():
    logits = torch.tensor([0.5, 2.0, -1.0, 0.3, 0.1, 0.0, 1.0])
    offset = torch.tensor([3, 5, 7])  # three samples: 3, 2 and 2 objects
    label = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0])  # one target, two targets, zero targets
    loss = rank_loss(logits, label, offset)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits[None, :3], torch.tensor([1])))
    zero = rank_loss(logits[3:], label[3:], torch.tensor([2, 4]))
    assert float(zero) == 0.0


def test_rank_loss_with_null_covers_every_sample():
    """With "no target" logits: zero targets -> cross-entropy to the null; one -> to the target; several ->
    -log of the softmax mass on the targets; all against the objects and the null together."""
    logits = torch.tensor([0.5, 2.0, -1.0, 0.3, 0.1, 0.0, 1.0], requires_grad=True)
    null = torch.tensor([0.2, -0.4, 0.7], requires_grad=True)
    offset = torch.tensor([3, 5, 7])
    label = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    loss = rank_loss(logits, label, offset, null)
    ce = torch.nn.functional.cross_entropy
    z1 = torch.cat([logits[:3], null[:1]])
    z2 = torch.cat([logits[3:5], null[1:2]])
    z3 = torch.cat([logits[5:], null[2:]])
    want = (ce(z1[None], torch.tensor([1])) - torch.log(z2.softmax(0)[:2].sum()) + ce(z3[None], torch.tensor([2]))) / 3
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert null.grad[2] < 0 and null.grad[0] > 0 and null.grad[1] > 0  # the null rises only where nothing is meant
    # a scene without objects: the null is the only choice, no loss
    torch.testing.assert_close(rank_loss(torch.zeros(0), torch.zeros(0), torch.tensor([0]),
                                                             torch.tensor([0.3])), torch.tensor(0.0))


def test_overflow_error_and_topk(model):
    big = synthetic_scene((20,), points_per_object=2, obj_dim=8, point_dim=8)
    with pytest.raises(ValueError, match="identifiers"):
        model.pack(QueryBatch(big, ["a chair"], [[10]]))
    # top-K keeps the objects with the most points: the 5 unassigned points go to objects 15..19
    t = big.tokens
    p2o = t.point2obj.clone()
    p2o[-5:] = torch.tensor([15, 16, 17, 18, 19])
    big2 = type(big)(t.replace(point2obj=p2o), big.point_feat, big.points)
    m2 = ReferringSegmenter(_config(overflow="topk"), lm=model.lm)
    inp = m2.pack(QueryBatch(big2, ["a chair"], [[10]]))
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
    inp = m.pack(_batch(scene))
    assert not inp.shared  # a query-conditioned gate: every question its own prefix
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


@pytest.mark.parametrize("object_states", [False, True])
def test_take_spreads_scenes_and_shared_decoding_equals_expanded(object_states):
    """Several questions on one scene: ``take`` builds the per-sample layout from shared rows (gradients flow
    back into them), and reading each scene's prefix once and decoding each scene once for all its questions
    gives the same losses as the expanded batch, sample by sample (also when the decoder reads the LLM's
    states at the object tokens: ``decoder.object_states``)."""
    torch.manual_seed(0)
    cfg = _config(shuffle_identifiers=False)  # a shared prefix shuffles once per scene
    m = ReferringSegmenter(dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder,
                                                                                object_states=object_states)))
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
        expanded = m(QueryBatch(taken, texts, targets, **kw))
    with torch.random.fork_rng():
        grouped = m(QueryBatch(taken, texts, targets, shared=shared, scene_index=index, **kw))
    for x, y in zip(expanded, grouped):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    grouped.total.backward()
    assert feat.grad[:5].abs().sum() > 0 and feat.grad[5:].abs().sum() > 0
    with pytest.raises(ValueError, match="together"):
        QueryBatch(taken, texts, targets, scene_index=index)
    with pytest.raises(ValueError, match="out of range"):
        shared.take([0, 2])


def test_anchor_loss_on_rows_that_name_anchors(model, scene):
    """Rows that name anchors add ``anchor_weight`` x losses.anchor_loss to the total, and it trains the relation
    layers; rows that name none add nothing; an anchor id the scene lacks is an error naming it."""
    model.eval()  # no dropout: the two forwards differ only by the anchors
    model.zero_grad(set_to_none=True)
    with_anchor = model(_batch(scene, anchors=[[40], []]))
    without = model(_batch(scene, anchors=[[], []]))
    assert float(without.anchor) == 0.0 and float(with_anchor.anchor) > 0.0
    assert float(with_anchor.total - without.total) == pytest.approx(
        model.config.anchor_weight * float(with_anchor.anchor), rel=1e-4)
    with_anchor.anchor.backward()
    assert model.decoder.grounding.relation[0].qkv.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="anchor object id 99"):
        model(_batch(scene, anchors=[[99], []]))
    off = ReferringSegmenter(_config(anchor_weight=0.0))
    off.eval()
    assert float(off(_batch(scene, anchors=[[40], []])).anchor) == 0.0


def _descend(params, loss_fn, steps: int) -> tuple[float, float]:
    """Adam (lr 1e-2) on ``loss_fn()`` for ``steps`` steps: (first loss, last loss)."""
    opt = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses[0], losses[-1]


def test_similarity_loss_trains_the_decoder_to_tell_classes_apart():
    """With ``rank_pairs`` the decoder's object similarity is trained on "same class" pairs where classes are
    known; a few steps on that loss alone separate the classes (objects of one class share a feature direction)."""
    torch.manual_seed(0)
    m = ReferringSegmenter(dataclasses.replace(_config(), decoder=MaskDecoderConfig(
        dim=32, num_queries=2, num_layers=1, num_heads=4, relation_layers=1, pair_hidden=8, rank_pairs=True)))
    sc = synthetic_scene((6, 5), points_per_object=4, obj_dim=8, point_dim=8, seed=2)
    cls = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 1, 1, 2])
    proto = torch.randn(3, 8)
    sc = SceneInputs(sc.tokens.replace(feat=proto[cls] + 0.1 * torch.randn(11, 8)), sc.point_feat, sc.points)
    batch = QueryBatch(sc, ["the chair", "the lamp"], [[10], []], object_class=cls)
    g = m.decoder.grounding
    assert float(similarity_loss(g, sc.tokens, None)) == 0.0  # no classes: no loss
    first, last = _descend(m.decoder.parameters(), lambda: similarity_loss(g, sc.tokens, cls), 30)
    assert last < 0.3 * first
    with torch.no_grad():
        p = torch.sigmoid(g.similarity_logits(g.obj_proj(sc.tokens.feat[:6])))
    same = cls[:6, None] == cls[None, :6]
    assert p[same].min() > p[~same].max()
    assert torch.isfinite(m(batch).obj_sim)


def test_name_loss_pulls_object_tokens_to_their_class_names():
    """The object-name alignment loss trains the projector so that each object's LLM input embedding is
    nearest the LLM's embedding of its class name; objects without a name are left out; the batch's total
    counts it only with ``name_weight`` > 0 and names given."""
    torch.manual_seed(0)
    m = ReferringSegmenter(_config())
    sc = synthetic_scene((6, 5), points_per_object=4, obj_dim=8, point_dim=8, seed=2)
    cls = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 1, 1, 2])
    sc = SceneInputs(sc.tokens.replace(feat=torch.randn(3, 8)[cls] + 0.1 * torch.randn(11, 8)), sc.point_feat,
                     sc.points)
    vocab = ["chair", "table", "lamp"]
    names = [vocab[int(c)] for c in cls]
    names[7] = None  # unknown: not scored
    t = sc.tokens
    x = torch.cat([t.feat, t.center, t.size], 1)
    scale = torch.tensor(10.0)
    with pytest.raises(ValueError, match="names has 3 entries for 11 objects"):
        name_loss(m.projector(x), names[:3], m.name_embeddings, scale)
    assert float(name_loss(m.projector(x), ["chair"] * 11, m.name_embeddings, scale)) == 0.0  # one name only
    first, last = _descend(m.projector.parameters(), lambda: name_loss(m.projector(x), names, m.name_embeddings,
                                                                       scale), 40)
    assert last < 0.3 * first
    with torch.no_grad():
        words = torch.nn.functional.normalize(m.name_embeddings(vocab), dim=-1)
        nearest = (torch.nn.functional.normalize(m.projector(x).float(), dim=-1) @ words.T).argmax(1)
    assert torch.equal(nearest, cls)  # the unnamed object 7 too: its features are its class's
    m.config = dataclasses.replace(m.config, name_weight=0.5)
    m.eval()
    with torch.no_grad():
        on = m(QueryBatch(sc, ["the chair", "the lamp"], [[10], []], object_names=names))
        off = m(QueryBatch(sc, ["the chair", "the lamp"], [[10], []]))
        m.config = dataclasses.replace(m.config, name_weight=0.0)
        default = m(QueryBatch(sc, ["the chair", "the lamp"], [[10], []], object_names=names))
    assert float(on.obj_name) > 0 and float(off.obj_name) == 0.0 and float(default.obj_name) == 0.0
    assert torch.allclose(on.total - off.total, 0.5 * on.obj_name, atol=1e-5)
    assert torch.allclose(default.total, off.total)
    with pytest.raises(ValueError, match="object_names has 2 entries for 11 objects"):
        QueryBatch(sc, ["the chair", "the lamp"], [[10], []], object_names=names[:2])


def test_lm_loss_on_answer_positions_equals_the_full_shifted_loss(scene):
    """forward computes logits only where a label follows; the loss is the shifted cross-entropy over all
    positions (identifier pointer included; the grounding bias per answer position is tested apart, in
    test_shared_scene_prefix_equals_one_row_per_question and test_identifier_grounding_moves_the_answer_...)."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = ReferringSegmenter(_config(identifier_grounding=False)).eval()
    batch = _batch(scene)
    with torch.no_grad():
        got = model(batch).lm
        inp = model.pack(batch)
        out = model.lm(inp.inputs_embeds, attention_mask=inp.attention_mask, position_ids=inp.position_ids)
        r = torch.arange(out.hidden.shape[0])[:, None]
        full = model.answer_logits(out.logits, out.hidden, out.hidden[r, inp.obj_cols], inp.obj_slots)
        ref = F.cross_entropy(full[:, :-1].flatten(0, 1).float(), inp.labels[:, 1:].flatten(),
                              ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_training_and_predict_cut_a_300_token_text_the_same_way(scene):
    """Texts past prompt.max_text_tokens are cut (warned), not an error, in training and in predict, and the
    decoder's words are the same cut as the prompt's."""
    from scene3d.llm.prompt import TextTruncatedWarning, build_query

    torch.manual_seed(0)
    m = ReferringSegmenter(_config())
    long = "the brown chair left of the desk and near the window , " * 30
    cap = m.config.prompt.max_text_tokens
    assert len(m.text_tokenizer(long, add_special_tokens=False)["input_ids"]) >= 300
    with pytest.warns(TextTruncatedWarning):
        q = build_query(m.text_tokenizer, long, m.config.prompt)
    head = len(m.text_tokenizer(m.config.prompt.question_prefix, add_special_tokens=False)["input_ids"])
    tail = len(m.text_tokenizer(m.config.prompt.answer_prefix, add_special_tokens=False)["input_ids"])
    assert q.numel() == head + cap + tail + 1  # + the [SEG] that ends the prompt (sentence_state="question")
    assert int(q[-1]) == m.vocab.seg_token_id
    m.train()
    with pytest.warns(TextTruncatedWarning):
        batch = QueryBatch(scene, [long, "the two tables"], [[20], [10, 30]], seeds=[3, 4])
        loss = m(batch).total
    assert torch.isfinite(loss)
    m.eval()
    with pytest.warns(TextTruncatedWarning):
        assert int(m.pack(batch).word_mask[0].sum()) == cap  # the decoder reads the words the prompt kept
    with pytest.warns(TextTruncatedWarning):
        assert len(m.predict(scene.scene(0), [long])) == 1


@pytest.mark.parametrize("grounding", [False, True])
def test_shared_scene_prefix_equals_one_row_per_question(monkeypatch, grounding):
    """Training packs a scene's questions behind one encoding of its prefix (4D mask, positions continuing
    from the prefix): every loss and every gradient equals encoding each question with its own copy of the
    prefix, in fp32, and the gradients of all questions reach the shared object tokens. With
    ``identifier_grounding`` every answer position of a packed row gets its own question's object logits."""
    torch.manual_seed(0)
    m = ReferringSegmenter(_config(shuffle_identifiers=False, identifier_grounding=grounding))
    m.train()
    shared = synthetic_scene((5, 7), points_per_object=6, obj_dim=8, point_dim=8, seed=1)
    index = [1, 0, 1, 1]
    texts = ["the table", "the chair", "the lamp left of the desk", "all the chairs"]
    targets = [[20], [10], [], [10, 30]]

    def run():
        feat = shared.tokens.feat.clone().requires_grad_(True)
        sh = SceneInputs(shared.tokens.replace(feat=feat), shared.point_feat, shared.points)
        batch = QueryBatch(sh.take(index), texts, targets, shared=sh, scene_index=index)
        seq = m.pack(batch)
        m.zero_grad(set_to_none=True)
        loss = m(batch)
        loss.total.backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        return seq, loss, feat.grad.clone(), grads

    seq, packed, feat_grad, grads = run()
    assert seq.shared and seq.inputs_embeds.shape[0] == 2  # two scenes: two rows
    assert seq.rows.tolist() == [0, 1, 0, 0]
    monkeypatch.setattr(m, "shares_prefix", lambda: False)
    seq1, rows, feat_grad1, grads1 = run()
    assert not seq1.shared and seq1.inputs_embeds.shape[0] == 4
    for x, y in zip(packed, rows):
        torch.testing.assert_close(x, y, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(feat_grad, feat_grad1, atol=2e-5, rtol=1e-4)
    assert feat_grad[:5].abs().sum() > 0 and feat_grad[5:].abs().sum() > 0
    assert grads.keys() == grads1.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], grads1[n], atol=2e-5, rtol=1e-4, msg=n)
    if grounding:  # the LM loss trains the scale of the grounding logits in the answer
        assert grads["grounding_scale"].abs() > 0


def test_identifier_grounding_moves_the_answer_with_the_grounding_head(scene):
    """With ``identifier_grounding`` the identifier logits add the grounding head's object logits: raising one
    object's logit (the score layer's bias, for every object) by a constant changes no LM-head logit and moves
    every identifier logit by that constant times the learned scale; without it nothing moves. A config that
    cannot run the decoder before the answer is refused."""
    with pytest.raises(ValueError, match="identifier_grounding needs"):
        _config(identifier_grounding=True, sentence_state="seg")
    torch.manual_seed(0)
    m = ReferringSegmenter(_config(shuffle_identifiers=False, identifier_grounding=True)).eval()
    with torch.no_grad():
        m.grounding_scale.fill_(0.7)
    captured = []
    orig = m.answer_logits
    m.answer_logits = lambda *a: captured.append(orig(*a)) or captured[-1]
    batch = _batch(scene)
    with torch.no_grad():
        m(batch)
        before = captured[-1].clone()
        m.decoder.grounding.score[-1].bias.add_(2.0)
        m(batch)
        after = captured[-1]
        m.decoder.grounding.score[-1].bias.sub_(2.0)
    ident = m.identifier_ids
    finite = torch.isfinite(before[..., ident])
    assert finite.any()
    diff = (after[..., ident] - before[..., ident])[finite]
    torch.testing.assert_close(diff, torch.full_like(diff, 1.4), atol=1e-4, rtol=0)
    other = torch.ones(before.shape[-1], dtype=torch.bool)
    other[ident] = False
    torch.testing.assert_close(after[..., other], before[..., other])


def test_words_reach_the_decoder_only_through_the_llm(scene):
    """The decoder reads the LLM's states at the question's tokens and at [SEG]: changing the LLM's last
    transformer layer changes the decoder's object and null scores (it did not when the decoder read the words
    through its own encoder over input embeddings). In the ablation (``decoder_states="embeddings"``) the same
    change leaves the decoder untouched, and the words it reads are the input embeddings of the question's own
    tokens. There is no side text encoder."""
    from scene3d.llm.prompt import text_token_ids

    torch.manual_seed(0)
    m = ReferringSegmenter(_config(shuffle_identifiers=False))
    assert not any("text_encoder" in n or "text_proj" in n for n, _ in m.named_parameters())
    m.eval()
    one = scene.scene(1)
    texts = ["the table", "the brown chair left of the desk"]

    def scores(model):
        return torch.stack([p.obj_scores for p in model.predict(one, texts)])

    layer = m.lm.causal_lm.get_decoder().layers[-1].mlp.down_proj
    weight = layer.base_layer.weight if hasattr(layer, "base_layer") else layer.weight
    before = scores(m)
    with torch.no_grad():
        saved = weight.clone()
        weight.add_(torch.randn_like(weight) * 0.5)
    try:
        assert not torch.allclose(before, scores(m), atol=1e-4)
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    abl = ReferringSegmenter(_config(shuffle_identifiers=False, decoder_states="embeddings"), lm=m.lm)
    abl.eval()
    a0 = scores(abl)
    with torch.no_grad():
        weight.add_(torch.randn_like(weight) * 0.5)
    try:
        torch.testing.assert_close(a0, scores(abl))
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    batch = QueryBatch(scene, texts, [[20], [10, 30]])
    seq = abl.pack(batch)
    words, _ = abl.decoder_inputs(seq.inputs_embeds, seq)
    for b, t in enumerate(texts):
        ids = torch.tensor(text_token_ids(abl.text_tokenizer, t, 128).ids)
        n = ids.numel()
        assert int(seq.word_mask[b].sum()) == n
        torch.testing.assert_close(words[b, :n], abl.lm.embed(ids[None])[0])


def test_identifier_pointer_rule():
    """Identifiers of the prompt get the LM logit plus the pointer score of the answer state against the state
    at their object token; identifiers with no object in the prompt get -inf; every other token is unchanged."""
    from scene3d.models.pointer import IdentifierPointer, point

    torch.manual_seed(0)
    ptr = IdentifierPointer(8, dim=4)
    ids = torch.tensor([10, 11, 12, 13])  # identifier tokens 0..3 in a vocabulary of 16
    logits = torch.randn(2, 3, 16)
    hidden, states = torch.randn(2, 3, 8), torch.randn(2, 2, 8)
    slots = torch.tensor([[2, 0], [3, -1]])  # row 1 has one object (identifier 3) and a padded entry
    out = point(ptr, ids, logits, hidden, states, slots)
    score = ptr(hidden, states)
    torch.testing.assert_close(out[..., :10], logits[..., :10])
    torch.testing.assert_close(out[..., 14:], logits[..., 14:])
    torch.testing.assert_close(out[0, :, 12], logits[0, :, 12] + score[0, :, 0])
    torch.testing.assert_close(out[0, :, 10], logits[0, :, 10] + score[0, :, 1])
    torch.testing.assert_close(out[1, :, 13], logits[1, :, 13] + score[1, :, 0])
    assert torch.isinf(out[0, :, [11, 13]]).all() and torch.isinf(out[1, :, [10, 11, 12]]).all()
    flat = point(ptr, ids, logits[:, 0], hidden[:, 0], states, slots)  # one position per row
    torch.testing.assert_close(flat, out[:, 0])


def test_object_names_in_the_prompt(scene):
    """``object_labels``: the prompt writes each object's name (training, the scene cache and whole prompts
    alike), a scene without names is refused with a message naming the fix, ``take`` / ``scene`` carry the
    names, and training swaps names at rate ``label_noise`` (never for the same name), evaluation never."""
    torch.manual_seed(0)
    m = ReferringSegmenter(_config(object_labels=True, label_noise=0.4)).eval()
    names = ["chair", "table", "desk", "lamp", "sofa", "bed", "chair", "door", "table", "sink", "towel", "desk"]
    named = dataclasses.replace(scene, object_names=names)
    one = named.scene(1)
    assert one.object_names == names[5:] and named.take([1, 0]).object_names == names[5:] + names[:5]
    with pytest.raises(ValueError, match="object_names has 3 entries for 12 objects"):
        dataclasses.replace(scene, object_names=names[:3])
    with pytest.raises(ValueError, match="no object names: give a label model"):
        m.predict(scene.scene(1), ["the table"])
    tok = m.text_tokenizer
    _, _, prompt = m.prefix_embeds(one)
    ids = prompt.input_ids.tolist()
    for pos, obj in zip(prompt.placeholder_pos.tolist(), prompt.placeholder_obj.tolist()):
        want = tok(" " + one.object_names[obj], add_special_tokens=False)["input_ids"]
        assert ids[pos - len(want) : pos] == want
    # the cached prefix and whole prompts read the same names: the same answers and scores
    cached = m.predict(one, ["the table", "a chair"], use_cache=True)
    whole = m.predict(one, ["the table", "a chair"], use_cache=False)
    for a, b in zip(cached, whole):
        assert a.answer_ids == b.answer_ids
        torch.testing.assert_close(a.obj_scores, b.obj_scores, atol=1e-4, rtol=1e-4)
    # other names, other object states: the names reach the LLM
    other = dataclasses.replace(one, object_names=["bed"] * 7)
    assert not torch.allclose(m.predict(other, ["the table"])[0].obj_scores, cached[0].obj_scores)
    # noise: training only, at about label_noise, always to another name of the batch
    assert m.prompt_names(named, 1, noise=False) == names[5:]
    swapped = total = 0
    for _ in range(200):
        got = m.prompt_names(named, 0, noise=True)
        assert all(g in set(names) for g in got)
        swapped += sum(g != n for g, n in zip(got, names[:5]))
        total += 5
    assert 0.3 < swapped / total < 0.5
    m.train()
    seq = m.pack(_batch(named))
    m.eval()
    assert len(seq.prompts) == 2 and torch.isfinite(m(_batch(named)).total)


def test_decoder_reads_the_llm_states_at_the_object_tokens(scene):
    """``decoder.object_states``: the grounding head's objects get the LLM's state at each object token (zero
    for objects left out of the prompt); the scene cache and whole prompts give the decoder the same states;
    the decoder's object scores then move with the object names in the prompt; its losses train ``state_in``
    and the LLM's adapters."""
    torch.manual_seed(0)
    cfg = _config(object_labels=True)
    m = ReferringSegmenter(dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, object_states=True)))
    names = ["chair", "table", "desk", "lamp", "sofa", "bed", "chair", "door", "table", "sink", "towel", "desk"]
    named = dataclasses.replace(scene, object_names=names)
    m.eval()
    one = named.scene(1)
    cached = m.predict(one, ["the table", "a chair"], use_cache=True)
    whole = m.predict(one, ["the table", "a chair"], use_cache=False)
    for a, b in zip(cached, whole):
        torch.testing.assert_close(a.obj_scores, b.obj_scores, atol=1e-4, rtol=1e-4)
    keys = type("K", (), {})()
    keys.states = torch.arange(6.0).view(1, 3, 2)
    keys.slots = torch.tensor([[4, 0, -1]])
    st = m.object_states_of(keys, torch.tensor([0, -1, 4]))  # object 1 is left out of the prompt
    assert st.tolist() == [[2.0, 3.0], [0.0, 0.0], [0.0, 1.0]]
    m.train()
    loss = m(_batch(named))
    (loss.mask_bce + loss.obj).backward()
    assert m.decoder.grounding.state_in[1].weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in m.lm.named_parameters() if "lora" in n)
    with pytest.raises(ValueError, match="object_states reads the LLM's states"):
        dataclasses.replace(cfg, decoder_states="embeddings",
                            decoder=dataclasses.replace(cfg.decoder, object_states=True))
