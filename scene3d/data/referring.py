"""Referring-segmentation dataset: processed scenes + referring-sample rows -> batches.

One item is one referring sample (a sentence about one scene) with that scene's points:

==================  ================  ===========================================================
key                 type              meaning
==================  ================  ===========================================================
``scene_id``        str               scene of the sample
``points``          dict of tensors   ``coord`` [N,3] f32, ``color`` [N,3] f32 in [0,1],
                                      ``instance`` [N] i64 (-1 none), ``superpoint`` [N] i64,
                                      ``normal`` [N,3] f32 when the scene has normals
``sample``          dict              the jsonl row (``targets``, ``text``, ``distractors``, ...)
``samples``         list of dict      every row of the item (``[sample]`` unless grouped, below)
``labels``          dict              object id -> class label of the scene (same-class hard negatives)
==================  ================  ===========================================================

Scenes are directories of ``processed_dir`` or mmdetection3d exports in it (``<scene_id>_vert[_all].npy``).
A training subsample keeps a few points of every object (:func:`keep_every_object`).
``repeat = R`` lists every item ``R`` times per epoch (a small set trained beside a large one).
``rotate`` turns each item's scene a random number of quarter turns about z, its rows' compass words with it;
``color_jitter`` changes its lighting (:mod:`scene3d.data.augment`); ``point_dropout`` drops a share of its points
drawn uniformly from [0, point_dropout] (a rescan samples the same surfaces at another density; every object
keeps a few points, :func:`keep_every_object`).

With ``questions_per_scene = Q > 1`` an item is up to ``Q`` rows *of one scene* (the rows grouped by scene in
file order, then cut into runs of ``Q``; ``sample`` is the first): the scene is loaded, subsampled and
jittered once and the model tokenizes it once for all of them (:meth:`SceneInputs.take` spreads the
encoding over the questions), which makes a training step several times cheaper per question when the 3D
tokenizer dominates it. ``len(dataset)`` then counts items, not rows.

:func:`collate_referring` turns a list of items into a :class:`ReferringBatch`: a
:class:`~scene3d.structures.PointBatch` plus the rows. Scenes are loaded once and kept in memory (many
samples share a scene). Training may subsample points per scene (``max_points``) and jitter them;
evaluation uses every point so masks are scored on the full scene.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from scene3d.data.augment import jitter_color, turn_points, turn_row
from scene3d.data.exports import find_mmdet_export
from scene3d.data.scene import Scene, load_processed_scene
from scene3d.structures import PointBatch


def read_jsonl(path) -> list[dict]:
    """Rows of a jsonl file; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"referring samples file not found: {path}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
    return rows


@dataclass
class ReferringDataConfig:
    processed_dir: str = "???"
    samples: str = "???"            # jsonl of referring rows
    max_points: Optional[int] = None  # subsample scenes to at most this many points (training)
    jitter: float = 0.0             # std of gaussian coordinate noise in metres (training)
    scale_range: float = 0.0        # random isotropic scale in [1-r, 1+r] (training)
    max_samples: Optional[int] = None
    seed: int = 0


class ReferringDataset(Dataset):
    def __init__(self, processed_dir, samples, max_points: Optional[int] = None, jitter: float = 0.0,
                 scale_range: float = 0.0, max_samples: Optional[int] = None, seed: int = 0,
                 rows: Optional[Sequence[dict]] = None, questions_per_scene: int = 1, repeat: int = 1,
                 rewording: float = 0.0, reworder: Optional[Callable[[dict, np.random.Generator],
                                                                     Optional[str]]] = None,
                 rotate: bool = False, color_jitter: float = 0.0, point_dropout: float = 0.0):
        self.processed_dir = Path(processed_dir)
        if not self.processed_dir.is_dir():
            raise FileNotFoundError(f"processed scenes directory not found: {self.processed_dir}")
        self.rows = list(rows) if rows is not None else read_jsonl(samples)
        missing = sorted({r["scene_id"] for r in self.rows if not _scene_exists(self.processed_dir / r["scene_id"])})
        if missing:
            raise ValueError(f"{len(missing)} scenes of {samples} are not in {self.processed_dir}: {missing[:5]}")
        if max_samples is not None:
            self.rows = self.rows[:max_samples]
        if not self.rows:
            raise ValueError(f"no referring samples in {samples}")
        if questions_per_scene < 1:
            raise ValueError(f"questions_per_scene must be >= 1, got {questions_per_scene}")
        self.max_points, self.jitter, self.scale_range, self.seed = max_points, jitter, scale_range, seed
        if not 0.0 <= float(rewording) <= 1.0:
            raise ValueError(f"rewording must be a probability in [0, 1], got {rewording!r}")
        if rewording > 0 and reworder is None:
            raise ValueError("rewording > 0 needs a reworder (scene3d.data does not import data_prep: the caller "
                             "passes data_prep.rewording.reword_row)")
        self.rewording, self.reworder = float(rewording), reworder
        if not 0.0 <= float(color_jitter) < 1.0:
            raise ValueError(f"color_jitter must be in [0, 1), got {color_jitter!r}")
        self.rotate, self.color_jitter = bool(rotate), float(color_jitter)
        if not 0.0 <= float(point_dropout) < 1.0:
            raise ValueError(f"point_dropout must be in [0, 1), got {point_dropout!r}")
        self.point_dropout = float(point_dropout)
        by_scene: dict = {}
        for i, r in enumerate(self.rows):
            by_scene.setdefault(r["scene_id"], []).append(i)
        q = questions_per_scene
        self.groups = ([[i] for i in range(len(self.rows))] if q == 1 else
                       [idx[j : j + q] for idx in by_scene.values() for j in range(0, len(idx), q)])
        if repeat < 1:
            raise ValueError(f"repeat must be >= 1, got {repeat}")
        # each repetition is its own item index, so it draws its own subsample and jitter
        self.groups = self.groups * repeat
        self.epoch = 0
        self._load = lru_cache(maxsize=64)(self._load_scene)

    @classmethod
    def from_config(cls, cfg: ReferringDataConfig) -> "ReferringDataset":
        return cls(cfg.processed_dir, cfg.samples, cfg.max_points, cfg.jitter, cfg.scale_range,
                   cfg.max_samples, cfg.seed)

    def _load_scene(self, scene_id: str) -> Scene:
        return load_processed_scene(self.processed_dir / scene_id)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.groups)

    def scene(self, scene_id: str) -> Scene:
        return self._load(scene_id)

    def __getitem__(self, idx: int) -> dict:
        rows = [self.rows[i] for i in self.groups[idx]]
        row = rows[0]
        scene = self._load(row["scene_id"])
        by_id = scene.object_by_id()
        for r in rows:
            unknown = [t for t in r.get("targets", []) if t not in by_id]
            if unknown:
                raise ValueError(f"sample {r.get('ann_id', idx)}: target ids {unknown} not in scene {r['scene_id']}")
        rng = np.random.default_rng([self.seed, self.epoch, idx])
        keep = None
        if self.max_points is not None and scene.num_points > self.max_points:
            keep = np.sort(rng.choice(scene.num_points, self.max_points, replace=False))
            keep = keep_every_object(scene.instance, keep, rng)
        if self.point_dropout > 0:  # own stream: the subsample, jitter and turns stay as without it
            drop = np.random.default_rng([self.seed, self.epoch, idx, 3])
            base = np.arange(scene.num_points) if keep is None else keep
            kept = base[drop.random(len(base)) >= drop.uniform(0.0, self.point_dropout)]
            keep = keep_every_object(scene.instance, kept, drop) if len(kept) else base
        points = scene_to_tensors(scene, keep)
        if self.scale_range > 0:
            points["coord"] = points["coord"] * float(rng.uniform(1 - self.scale_range, 1 + self.scale_range))
        if self.jitter > 0:
            noise = rng.normal(0.0, self.jitter, size=points["coord"].shape).astype(np.float32)
            points["coord"] = points["coord"] + torch.from_numpy(noise)
        if self.rewording > 0:
            rows = self._reword(rows, np.random.default_rng([self.seed, self.epoch, idx, 1]))
            row = rows[0]
        if self.rotate or self.color_jitter > 0:  # own stream: the subsample and jitter stay as without it
            aug = np.random.default_rng([self.seed, self.epoch, idx, 2])
            turns = int(aug.integers(0, 4)) if self.rotate else 0
            points = turn_points(points, turns)
            rows = [turn_row(r, turns) for r in rows]
            row = rows[0]
            points["color"] = jitter_color(points["color"], self.color_jitter, aug)
        return {"scene_id": row["scene_id"], "points": points, "sample": row, "samples": rows,
                "labels": {int(o.id): o.label for o in scene.objects}}

    def _reword(self, rows: list, rng: np.random.Generator) -> list:
        """Each row gets, with probability ``rewording``, the text ``reworder(row, rng)`` gives (None: it keeps
        its own; data_prep.rewording.reword_row: another wording of its synthetic program). Its own random
        stream, so the subsample and jitter are the same with and without it."""
        out = []
        for r in rows:
            if rng.random() < self.rewording:
                text = self.reworder(r, rng)
                if text is not None:
                    r = {**r, "text": text}
            out.append(r)
        return out


#: points of each object a training subsample keeps at least (all of them for smaller objects)
MIN_OBJECT_POINTS = 8


def keep_every_object(instance: np.ndarray, keep: np.ndarray, rng: np.random.Generator,
                      min_points: int = MIN_OBJECT_POINTS) -> np.ndarray:
    """``keep`` (sorted point indices of a subsample) with random points of every object left with fewer than
    ``min(min_points, its size)`` swapped in, so no object (a target, anchor or distractor of a row) vanishes
    from a subsampled scene: on an 80k-point real scan cut to a few thousand points a 40-point object often
    would. As many points leave, drawn from the unannotated points and the objects' surplus above the
    minimum, so the size stays ``len(keep)`` (it grows only when there is not enough surplus). Where no
    object is short, ``keep`` is returned unchanged (the same subsample as before this rule)."""
    inst = instance[keep]
    ids, total = np.unique(instance[instance >= 0], return_counts=True)
    kept = dict(zip(*np.unique(inst[inst >= 0], return_counts=True)))
    extra = []
    for i, n in zip(ids.tolist(), total.tolist()):
        need = min(min_points, n) - int(kept.get(i, 0))
        if need > 0:
            pool = np.setdiff1d(np.flatnonzero(instance == i), keep, assume_unique=True)
            extra.append(rng.choice(pool, need, replace=False))
    if not extra:
        return keep
    extra = np.concatenate(extra)
    # removable: every kept unannotated point, and each object's kept points beyond min_points
    removable = [np.flatnonzero(inst < 0)]
    for i, n in kept.items():
        if n > min_points:
            removable.append(rng.choice(np.flatnonzero(inst == i), n - min_points, replace=False))
    removable = np.concatenate(removable)
    drop = rng.choice(removable, min(len(extra), len(removable)), replace=False)
    return np.sort(np.concatenate([np.delete(keep, drop), extra]))


def _scene_exists(path: Path) -> bool:
    """A scene directory, or an mmdetection3d export ``<dir>/<scene_id>_vert[_all].npy``."""
    return path.is_dir() or find_mmdet_export(path) is not None


def scene_to_tensors(scene: Scene, keep: Optional[np.ndarray] = None) -> dict:
    """Per-point tensors of a scene (optionally a subset of points), in the dtypes the model expects."""
    sel = (lambda a: a) if keep is None else (lambda a: a[keep])
    out = {
        "coord": torch.from_numpy(np.ascontiguousarray(sel(scene.coord), dtype=np.float32)),
        "color": torch.from_numpy(np.ascontiguousarray(sel(scene.color), dtype=np.float32) / 255.0),
        "instance": torch.from_numpy(np.ascontiguousarray(sel(scene.instance)).astype(np.int64)),
    }
    if scene.superpoint is not None:
        out["superpoint"] = torch.from_numpy(np.ascontiguousarray(sel(scene.superpoint)).astype(np.int64))
    else:  # no over-segmentation: every point is its own superpoint
        out["superpoint"] = torch.arange(len(out["coord"]), dtype=torch.long)
    if scene.normal is not None:
        out["normal"] = torch.from_numpy(np.ascontiguousarray(sel(scene.normal), dtype=np.float32))
    return out


class ReferringBatch(NamedTuple):
    points: PointBatch
    samples: list      # the jsonl rows
    #: scene of each sample (a row of ``points``); None: sample ``b`` is on scene ``b``
    scene_index: Optional[list] = None
    #: per scene of ``points``: object id -> class label (None when an item lacks them)
    object_labels: Optional[list] = None


def collate_referring(items: Sequence[dict]) -> ReferringBatch:
    """Collate dataset items (one scene per item, one or more samples on it) into a :class:`ReferringBatch`."""
    if not items:
        raise ValueError("cannot collate an empty list of samples")
    # every item carries the same optional fields only if all scenes have them
    common = set.intersection(*(set(it["points"]) for it in items))
    scenes = [{k: v for k, v in it["points"].items() if k in common} for it in items]
    pb = PointBatch.from_list(scenes, scene_ids=[it["scene_id"] for it in items])
    samples, index = [], []
    for i, it in enumerate(items):
        rows = it.get("samples") or [it["sample"]]
        samples.extend(rows)
        index.extend([i] * len(rows))
    labels = [it["labels"] for it in items] if all("labels" in it for it in items) else None
    return ReferringBatch(points=pb, samples=samples, scene_index=None if len(index) == len(items) else index,
                          object_labels=labels)
