"""Scene cache and batched inference: the cached prefix, the packed / row layouts and the batched greedy
decoding give the same logits, answers and masks as re-encoding whole sequences one question at a time.

The reference (:func:`_naive_predict`) shares nothing with the inference code but the prompt building and
the final reconciliation: no KV cache, no batching, no padding — every decoding step re-encodes the whole
sequence of one question.
"""

import copy
from collections import Counter

import pytest
import torch

from scene3d.heads.mask_decoder import MaskDecoderConfig
from scene3d.llm.loader import LLMConfig
from scene3d.llm.prompt import build_prompt, build_query
from scene3d.llm.tiny import TinyLLMConfig
from scene3d.models.cache import SceneCache
from scene3d.gating.adapter import GateSelection
from scene3d.models import generation
from scene3d.models.referring import ReferringConfig, ReferringSegmenter
from scene3d.models.sequence import query_layout
from scene3d.structures.scene_inputs import synthetic_scene

TINY = TinyLLMConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2)
TEXTS = ["the brown chair", "the table near the window", "two lamps", "the piano", "all the white cabinets",
         "the door"]


def _config(**kw):
    return ReferringConfig(llm=LLMConfig(tiny=TINY, num_obj_tokens=32, lora_r=4),
                           decoder=MaskDecoderConfig(dim=32, num_queries=2, num_layers=1, num_heads=4,
                                                             relation_layers=1, pair_hidden=8, rank_pairs=False),
                           obj_dim=8, point_dim=8, projector_hidden=32, max_new_tokens=5, **kw)


def _full_embeds(model, scene, text, kept=None, feat=None):
    """Prompt embeddings [L, H] of one question (prefix + question), as training builds them, its identifiers
    and the positions of the question's own text tokens."""
    p = build_prompt(model.text_tokenizer, model.vocab, scene.tokens.num_objects, text, None,
                     keep=model.keep_objects(scene, 0, kept), config=model.config.prompt)
    lay = query_layout(model.text_tokenizer, text, model.config.prompt)
    words = p.prefix_len + lay.word_start + torch.arange(lay.num_words)
    emb = model.embed_prompt(scene, 0, p, scene.tokens.feat if feat is None else feat)
    return emb, p.slot_of_object, words, (p.placeholder_pos, p.slot_of_object[p.placeholder_obj])


@torch.no_grad()
def _naive_answer(model, emb, objects, bias=None):
    """Greedy decoding with the whole sequence re-encoded at every step: (answer ids, [SEG] hidden [H]). The
    identifier pointer reads the states at the object tokens (``objects``: their positions and identifiers)."""
    v, eos, seg = model.vocab, model.text_tokenizer.eos_token_id, model.vocab.seg_token_id
    cols, slots = objects
    answer = []
    for step in range(model.config.max_new_tokens + 1):
        out = model.lm(emb[None])
        logits = model.answer_logits(out.logits[:, -1], out.hidden[:, -1], out.hidden[:, cols], slots[None],
                                     bias)[0]
        logits[v.placeholder_id] = float("-inf")
        logits[[i for i in v.obj_token_ids if i in answer]] = float("-inf")  # an identifier is named once
        t = int(logits.argmax())
        t = seg if t == eos or step == model.config.max_new_tokens else t
        answer.append(t)
        emb = torch.cat([emb, model.lm.embed(torch.tensor([[t]]))[0]])
        if t == seg:
            return answer, model.lm(emb[None]).hidden[0, -1]
    raise AssertionError("unreachable: the last step always feeds [SEG]")


@torch.no_grad()
def _naive_predict(model, scene, texts):
    out = []
    for text in texts:
        kept, feat = model.gate_objects(scene, [text])
        emb, slots, cols, objects = _full_embeds(model, scene, text, kept, feat)
        states = model.lm(emb[None]).hidden
        words = states[:, cols]  # (1, T, H): the LLM's states at the question's words

        def decode(h):
            return model.decoder(h[None], words, torch.ones(words.shape[:2], dtype=torch.bool), scene.point_feat,
                                 scene.points.coord, scene.points.offset, scene.tokens, scene.points.superpoint)

        if model.config.sentence_state == "question":  # the [SEG] that ends the prompt: before the answer
            dec = decode(states[0, -1])
            bias = model.identifier_bias([dec.obj_logits], [slots]) if model.grounding_scale is not None else None
            answer, _ = _naive_answer(model, emb, objects, bias)
        else:
            answer, h = _naive_answer(model, emb, objects)
            dec = decode(h)
        out.append(generation.reconcile(model, scene, answer, slots, dec))
    return out


@pytest.fixture(scope="module")
def scene():
    return synthetic_scene((20,), points_per_object=4, obj_dim=8, point_dim=8, seed=5)


@pytest.fixture(scope="module")
def model(scene):
    """LoRA made active (so every path runs through it) and strong enough that answers depend on the text;
    the [SEG] output row copies (x1.2) the head row of a token the model often generates, so some questions
    end early and others run to ``max_new_tokens`` — finished and unfinished rows share a batch."""
    torch.manual_seed(0)
    # without identifier_grounding (the default): test_identifier_grounding_equals_naive_reference adds it
    m = ReferringSegmenter(_config(identifier_grounding=False)).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        answers = [a.answer_ids for a in _naive_predict(m, scene, TEXTS)]
        # a word (not an identifier, whose logit the pointer also moves) that some answers hold and others not;
        # the first such word whose copy gives both early and late finishers (the [SEG] row may be tied to the
        # input embedding of the [SEG] that ends every prompt, so the copy can change every answer)
        ident = set(m.vocab.obj_token_ids)
        counts = Counter(t for a in answers for t in set(a[:-1]) if t not in ident)
        head = m.lm.causal_lm.get_output_embeddings().weight
        row = int(m.lm.new_index[m.vocab.seg_token_id])
        saved = m.lm.new_head.weight[row].clone()
        for common in (t for t, c in counts.most_common() if c < len(answers)):
            m.lm.new_head.weight[row] = head[common] * 1.2
            lengths = {len(a.answer_ids) for a in _naive_predict(m, scene, TEXTS)}
            if len(lengths) > 1 and max(lengths) == m.config.max_new_tokens + 1:
                break
            m.lm.new_head.weight[row] = saved
    return m


@pytest.fixture(scope="module")
def reference(model, scene):
    return _naive_predict(model, scene, TEXTS)


def _assert_same(preds, refs):
    assert len(preds) == len(refs)
    for x, y in zip(preds, refs):
        assert x.answer_ids == y.answer_ids and x.source == y.source and x.identifiers == y.identifiers
        torch.testing.assert_close(x.obj_scores, y.obj_scores, atol=1e-5, rtol=1e-5)
        assert torch.equal(x.point_mask, y.point_mask) and torch.equal(x.objects, y.objects)
        assert torch.equal(x.decoder_mask, y.decoder_mask) and torch.equal(x.identifier_mask, y.identifier_mask)


# ------------------------------------------------------------------------------------------ the cache
def test_reference_has_early_and_late_finishers(reference, model):
    lengths = [len(p.answer_ids) for p in reference]
    assert len(set(lengths)) > 1 and max(lengths) == model.config.max_new_tokens + 1 and min(lengths) < max(lengths)


def test_prefix_matches_prompt(model, scene):
    emb, slots, _ = model.prefix_embeds(scene)
    p = build_prompt(model.text_tokenizer, model.vocab, 20, "the chair", [3], keep=torch.arange(20))
    full = model.embed_prompt(scene, 0, p, scene.tokens.feat)
    assert p.prefix_len == emb.shape[0]
    torch.testing.assert_close(full[: p.prefix_len], emb, atol=0, rtol=0)
    assert torch.equal(slots, p.slot_of_object)


def test_query_tail_completes_the_cached_head(model, scene):
    sc = SceneCache(model, scene)
    for text in TEXTS:
        q = build_query(model.text_tokenizer, text, model.config.prompt)
        assert torch.equal(torch.cat([sc.head_ids, sc.query_tail(text)]), q)
    assert sc.cached_len == sc.prefix_len + sc.head_ids.numel() and sc.head_ids.numel() > 0


@pytest.mark.parametrize("text,targets", [("the brown chair left of the desk", [3]), ("all the lamps", [1, 7, 19]),
                                          ("the piano", [])])
def test_cached_logits_equal_uncached(model, scene, text, targets):
    p = build_prompt(model.text_tokenizer, model.vocab, 20, text, targets)
    with torch.no_grad():
        full = model.embed_prompt(scene, 0, p, scene.tokens.feat)
        ref = model.lm(full[None])
        sc = SceneCache(model, scene)
        lc = sc.cached_len
        before = sc.cache.get_seq_length()
        out = model.lm(full[None, lc:], cache=sc.fork(), use_cache=True)
    assert sc.prefix_len == p.prefix_len and sc.cache.get_seq_length() == before == lc  # not mutated
    torch.testing.assert_close(out.logits, ref.logits[:, lc:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.hidden, ref.hidden[:, lc:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sc.last_logits, ref.logits[0, lc - 1], atol=1e-5, rtol=1e-5)


def test_logits_at_picks_positions(model):
    x = torch.randn(2, 7, model.lm.hidden_size)
    with torch.no_grad():
        full = model.lm(x).logits
        one = model.lm(x, logits_at=torch.tensor([6, 2])).logits
        two = model.lm(x, logits_at=torch.tensor([[0, 3], [5, 5]])).logits
    torch.testing.assert_close(one[:, 0], full[[0, 1], [6, 2]], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(two, full[[[0, 0], [1, 1]], [[0, 3], [5, 5]]], atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="logits_at"):
        model.lm(x, logits_at=torch.tensor([1, 2, 3]))


def test_expand_copies_the_cache_into_every_row(model, scene):
    sc = SceneCache(model, scene)
    big = sc.expand(3, sc.cached_len + 5)
    for layer, small in zip(big.layers, sc.cache.layers):
        assert layer.keys.shape[0] == 3 and layer.keys.shape[2] == sc.cached_len + 5
        for b in range(3):
            assert torch.equal(layer.keys[b, :, : sc.cached_len], small.keys[0])
            assert torch.equal(layer.values[b, :, : sc.cached_len], small.values[0])
    assert sc.cache.layers[0].keys.shape[0] == 1
    with pytest.raises(ValueError, match="max_len"):
        sc.expand(2, sc.cached_len - 1)


# ------------------------------------------------------------------------------------------ batched starts
@pytest.mark.parametrize("start", ["packed", "rows", "uncached"])
def test_batched_start_logits_equal_single_sequences(model, scene, start):
    """Logits after each question's last token and the LLM states at its words, per layout, against each whole
    prompt encoded alone."""
    texts = TEXTS[:4]  # questions of different lengths (padding / packing exercised)
    with torch.no_grad():
        full = [_full_embeds(model, scene, t) for t in texts]
        outs = [model.lm(f[0][None]) for f in full]
        refs = torch.stack([o.logits[0, -1] for o in outs])
        if start == "uncached":
            started = generation.start_uncached(model, scene, texts)
        else:
            sc = SceneCache(model, scene)
            fn = generation.start_packed if start == "packed" else generation.start_cached_rows
            started = fn(model, sc, texts)
        steps = started.steps
        torch.testing.assert_close(steps.logits, refs, atol=1e-5, rtol=1e-5)
        for b, (o, f) in enumerate(zip(outs, full)):
            n = f[2].numel()
            assert int(started.word_mask[b].sum()) == n
            torch.testing.assert_close(started.words[b, :n], o.hidden[0, f[2]], atol=1e-5, rtol=1e-5)
        # one more token for rows 0 and 2 only (rows 1 and 3 finished): the next logits match the reference
        tok = torch.tensor([model.vocab.obj_token_ids[3], model.vocab.obj_token_ids[5]])
        logits, hidden = steps.step(torch.tensor([0, 2]), tok)
        for j, (row, t) in enumerate(zip((0, 2), tok.tolist())):
            emb = full[row][0]
            emb = torch.cat([emb, model.lm.embed(torch.tensor([[t]]))[0]])
            ref = model.lm(emb[None])
            torch.testing.assert_close(logits[j], ref.logits[0, -1], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(hidden[j], ref.hidden[0, -1], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ predict
def test_predict_cached_equals_naive_reference(model, scene, reference):
    assert model.cached_layout() == "packed"
    _assert_same(model.predict(scene, TEXTS, use_cache=True), reference)


def test_sentence_state_at_seg_also_equals_naive_reference(model, scene, reference):
    """``sentence_state="seg"`` (the decoder reads the state at [SEG], after the answer) runs the same on every
    path, and it is a different state from the default's (the state before the answer)."""
    m = copy.copy(model)
    m.config = copy.copy(model.config)
    m.config.sentence_state = "seg"
    ref = _naive_predict(m, scene, TEXTS)
    _assert_same(m.predict(scene, TEXTS, use_cache=True), ref)
    _assert_same(m.predict(scene, TEXTS, use_cache=False), ref)
    assert any(not torch.allclose(a.obj_scores, b.obj_scores) for a, b in zip(ref, reference))


def test_identifier_grounding_equals_naive_reference(model, scene, reference):
    """With the grounding head's logits in the identifier logits (scale 3, so they decide answers), every path
    still computes what re-encoding the whole sequence computes, and the answers change."""
    m = ReferringSegmenter(_config(identifier_grounding=True), lm=model.lm).eval()
    m.load_state_dict({k: v for k, v in model.state_dict().items()}, strict=False)
    with torch.no_grad():
        m.grounding_scale.fill_(3.0)
    ref = _naive_predict(m, scene, TEXTS)
    _assert_same(m.predict(scene, TEXTS, use_cache=True), ref)
    _assert_same(m.predict(scene, TEXTS, use_cache=False), ref)
    assert [p.answer_ids for p in ref] != [p.answer_ids for p in reference]


def test_predict_uncached_equals_naive_reference(model, scene, reference):
    _assert_same(model.predict(scene, TEXTS, use_cache=False), reference)


def test_predict_rows_layout_and_small_batches(model, scene, reference, monkeypatch):
    m = copy.copy(model)  # shares the modules; the config copy changes the batch size only
    m.config = copy.copy(model.config)
    m.config.predict_batch_size = 4  # 6 texts: batches of 4 and 2
    monkeypatch.setattr(m, "cached_layout", lambda: "rows")
    _assert_same(m.predict(scene, TEXTS, use_cache=True), reference)
    _assert_same(m.predict(scene, TEXTS[::-1], use_cache=False), reference[::-1])


def test_packed_layout_with_eager_attention(model, scene, reference):
    """The packed layout's additive 4D mask also works with transformers' eager attention (mask added to
    the scores, not a boolean)."""
    m = copy.deepcopy(model)
    m.lm.causal_lm.set_attn_implementation("eager")
    assert m.lm.causal_lm.config._attn_implementation == "eager" and m.cached_layout() == "packed"
    _assert_same(m.predict(scene, TEXTS, use_cache=True), reference)


def test_predict_with_gate_uses_per_question_prompts(model, scene):
    def gate(tokens, query):  # keeps a query-dependent half of the objects, scales their features
        keep = torch.arange(int(query.sum() > 0), tokens.num_objects, 2)
        return GateSelection(keep, tokens.feat[keep] * 0.5)

    m = ReferringSegmenter(_config(), gate=gate, lm=model.lm)
    m.projector.load_state_dict(model.projector.state_dict())
    m.decoder.load_state_dict(model.decoder.state_dict())
    m.eval()
    _assert_same(m.predict(scene, TEXTS[:3], use_cache=True), _naive_predict(m, scene, TEXTS[:3]))


def test_predict_inputs(model, scene):
    assert model.predict(scene, [], use_cache=True) == []
    assert model.predict(scene, "the piano")[0].answer_ids == model.predict(scene, ["the piano"])[0].answer_ids
    with pytest.raises(ValueError, match="non-empty"):
        model.predict(scene, ["the chair", "  "])
    with pytest.raises(ValueError, match="predict_batch_size"):
        _config(predict_batch_size=0)


def test_cache_needs_one_scene(model):
    two = synthetic_scene((3, 4), points_per_object=2, obj_dim=8, point_dim=8)
    with pytest.raises(ValueError, match="one scene"):
        SceneCache(model, two)


# ------------------------------------------------------------------------------------------ decoding rules
class _Scripted:
    """Fake decoding state: ``script[row][k]`` is the argmax token after row ``row``'s ``k``-th fed token;
    ``second[row]`` (optional) a token with the next-highest logit (0.5) at every step of that row."""

    def __init__(self, script, vocab_size, first, second=None):
        self.script, self.v, self.fed = script, vocab_size, [[] for _ in script]
        self.second = second or {}
        self.logits = torch.stack([self._onehot(t) for t in first])

    def _onehot(self, t, second=None):
        x = torch.zeros(self.v)
        if second is not None:
            x[second] = 0.5
        x[t] = 1.0
        return x

    def step(self, active, tokens):
        out = []
        for r, t in zip(active.tolist(), tokens.tolist()):
            self.fed[r].append(t)
            out.append(self._onehot(self.script[r][len(self.fed[r]) - 1], self.second.get(r)))
        hidden = torch.stack([torch.tensor([float(r), float(len(self.fed[r]))]) for r in active.tolist()])
        return torch.stack(out), hidden


def test_generate_rules_on_a_script(model):
    """Hand-computed: row 0 says <OBJ001> then [SEG]; row 1 says </s> at once (-> [SEG]); row 2 never stops
    (forced [SEG] after max_new_tokens); row 3 prefers the placeholder, which is never generated (its
    second choice, <OBJ002>, has the next-highest logit); row 4 wants <OBJ001> twice, and an identifier is
    named once, so its second choice <OBJ002> comes instead."""
    v, n = model.vocab, model.config.max_new_tokens
    seg, eos, o1, o2 = v.seg_token_id, model.text_tokenizer.eos_token_id, v.obj_token_ids[1], v.obj_token_ids[2]
    vs = model.lm.vocab_size
    word = next(i for i in range(vs) if i not in set(v.obj_token_ids) | {seg, eos, v.placeholder_id})
    script = [[seg] * 9, [o1] * 9, [word] * 9, [seg] * 9, [o1, seg] + [seg] * 7]
    steps = _Scripted(script, vs, first=[o1, eos, o1, v.placeholder_id, o1], second={4: o2})
    steps.logits[3, o2] = 0.5  # row 3: placeholder 1.0 > <OBJ002> 0.5 > the rest 0
    answers, hidden = generation.greedy(model, steps)
    assert answers[0] == [o1, seg] and answers[1] == [seg] and answers[2] == [o1] + [word] * (n - 1) + [seg]
    assert answers[3] == [o2, seg] and answers[4] == [o1, o2, seg]
    assert steps.fed == answers  # finished rows are not fed again
    assert hidden.tolist() == [[0.0, 2.0], [1.0, 1.0], [2.0, n + 1.0], [3.0, 2.0], [4.0, 3.0]]  # state at [SEG]


def test_system_turn_is_encoded_once_and_again_when_the_weights_change(model, scene, monkeypatch):
    """The system turn's keys/values are computed once and reused by every scene cache; an in-place change to
    any LLM weight (an optimizer step) makes the next scene cache encode it again; what a scene cache holds
    stays equal to encoding its whole prefix from scratch."""
    from scene3d.models import cache as cache_mod

    model.__dict__.pop("_system_turn_kv", None)
    calls = []
    real = cache_mod.system_turn_cache

    def spy(m, embeds):
        held = m.__dict__.get("_system_turn_kv")
        out = real(m, embeds)
        calls.append(m.__dict__["_system_turn_kv"] is not held)  # True: encoded now
        return out

    monkeypatch.setattr(cache_mod, "system_turn_cache", spy)
    a = SceneCache(model, scene)
    b = SceneCache(model, scene)
    assert a.system_len > 0 and calls == [True, False]
    for la, lb in zip(a.cache.layers, b.cache.layers):  # two private copies, equal
        assert la.keys is not lb.keys and torch.equal(la.keys, lb.keys)
    w = next(p for p in model.lm.parameters() if p.requires_grad)
    saved = w.detach().clone()  # restored bit for bit: the module's other tests share this model
    with torch.no_grad():
        w.add_(0.5)
    try:
        c = SceneCache(model, scene)
        assert calls == [True, False, True]
        with torch.no_grad():
            emb, _, prompt = model.prefix_embeds(scene)
            x = torch.cat([emb, model.lm.embed(c.head_ids[None])[0]])
            ref = model.lm(x[None], use_cache=True)
        for lc, lr in zip(c.cache.layers, ref.cache.layers):
            torch.testing.assert_close(lc.keys, lr.keys, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(lc.values, lr.values, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(c.last_logits, ref.logits[0, -1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(c.obj_states, ref.hidden[0, prompt.placeholder_pos], atol=1e-5, rtol=1e-5)
        assert any(not torch.allclose(la.keys, lc.keys) for la, lc in zip(a.cache.layers, c.cache.layers))
    finally:
        with torch.no_grad():
            w.copy_(saved)
