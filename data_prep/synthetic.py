"""The embedded default dataset: synthetic ScanNet-format scenes, made on the fly and run through the real
preprocessing tools (``scene3d synth`` -> ``scene3d prep scannet`` -> ``scene3d prep refer``).

``prepare_synthetic(root, num_scenes, seed)`` leaves::

    root/raw/            scans/<scene_id>/..., scannetv2-labels.combined.tsv, splits/, synth_layout.json,
                         referring/ (ScanRefer / Multi3DRefer / Sr3D-format annotation files)
    root/processed/      <scene_id>/coord.npy ... (DESIGN.md processed scenes)
    root/refer/          {train,val}.jsonl  -- Multi3DRefer-format rows (zero / one / many targets)
                         scanrefer_{train,val}.jsonl, sr3d.jsonl
                         val_paraphrase.jsonl, scanrefer_val_paraphrase.jsonl -- the val rows re-worded as
                         real annotators word them (data_prep.paraphrase; dataset "multi3drefer_paraphrase" /
                         "scanrefer_paraphrase"; same ann_id, targets and program as their twins in val.jsonl /
                         scanrefer_val.jsonl); evaluate with ``data.val=<root>/refer/val_paraphrase.jsonl``
    root/READY.json      what was made (written last: a directory without it is incomplete and is redone)

Running it again with the same arguments reuses a complete ``root``. :func:`prepare_data` does this for a data
config whose ``synthetic`` node is set (training and ``scene3d eval`` call it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

from data_prep import refer
from data_prep.scannet import process_scans
from data_prep.synth import generate_dataset
from scene3d.utils.io import expand_path, write_json_atomic


#: bumped when the files made change (2: rows carry their programs' ``anchors``); a root made with another
#: format is made again
FORMAT = 2


class SyntheticData(NamedTuple):
    root: Path
    processed: Path
    train: Path      # jsonl of referring rows (multi-target capable)
    val: Path
    labels: Path     # the label tsv
    extra: dict      # other jsonl files by name


def prepare_synthetic(root, num_scenes: int = 8, seed: int = 0, preset: str = "tiny", val_fraction: float = 0.25,
                      workers: int = 1, progress: bool = True) -> SyntheticData:
    root = Path(root)
    ready = root / "READY.json"
    want = {"num_scenes": num_scenes, "seed": seed, "preset": preset, "val_fraction": val_fraction,
            "format": FORMAT}
    paths = _paths(root)
    if ready.exists():
        try:
            if json.loads(ready.read_text()).get("args") == want and all(
                    p.exists() for p in (*paths[1:5], *paths.extra.values())):  # older caches lack paraphrase
                return paths
        except json.JSONDecodeError:
            pass
    raw, processed = root / "raw", root / "processed"
    summary = generate_dataset(raw, num_scenes=num_scenes, seed=seed, preset=preset, val_fraction=val_fraction,
                               progress=progress)
    prep = process_scans(raw / "scans", processed, raw / "scannetv2-labels.combined.tsv", workers=workers,
                         progress=progress)
    if not prep.ok:
        raise RuntimeError(f"preprocessing synthetic scenes failed:\n{prep.format()}")
    files = summary["files"]
    raw2nyu = refer.load_label_map(files["labels"])
    out = {}
    for split in ("train", "val"):
        rows = refer.read_multi3drefer(files[f"multi3drefer_{split}"])
        out[split] = refer.filter_against_processed(rows, processed).kept
        rows = refer.read_scanrefer(files[f"scanrefer_{split}"], raw2nyu)
        out[f"scanrefer_{split}"] = refer.filter_against_processed(rows, processed).kept
    rows = refer.read_multi3drefer(files["multi3drefer_val_paraphrase"], dataset="multi3drefer_paraphrase")
    out["val_paraphrase"] = refer.filter_against_processed(rows, processed).kept
    rows = refer.read_scanrefer(files["scanrefer_val_paraphrase"], raw2nyu, dataset="scanrefer_paraphrase")
    out["scanrefer_val_paraphrase"] = refer.filter_against_processed(rows, processed).kept
    out["sr3d"] = refer.filter_against_processed(refer.read_sr3d(files["sr3d"]), processed).kept
    for name, rows in out.items():
        refer.write_refer_jsonl(rows, root / "refer" / f"{name}.jsonl")
    write_json_atomic(ready, {"args": want, "counts": {k: len(v) for k, v in out.items()},
                              "scenes": summary["splits"]})
    return paths


def _paths(root: Path) -> SyntheticData:
    refer_dir = root / "refer"
    return SyntheticData(root, root / "processed", refer_dir / "train.jsonl", refer_dir / "val.jsonl",
                         root / "raw" / "scannetv2-labels.combined.tsv",
                         {n: refer_dir / f"{n}.jsonl" for n in ("scanrefer_train", "scanrefer_val", "sr3d",
                                                                "val_paraphrase", "scanrefer_val_paraphrase")})


def prepare_data(data) -> None:
    """Generate the synthetic benchmark when ``data.synthetic`` is set (reuses a complete earlier one);
    ``data``: a :class:`scene3d.config.DataSchema`."""
    if data.synthetic is None:
        return
    s = data.synthetic
    prepare_synthetic(expand_path(s.root), num_scenes=s.num_scenes, seed=s.seed, preset=s.preset,
                      val_fraction=s.val_fraction, progress=False)
