"""Assembling training and evaluation data from a data config (:class:`scene3d.config.DataSchema`);
the synthetic benchmark is generated beforehand by :func:`data_prep.synthetic.prepare_data`.

==========================  ==================================================================================
:func:`split_rows`          the referring rows of a split (or alignment rows of its scenes) + the scenes dir
:func:`training_dataset`    the training :class:`~scene3d.data.referring.ReferringDataset` (a
                            ``ConcatDataset`` of several with ``data.extra_train``)
:func:`alignment_rows`      stage-1 rows binding object tokens to identifiers and class text
==========================  ==================================================================================
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import numpy as np
from torch.utils.data import ConcatDataset

from scene3d.data.referring import ReferringDataset, read_jsonl
from scene3d.data.scene import load_processed_scene
from scene3d.utils.io import expand_path
from scene3d.utils.text import plural

#: Dataset name of generated alignment rows (their ``dataset`` field).
ALIGNMENT_DATASET = "alignment"


def alignment_rows(processed_dir, scene_ids: Sequence[str], negatives: int = 2,
                   skip_labels: Sequence[str] = ("wall", "floor", "ceiling"), seed: int = 0) -> list[dict]:
    """Stage-1 rows binding object tokens to identifiers and class text, from each scene's ``objects.json``.

    Per scene and class (labels in ``skip_labels`` left out): ``"all the <plural>"`` targets every object of
    the class; ``"the <label>"`` targets the object when it is the only one of its class; and ``negatives``
    classes seen in other scenes but absent here give ``"all the <plural>"`` rows with no target. Rows have
    the referring-row keys (``dataset="alignment"``, ``ann_id``, ``scene_id``, ``targets``, ``text``,
    ``object_name``) so they train and evaluate like any referring sample.
    """
    processed_dir = Path(processed_dir)
    skip = {s.lower() for s in skip_labels}
    per_scene: dict[str, dict[str, list[int]]] = {}
    for sid in sorted(set(scene_ids)):
        scene = load_processed_scene(processed_dir / sid)
        classes: dict[str, list[int]] = {}
        for o in scene.objects:
            label = str(o.label).strip().lower()
            if label and label not in skip and o.num_points > 0:
                classes.setdefault(label, []).append(int(o.id))
        per_scene[sid] = classes
    vocab = sorted({lab for c in per_scene.values() for lab in c})
    rng = np.random.default_rng(seed)
    rows: list[dict] = []

    def add(sid: str, kind: str, label: str, text: str, targets: list[int]) -> None:
        rows.append({"dataset": ALIGNMENT_DATASET, "ann_id": f"{kind}:{label}", "scene_id": sid,
                     "targets": sorted(targets), "text": text, "object_name": label,
                     "unique": None, "eval_type": None, "easy": None, "view_dep": None,
                     "distractors": None, "anchors": None})

    for sid, classes in per_scene.items():
        for label in sorted(classes):
            ids = classes[label]
            add(sid, "all", label, f"all the {plural(label)}", ids)
            if len(ids) == 1:
                add(sid, "the", label, f"the {label}", ids)
        absent = [lab for lab in vocab if lab not in classes]
        for label in rng.permutation(absent)[: max(0, negatives)].tolist() if absent else []:
            add(sid, "none", label, f"all the {plural(label)}", [])
    return rows


class SplitData(NamedTuple):
    processed_dir: Path
    rows: list  # referring rows (or alignment rows) of the split


def split_rows(data, split: str, samples: Optional[str] = None, processed_dir: Optional[str] = None) -> SplitData:
    """Rows of ``split`` ("train" / "val") of ``data`` (a :class:`~scene3d.config.DataSchema`), or of the jsonl
    ``samples``; turned into alignment rows of the same scenes when ``data.task == "alignment"``."""
    proc = expand_path(processed_dir or data.processed_dir)
    if not proc.is_dir():
        raise FileNotFoundError(f"processed scenes directory not found: {proc} (data.processed_dir)")
    if samples is not None:
        path = expand_path(samples)
    else:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        src = data.train if split == "train" else data.val
        if src is None:
            raise ValueError(f"data.{split} is not set: no referring rows for the {split} split")
        path = expand_path(src)
    rows = read_jsonl(path)
    if data.task == "alignment":
        rows = alignment_rows(proc, [r["scene_id"] for r in rows], data.alignment_negatives,
                              data.alignment_skip_labels, seed=0)
    return SplitData(proc, rows)


def training_dataset(data, seed: int, reworder=None):
    """The training dataset of ``data`` (a :class:`~scene3d.config.DataSchema`): a
    :class:`~scene3d.data.referring.ReferringDataset` of its train split with the configured subsampling,
    augmentation and grouping of questions per scene; ``seed`` (the trainer's) drives the augmentation.

    With ``data.extra_train`` (other processed directories and their rows, e.g. a real scan beside the
    synthetic scenes) the result is a ``ConcatDataset`` of one ReferringDataset per source, each listed
    ``repeat`` times per epoch; the same subsampling and augmentation apply to all (``max_train_samples``
    cuts the main split only). Scene ids must not repeat across sources (a row names its scene by id only).

    ``reworder`` (``data_prep.rewording.reword_row``; needed when ``data.rewording > 0``, since scene3d.data
    does not import data_prep) gives a row another wording.
    """
    train = split_rows(data, "train")
    main = ReferringDataset(train.processed_dir, data.train, max_points=data.max_points, jitter=data.jitter,
                            scale_range=data.scale_range, max_samples=data.max_train_samples, seed=seed,
                            rows=train.rows, questions_per_scene=data.questions_per_scene,
                            rewording=data.rewording, reworder=reworder, rotate=data.rotate,
                            color_jitter=data.color_jitter, point_dropout=data.point_dropout)
    extra = list(getattr(data, "extra_train", None) or [])
    if not extra:
        return main
    parts, owner = [main], {r["scene_id"]: "data.train" for r in main.rows}
    for k, src in enumerate(extra):
        proc, path = expand_path(src.processed_dir), expand_path(src.train)
        if not proc.is_dir():
            raise FileNotFoundError(f"processed scenes directory not found: {proc} (data.extra_train[{k}] "
                                    f"{src.name}.processed_dir)")
        rows = read_jsonl(path)
        if data.task == "alignment":
            rows = alignment_rows(proc, [r["scene_id"] for r in rows], data.alignment_negatives,
                                  data.alignment_skip_labels, seed=0)
        for sid in sorted({r["scene_id"] for r in rows}):
            if sid in owner:
                raise ValueError(f"scene {sid} is in both {owner[sid]} and data.extra_train[{k}] ({src.name}): "
                                 "scene ids must not repeat across training sources")
            owner[sid] = f"data.extra_train[{k}]"
        parts.append(ReferringDataset(proc, path, max_points=data.max_points, jitter=data.jitter,
                                      scale_range=data.scale_range, seed=seed + 1 + k, rows=rows,
                                      questions_per_scene=data.questions_per_scene, repeat=src.repeat,
                                      rewording=data.rewording, reworder=reworder, rotate=data.rotate,
                                      color_jitter=data.color_jitter, point_dropout=data.point_dropout))
    return ConcatDataset(parts)
