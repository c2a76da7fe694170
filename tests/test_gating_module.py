"""TokenGate module (scorer + op), keep-ratio schedule, attention-derived scores (hand-made and tiny Qwen2)."""

from __future__ import annotations

import math

import pytest
import torch

from scene3d.gating import (
    TokenGate,
    TokenGateConfig,
    attention_scores,
    keep_ratio_schedule,
    token_gate_reference,
)
from scene3d.gating import module as gate_module


def make_gate(**overrides):
    torch.manual_seed(0)
    cfg = TokenGateConfig(token_dim=12, query_dim=8, hidden_dim=16, **overrides)
    return TokenGate(cfg)


def ragged(counts, c=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    offset = torch.cumsum(torch.tensor(counts), 0)
    return torch.randn(sum(counts), c, generator=g), offset


# --- schedule -----------------------------------------------------------------------------------------------------

def test_keep_ratio_schedule_values():
    lin = lambda s: keep_ratio_schedule(s, 1.0, 0.5, steps=100, warmup=10, shape="linear")  # noqa: E731
    assert [lin(s) for s in (0, 10, 35, 60, 110, 10_000)] == pytest.approx([1.0, 1.0, 0.875, 0.75, 0.5, 0.5])
    cos = lambda s: keep_ratio_schedule(s, 1.0, 0.5, steps=100, warmup=0, shape="cosine")  # noqa: E731
    assert cos(0) == pytest.approx(1.0)
    assert cos(25) == pytest.approx(0.5 + 0.25 * (1 + math.cos(math.pi / 4)))
    assert cos(50) == pytest.approx(0.75)
    assert cos(100) == pytest.approx(0.5) and cos(500) == pytest.approx(0.5)
    assert keep_ratio_schedule(3, 0.9, 0.2, steps=0) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="shape"):
        keep_ratio_schedule(1, 1.0, 0.5, 10, shape="exp")
    with pytest.raises(ValueError, match="step"):
        keep_ratio_schedule(-1, 1.0, 0.5, 10)


def test_config_validation():
    with pytest.raises(ValueError, match="keep_ratio"):
        TokenGateConfig(keep_ratio=1.5)
    with pytest.raises(ValueError, match="anneal_shape"):
        TokenGateConfig(anneal_shape="step")
    with pytest.raises(ValueError, match="token_dim"):
        TokenGateConfig(token_dim=0)


# --- module -------------------------------------------------------------------------------------------------------

def test_training_anneals_and_eval_uses_fixed_ratio():
    gate = make_gate(anneal_start=1.0, anneal_end=0.25, anneal_steps=100, keep_ratio=0.5, min_keep=1)
    tokens, offset = ragged([8, 0, 20])
    query = torch.randn(3, 8)
    gate.train()
    out = gate(tokens, offset, query, step=0)
    assert out.keep_ratio == 1.0 and out.new_offset.tolist() == [8, 8, 28]
    out = gate(tokens, offset, query, step=100)
    assert out.keep_ratio == pytest.approx(0.25) and out.new_offset.tolist() == [2, 2, 7]
    gate.eval()
    out = gate(tokens, offset, query, step=0)  # step ignored at inference
    assert out.keep_ratio == 0.5 and out.new_offset.tolist() == [4, 4, 14]
    # the kept rows are the best-scored ones of each scene
    s = out.scores.detach()
    assert set(out.kept_index[:4].tolist()) == set(s[:8].topk(4).indices.tolist())


def test_inference_threshold():
    gate = make_gate(keep_ratio=1.0, min_keep=1)
    tokens, offset = ragged([10, 6])
    query = torch.randn(2, 8)
    gate.eval()
    scores = gate.score(tokens, offset, query).detach()
    gate.config.threshold = float(scores.median())
    out = gate(tokens, offset, query)
    assert out.kept_index.tolist() == (scores >= gate.config.threshold).nonzero().flatten().tolist()


def test_scores_in_unit_interval_and_query_conditioned():
    gate = make_gate()
    tokens, offset = ragged([5, 7])
    s1 = gate.score(tokens, offset, torch.randn(2, 8))
    s2 = gate.score(tokens, offset, torch.randn(2, 8))
    assert s1.shape == (12,) and ((s1 > 0) & (s1 < 1)).all()
    assert not torch.allclose(s1, s2)
    # per-token query and padded sequence query pooled by the mask give the same scores
    q = torch.randn(2, 4, 8)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    manual = torch.stack([q[0, :2].mean(0), q[1].mean(0)])
    torch.testing.assert_close(gate.score(tokens, offset, q, mask), gate.score(tokens, offset, manual))


def test_scorer_gradients_flow_through_the_op(monkeypatch):
    gate = make_gate(anneal_end=0.5, min_keep=1)
    tokens, offset = ragged([9, 4, 0, 11])
    query = torch.randn(4, 8)
    target = torch.randn(12)

    def loss_and_grads():
        gate.zero_grad()
        t = tokens.clone().requires_grad_()
        out = gate.train()(t, offset, query)
        loss = (out.gated.sum(0) * target).sum()
        loss.backward()
        return out, t.grad, {n: p.grad.clone() for n, p in gate.named_parameters()}

    out, tok_grad, grads = loss_and_grads()
    for name, g in grads.items():
        assert g.abs().sum() > 0, f"no gradient reached {name}"
    dropped = torch.ones(len(tokens), dtype=torch.bool)
    dropped[out.kept_index] = False
    assert (tok_grad[dropped] == 0).all() and (tok_grad[~dropped] != 0).any()
    # same gradients when the op is swapped for the pure-PyTorch reference
    monkeypatch.setattr(gate_module, "token_gate", token_gate_reference)
    _, ref_tok_grad, ref_grads = loss_and_grads()
    torch.testing.assert_close(tok_grad, ref_tok_grad)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name])


def test_module_bad_input():
    gate = make_gate()
    tokens, offset = ragged([3, 3])
    with pytest.raises(ValueError, match="tokens must be"):
        gate(tokens[:, :5], offset, torch.randn(2, 8))
    with pytest.raises(ValueError, match="query must give"):
        gate(tokens, offset, torch.randn(3, 8))
    with pytest.raises(ValueError, match="query embedding"):
        gate(tokens, offset)
    with pytest.raises(ValueError, match="end at M"):
        gate(tokens, torch.tensor([3, 5]), torch.randn(2, 8))


def test_external_scores_bypass_the_scorer():
    gate = make_gate(keep_ratio=0.5).eval()
    tokens, offset = ragged([4])
    out = gate(tokens, offset, scores=torch.tensor([0.1, 0.9, 0.3, 0.8]))
    assert out.kept_index.tolist() == [1, 3]


# --- attention-derived scores -------------------------------------------------------------------------------------

def test_attention_token_receiving_all_attention_ranks_first():
    # one sample, L=6: objects at positions 1, 2, 3; queries 4, 5 attend only to position 2
    attn = torch.full((1, 2, 6, 6), 0.0)
    attn[:, :, :, 0] = 1.0
    attn[:, :, 4:, :] = 0.0
    attn[:, :, 4:, 2] = 1.0
    scores = attention_scores(attn, torch.tensor([1, 2, 3]), torch.tensor([3]))
    assert scores.tolist() == [0.0, 1.0, 0.0]


def test_attention_scores_match_loop():
    g = torch.Generator().manual_seed(0)
    b, h, length = 2, 3, 9
    attn = torch.rand(b, h, length, length, generator=g).softmax(-1)
    obj_positions = torch.tensor([1, 2, 4, 1, 3])  # sample 0: 3 objects, sample 1: 2 objects
    obj_offset = torch.tensor([3, 5])
    attention_mask = torch.ones(b, length, dtype=torch.long)
    attention_mask[1, -2:] = 0  # padding at the end of sample 1
    got = attention_scores(attn, obj_positions, obj_offset, attention_mask=attention_mask, normalize="none")
    expected = []
    for m, pos in enumerate(obj_positions.tolist()):
        s = 0 if m < 3 else 1
        last = max(obj_positions[:3].tolist()) if s == 0 else max(obj_positions[3:].tolist())
        queries = [q for q in range(last + 1, length) if attention_mask[s, q]]
        expected.append(sum(attn[s, hh, q, pos].item() for hh in range(h) for q in queries) / (h * len(queries)))
    torch.testing.assert_close(got, torch.tensor(expected))
    normed = attention_scores(attn, obj_positions, obj_offset, attention_mask=attention_mask)
    torch.testing.assert_close(normed[:3], got[:3] / got[:3].max())
    torch.testing.assert_close(normed[3:], got[3:] / got[3:].max())


def test_attention_scores_bad_input():
    attn = torch.rand(1, 1, 5, 5)
    with pytest.raises(ValueError, match="obj_positions must lie"):
        attention_scores(attn, torch.tensor([1, 7]), torch.tensor([2]))
    with pytest.raises(ValueError, match="no query position"):
        attention_scores(attn, torch.tensor([1, 4]), torch.tensor([2]))
    with pytest.raises(ValueError, match="attn_probs"):
        attention_scores(torch.rand(5, 5), torch.tensor([1]), torch.tensor([1]))
    with pytest.raises(ValueError, match="end at M"):
        attention_scores(attn, torch.tensor([1, 2]), torch.tensor([1]))
