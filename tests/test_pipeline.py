"""Scene3DModel end to end on processed synthetic scenes: losses, learning, prediction, trainable state."""

from __future__ import annotations

import pytest
import torch

from scene3d.data.referring import ReferringDataset, collate_referring
from data_prep.synthetic import prepare_synthetic
from scene3d.models.pipeline import Scene3DModel
from helpers import small_config



@pytest.fixture(scope="module")
def data(tmp_path_factory):
    bench = prepare_synthetic(tmp_path_factory.mktemp("pipe"), num_scenes=2, seed=3, val_fraction=0.0,
                              progress=False)
    return ReferringDataset(bench.processed, bench.train, max_points=1500)


def test_losses_fall_on_a_fixed_batch(data):
    torch.manual_seed(0)
    model = Scene3DModel(small_config())
    batch = collate_referring([data[i] for i in range(3)])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    first = None
    for _ in range(12):
        out = model(batch)
        assert set(out) >= {"loss", "lm", "mask_bce", "mask_dice", "obj", "proposal"}
        out["loss"].backward()
        opt.step()
        opt.zero_grad()
        first = first if first is not None else float(out["loss"])
    assert float(out["loss"]) < 0.8 * first


def test_only_trainable_parts_are_saved_and_restore_predictions(data):
    torch.manual_seed(0)
    model = Scene3DModel(small_config()).eval()
    state = model.trainable_state_dict()
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith("segmenter.lm.") for n in frozen)  # only the LLM base is frozen
    assert all(n in state for n in frozen)  # the tiny in-memory LLM is stored whole
    real = Scene3DModel(small_config())
    real.config.referring.llm.path = "/some/local/llm"  # a real LLM's frozen base is not stored
    assert not any(n in real.trainable_state_dict() for n in frozen)
    torch.manual_seed(1)
    other = Scene3DModel(small_config()).eval()
    other.load_trainable_state_dict(state)
    pts = collate_referring([data[0]]).points
    a = model.predict(pts, ["the chair"])[0]
    b = other.predict(pts, ["the chair"])[0]
    assert torch.equal(a.point_mask, b.point_mask) and torch.allclose(a.obj_scores, b.obj_scores)
    with pytest.raises(ValueError, match=r"unexpected \['bogus.weight'\]"):
        other.load_trainable_state_dict({**state, "bogus.weight": torch.zeros(1)})
    fresh = Scene3DModel(small_config())
    before = {k: v.clone() for k, v in fresh.trainable_state_dict().items()}
    key = next(k for k in state if k.startswith("segmenter.decoder."))
    with pytest.raises(ValueError, match=f"missing \\['{key}'\\]"):       # nothing is loaded then
        fresh.load_trainable_state_dict({k: v for k, v in state.items() if k != key})
    assert all(torch.equal(v, fresh.trainable_state_dict()[k]) for k, v in before.items())


def test_predict_shapes_and_one_scene_only(data):
    model = Scene3DModel(small_config())
    pts = collate_referring([data[0]]).points
    preds = model.predict(pts, ["the chair", "all the tables"])
    assert len(preds) == 2 and model.training  # predict restores the mode
    for p in preds:
        assert p.point_mask.shape == (pts.num_points,) and p.point_mask.dtype == torch.bool
    with pytest.raises(ValueError, match="one scene"):
        model.predict(collate_referring([data[0], data[1]]).points, ["x"])


def test_gated_model_trains_and_prunes(data):
    import dataclasses

    from scene3d.models.pipeline import GateConfig

    torch.manual_seed(0)
    cfg = dataclasses.replace(small_config(), gate=GateConfig(enabled=True, keep_ratio=0.3, min_keep=2,
                                                              anneal_steps=2))
    model = Scene3DModel(cfg)
    gate = model.segmenter.gate
    assert gate is not None and any(n.startswith("segmenter.gate.") for n in model.trainable_state_dict())
    batch = collate_referring([data[0], data[1]])
    out = model(batch)
    out["loss"].backward()
    scorer_grads = [p.grad for n, p in gate.named_parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in scorer_grads)  # the scorer learns through the op
    assert int(gate.step) == 1
    # the anneal step is checkpointed: a resumed run continues the keep-ratio schedule
    state = model.trainable_state_dict()
    assert int(state["segmenter.gate.step"]) == 1
    resumed = Scene3DModel(cfg)
    assert int(resumed.segmenter.gate.step) == 0
    resumed.load_trainable_state_dict(state)
    assert int(resumed.segmenter.gate.step) == 1
    model.eval()
    points = collate_referring([data[0]]).points
    scene, _ = model.encode(points, points.instance)
    query = torch.randn(1, model.segmenter.lm.hidden_size)
    sel = gate(scene.tokens, query)
    n = scene.tokens.num_objects
    assert n > 5
    assert sel.kept_index.numel() == max(2, -(-3 * n // 10))  # ceil(0.3 n), at least min_keep
    assert torch.all(sel.kept_index[1:] > sel.kept_index[:-1])  # original order kept


def test_questions_grouped_per_scene(data):
    """questions_per_scene: an item is up to Q rows of one scene; every row lands in exactly one item; the
    collated batch tokenizes each scene once and trains on all its questions."""
    grouped = ReferringDataset(data.processed_dir, None, max_points=1500, rows=data.rows, questions_per_scene=3)
    seen = []
    for i in range(len(grouped)):
        it = grouped[i]
        assert 1 <= len(it["samples"]) <= 3 and all(r["scene_id"] == it["scene_id"] for r in it["samples"])
        assert it["labels"] and all(isinstance(k, int) for k in it["labels"])
        seen += [id(r) for r in it["samples"]]
    assert sorted(seen) == sorted(id(r) for r in data.rows)
    with pytest.raises(ValueError, match="questions_per_scene"):
        ReferringDataset(data.processed_dir, None, rows=data.rows, questions_per_scene=0)
    batch = collate_referring([grouped[0], grouped[len(grouped) - 1]])
    n0 = len(grouped[0]["samples"])
    assert batch.points.batch_size == 2 and batch.scene_index[:n0] == [0] * n0
    assert len(batch.samples) == len(batch.scene_index) == n0 + len(grouped[len(grouped) - 1]["samples"])
    torch.manual_seed(0)
    model = Scene3DModel(small_config())
    out = model(batch)
    assert torch.isfinite(out["loss"]) and float(out["obj_rank"]) >= 0
    out["loss"].backward()
