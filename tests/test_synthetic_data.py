"""The embedded default dataset: synth -> prep scannet -> prep refer, and the referring dataset on top."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from scene3d.data.referring import ReferringDataset, collate_referring, read_jsonl
from scene3d.data.scene import load_processed_scene
from data_prep.synthetic import prepare_synthetic
from scene3d.llm.tiny import tiny_vocabulary


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return prepare_synthetic(tmp_path_factory.mktemp("synbench"), num_scenes=3, seed=1, progress=False)


def test_files_and_rows_agree_with_processed_scenes(bench):
    train, val = read_jsonl(bench.train), read_jsonl(bench.val)
    assert train and val
    layout = json.loads((bench.root / "raw" / "synth_layout.json").read_text())
    for row in train + val:
        split = layout["scenes"][row["scene_id"]]["split"]
        assert row in (train if split == "train" else val)
        scene = load_processed_scene(bench.processed / row["scene_id"])
        ids = set(np.unique(scene.instance[scene.instance >= 0]).tolist())
        assert set(row["targets"]) <= ids
    counts = [len(r["targets"]) for r in train + val]
    assert 0 in counts and 1 in counts  # zero- and single-target samples both present


def test_tiny_tokenizer_covers_every_synthetic_word(bench):
    """Every template word (the paraphrase split's words may fall outside: data_prep.paraphrase doc)."""
    vocab = set(tiny_vocabulary())
    missing = set()
    for path in [bench.train, bench.val, *(p for n, p in bench.extra.items() if "paraphrase" not in n)]:
        for row in read_jsonl(path):
            missing |= {w for w in row["text"].replace(",", " , ").split() if w not in vocab}
    assert not missing


def test_prepare_reuses_a_complete_directory(bench):
    stamp = (bench.root / "READY.json").stat().st_mtime_ns
    again = prepare_synthetic(bench.root, num_scenes=3, seed=1, progress=False)
    assert again == bench and (bench.root / "READY.json").stat().st_mtime_ns == stamp


def test_dataset_items_and_collate(bench):
    ds = ReferringDataset(bench.processed, bench.train, max_points=500, jitter=0.01, seed=0)
    item = ds[0]
    pts = item["points"]
    assert pts["coord"].shape == (500, 3) and pts["color"].max() <= 1.0
    assert ds[0]["points"]["coord"].equal(pts["coord"])  # deterministic per (seed, epoch, index)
    ds.set_epoch(1)
    assert not ds[0]["points"]["coord"].equal(pts["coord"])
    batch = collate_referring([ds[0], ds[1]])
    assert batch.points.batch_size == 2 and batch.points.num_points == 1000
    assert batch.samples[1]["text"] == ds.rows[1]["text"]


def test_dataset_errors_name_the_problem(bench, tmp_path):
    with pytest.raises(FileNotFoundError, match="processed scenes directory"):
        ReferringDataset(tmp_path / "nope", bench.train)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"scene_id": "scene9999_00", "targets": [], "text": "x"}\n')
    with pytest.raises(ValueError, match="scene9999_00"):
        ReferringDataset(bench.processed, bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    with pytest.raises(ValueError, match="broken.jsonl:1"):
        ReferringDataset(bench.processed, broken)
    row = dict(read_jsonl(bench.train)[0], targets=[9999])
    ds = ReferringDataset(bench.processed, None, rows=[row])
    with pytest.raises(ValueError, match="9999"):
        ds[0]
