"""Test-time quarter turns: answer each question on the scan as given and turned 1..T-1 quarter turns about
the vertical axis, with the question's compass words turned with it, and keep the answer most orientations
agree on.

Why: ScanNet aligns each scan's walls with the axes but leaves which wall faces +x arbitrary (two exports of
one room, scene0000_01 and scene0000_02, lie a quarter turn apart), and a model trained on few real scans
answers a scan differently in each of its four orientations even with ``data.rotate`` in training (README,
real-rescan experiment). Turning is exact (a quarter turn swaps and negates coordinates: no resampling), so
every orientation sees the same points and objects; only the network's view of them changes. This is the
rotation test-time augmentation of 3D semantic segmentation (Pointcept's ScanNet test configs fuse the
predictions of the scan turned about z), applied to answers: the votes are over object sets, not per point,
so a fused answer is always one the model gave.

The objects are fixed before turning (the given instances or proposals, or the proposal head's objects on the
scan as given), so an object's local row is the same in every orientation and answers compare exactly. Votes:
the answer (set of objects, or "none") that most orientations gave; a tie goes to the tied answer given by
the earliest orientation, the scan as given first. The result is that orientation's :class:`Prediction`, with
the decoder's object scores averaged over the orientations and ``agreement`` the share of orientations
that gave the chosen answer (1.0 without turns).
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import torch

from scene3d.data.augment import canonical_turns, check_turns, turn_compass, turn_points
from scene3d.models.generation import Prediction
from scene3d.structures.points import PointBatch
from scene3d.structures.scene_inputs import SceneInputs

__all__ = ["canonical_batch", "check_turns", "frame_texts", "turned_batch", "turned_texts", "vote"]


def turned_batch(points: PointBatch, quarter_turns: int) -> PointBatch:
    """``points`` (one scene) turned ``quarter_turns`` counter-clockwise about the vertical axis through the
    middle of its xy extent, normals with it; every other field (and the point order) unchanged."""
    if points.batch_size != 1:
        raise ValueError(f"turned_batch takes one scene, got {points.batch_size}")
    fields = {"coord": points.coord} if points.normal is None else {"coord": points.coord, "normal": points.normal}
    return points.replace(**turn_points(fields, quarter_turns))


def canonical_batch(points: PointBatch) -> tuple[PointBatch, list]:
    """Each scene of ``points`` turned into its canonical frame (:func:`scene3d.data.augment.canonical_turns`),
    and the quarter turns each took. Exact quarter turns about each scene's own xy middle, normals with them;
    the point order and every other field unchanged, so per-point masks need no mapping back."""
    scenes = points.split()
    turns = [canonical_turns(s["coord"]) for s in scenes]
    if not any(turns):
        return points, turns
    parts = [turn_points({k: s[k] for k in ("coord", "normal") if s.get(k) is not None}, k)
             for s, k in zip(scenes, turns)]
    fields = {"coord": torch.cat([p["coord"] for p in parts])}
    if points.normal is not None:
        fields["normal"] = torch.cat([p["normal"] for p in parts])
    return points.replace(**fields), turns


def frame_texts(scene: SceneInputs, texts: Sequence[str]) -> list:
    """``texts`` as they read in the frame ``scene``'s points are held in: each text's compass words turned by
    ``scene.frame_turns`` of its scene (text ``i`` is about scene ``i``, or every text about scene 0 when there
    is one scene). Unchanged when the points are as given (no ``frame_turns``, or all 0)."""
    texts = list(texts)
    if scene.frame_turns is None or not any(scene.frame_turns):
        return texts
    if scene.batch_size != 1 and len(texts) != scene.batch_size:
        raise ValueError(f"{len(texts)} texts for {scene.batch_size} scenes: give one text per scene")
    turns = scene.frame_turns * len(texts) if scene.batch_size == 1 else scene.frame_turns
    return [turn_compass(t, k) for t, k in zip(texts, turns)]


def turned_texts(texts: Sequence[str], quarter_turns: int) -> list:
    """The questions as they read on the scan turned ``quarter_turns`` counter-clockwise (north -> west...)."""
    return [turn_compass(t, quarter_turns) for t in texts]


def vote(per_turn: Sequence[Sequence[Prediction]], object_ids=None) -> list:
    """One :class:`Prediction` per question from ``per_turn[k][q]``, the answers of orientation ``k`` (module
    docstring). ``object_ids [M]`` (optional): the source id of each local object row, to write the chosen
    objects' ids (the orientations' own may differ when their objects were given as rows)."""
    if not per_turn:
        raise ValueError("vote needs the answers of at least one orientation")
    n = len(per_turn[0])
    if any(len(p) != n for p in per_turn):
        raise ValueError(f"every orientation must answer the same {n} questions, got {[len(p) for p in per_turn]}")
    out = []
    for q in range(n):
        answers = [p[q] for p in per_turn]
        keys = [tuple(sorted(a.objects.tolist())) for a in answers]
        counts = Counter(keys)
        best = max(counts.values())
        k = next(i for i, key in enumerate(keys) if counts[key] == best)  # earliest orientation among the tied
        chosen = answers[k]
        scores = torch.stack([a.obj_scores for a in answers]).mean(0)
        ids = chosen.object_ids
        if object_ids is not None:
            ids = object_ids.to(chosen.objects.device)[chosen.objects]
        out.append(chosen._replace(obj_scores=scores, object_ids=ids, agreement=best / len(answers)))
    return out
