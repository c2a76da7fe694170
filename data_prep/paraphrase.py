"""The paraphrase split of the synthetic benchmark: the held-out (val) programs of data_prep.synth_refer,
re-worded the way real annotators word them, so that no training text ever holds their words or frames.

``write_paraphrase_files(out_dir, layout)`` reads the regular val files that
:func:`data_prep.synth_refer.write_referring_files` wrote and writes, beside them::

    out_dir/referring/synth_scanrefer_val_paraphrase.json     same rows (ids, targets, program), new wording
    out_dir/referring/synth_multi3drefer_val_paraphrase.json  same for the Multi3DRefer file

Each row is the twin of a regular val row: the same ``scene_id``, ``ann_id``, ``object_name``, targets
(``object_id`` / ``object_ids``, ``eval_type``) and ``program``; only ``description`` (and ScanRefer's
``token``) differ, and ``"wording": "paraphrase"`` marks the split. The targets are checked against
``synth_refer.evaluate(program, objects)`` of the layout before writing, so the truth stays exact. The
regular files are only read: their bytes do not depend on this module. Only val scenes are re-worded;
training (``*_train``, the Sr3D csv's ``is_train`` rows, stage-1 alignment rows) keeps the template wording.

Where the wording comes from (counted by :func:`count_real_wordings` in ``../shared/data/real``, the files of
:data:`REAL_FILES`; ``tests/test_paraphrase.py`` recounts them and compares with :data:`REAL_COUNTS`)

Category synonyms (:data:`SYNONYMS`): texts whose target class (ScanRefer ``object_name`` / Nr3D
``instance_type``) is the synthetic label's real class, holding the synonym as whole words, in the ScanRefer
train/val samples and Nr3D test + train sample (2,000 + 8,485 texts)::

    label       real class   synonym (texts)                                   the label itself
    sofa        couch        couch 162 (ScanNet annotates sofas as "couch")    sofa 4
    trash can   trash can    trashcan 66, trash bin 14, garbage can 8          trash can 436
    nightstand  nightstand   night stand 3                                     nightstand 56
    monitor     monitor      computer monitor 25, screen 19                    monitor 368
    bookshelf   bookshelf    bookcase 13, book shelf 6                         bookshelf 100
    pillow      pillow       cushion 6                                         pillow 414
    box         box          cardboard box 7                                   box 272

The other synthetic labels (chair, table, desk, cabinet, bed, door, window, lamp) keep their name: the real
alternatives are sub-types (office chair 49, coffee table 4) or other things (desk for a table 31, light for
a lamp 3, entrance for a door 11). The issue's tv / television and fridge / refrigerator are not synthetic
classes. A label with synonyms is ALWAYS written as one of them in this split (never as the label).

Relation phrasings (:data:`RELATIONS`), from Sr3D (``sr3d_test_sampled1000.csv``, rows by
``reference_type``; ScanRefer / Nr3D where Sr3D has only the template's words)::

    op        wording (rows holding it)                                  template wording (not used here)
    closest   Sr3D: near 119, close to 119, closer to 105                closest to
    farthest  Sr3D: far from 156, far away from 144                      farthest from
    between   Sr3D: in the center of 38, in the middle of 35             between
    on        Sr3D: lying on 5; ScanRefer: sitting on 40, placed on 19   on top of
    near      Sr3D (its closest rows): beside 22                         next to
    left      Sr3D: on the left side of 2, on the left of 1              to the left of
    right     Sr3D: on the right side of 6, on the right of 3            to the right of
    front     Nr3D: closer to you 2 (Sr3D has only "in front of")        in front of
    behind    ScanRefer 3 / Nr3D 3: on the far side of                   behind

The viewpoint is said as ScanRefer / Nr3D annotators say it, ``facing the north wall, ...`` ("facing the"
in 38 ScanRefer / 786 Nr3D texts), where the template says ``looking from the south side of the room towards
the north, ...``. Sizes as Nr3D says them: ``the largest`` 47 / ``the biggest`` 7 / ``the smallest`` 47.

Sentence frames (:data:`FRAMES`): two families, chosen per program with a seeded hash so the two files give
the same program the same text:

* Sr3D: ``[select|choose|pick] the T that is REL the A`` (Sr3D's first word: select 252, choose 251, find
  250, bare "the" 242, pick 5; "find" is left out because the prompt's question prefix holds it); views: ``facing the V wall, select the T that is REL the A``; multi-target: ``... the Ts that are
  REL the A``;
* ScanRefer: ``this is a brown chair. it is REL the table.`` (opening "this is a" 437, "there is a" 367,
  "it is a" 114 of the 2,000 ScanRefer texts; "it is ..." opens 2nd sentences), multi-target
  ``there are Ts. they are beside the A.``.

The tiny LLM's vocabulary (scene3d/llm/tiny.py) is NOT extended with these words: it is a fixed in-code word
list, never built from any data's frequencies. It already holds many of them (couch, bin, near, close, far,
middle, center, beside, this, is, that, ...), whose embeddings never train, since no training text holds
them; the others (select, choose, bookcase, cushion, ...) read as ``[UNK]``, whose embedding never trains
either. Either way the tiny model gets no trained signal from a paraphrase-only word, which is the point of
the split; keeping the list avoids changing the embedding shape (every saved tiny checkpoint) and the
random initialisation of the tiny model. ``scene3d eval`` reports those unknown words. SmolLM2's tokenizer
reads every word.
"""

from __future__ import annotations

import csv
import json
import re
import zlib
from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np

from data_prep import synth_refer as S
from scene3d.utils.io import write_json_atomic
from scene3d.utils.text import indefinite

#: synthetic label -> what real annotators write for it instead (counts: module doc)
SYNONYMS: dict[str, tuple[str, ...]] = {
    "sofa": ("couch",),
    "trash can": ("trashcan", "trash bin", "garbage can"),
    "nightstand": ("night stand",),
    "monitor": ("computer monitor", "screen"),
    "bookshelf": ("bookcase", "book shelf"),
    "pillow": ("cushion",),
    "box": ("cardboard box",),
}

#: op -> the relation phrases of this split (each followed by the anchor's noun phrase)
RELATIONS: dict[str, tuple[str, ...]] = {
    "closest": ("near", "close to", "closer to"),
    "farthest": ("far from", "far away from"),
    "between": ("in the middle of", "in the center of"),
    "on": ("lying on", "sitting on", "placed on"),
    "near": ("beside",),
    "left": ("on the left side of", "on the left of"),
    "right": ("on the right side of", "on the right of"),
    "front": ("closer to you than",),
    "behind": ("on the far side of",),
}
SIZES = {"large": ("largest", "biggest"), "small": ("smallest",)}
VERBS = ("select", "choose", "pick")
OPENINGS = ("this is", "there is", "it is")  # + indefinite noun phrase
FRAMES = ("sr3d", "scanrefer")

#: Real files the wording was counted in (paths under the real-data root, ``$SCENE3D_REAL_DATA``).
REAL_FILES = {
    "scanrefer": ("ripl__Transcrib3D/data/scanrefer/ScanRefer_filtered_train_sampled1000.json",
                  "ripl__Transcrib3D/data/scanrefer/ScanRefer_filtered_val_sampled1000.json"),
    "nr3d": ("ripl__Transcrib3D/data/referit3d/nr3d_test.csv",
             "ripl__Transcrib3D/data/referit3d/nr3d_train_sampled1000.csv"),
    "sr3d": ("ripl__Transcrib3D/data/referit3d/sr3d_test_sampled1000.csv",),
}
#: synthetic label -> the real annotation class whose texts are counted for its synonyms
REAL_CLASS = {"sofa": "couch"}
#: what :func:`count_real_wordings` finds (the module doc's tables); the test recounts
REAL_COUNTS = {
    "synonyms": {"sofa": {"couch": 162}, "trash can": {"trashcan": 66, "trash bin": 14, "garbage can": 8},
                 "nightstand": {"night stand": 3}, "monitor": {"computer monitor": 25, "screen": 19},
                 "bookshelf": {"bookcase": 13, "book shelf": 6}, "pillow": {"cushion": 6},
                 "box": {"cardboard box": 7}},
    "sr3d": {"closest": {"near": 119, "close to": 119, "closer to": 105},
             "farthest": {"far from": 156, "far away from": 144},
             "between": {"in the middle of": 35, "in the center of": 38},
             "on": {"lying on": 5}, "closest/beside": {"beside": 22},
             "left": {"on the left side of": 2, "on the left of": 1},
             "right": {"on the right side of": 6, "on the right of": 3}},
    "scanrefer": {"this is a": 437, "there is a": 367, "it is a": 114, "sitting on": 40, "placed on": 19,
                  "facing the": 38, "on the far side of": 3},
    "nr3d": {"closer to you": 2, "on the far side of": 3, "facing the": 786, "the largest": 47,
             "the biggest": 7, "the smallest": 47},
}


# ======================================================================================================
# rendering
# ======================================================================================================
def _pick(options, rng: np.random.Generator):
    return options[int(rng.integers(len(options)))]


def _noun(label: str, rng: np.random.Generator) -> str:
    return _pick(SYNONYMS[label], rng) if label in SYNONYMS else label


def _np(spec: dict, rng: np.random.Generator) -> str:
    """Definite noun phrase of an anchor spec, with the label's synonym."""
    return "the " + " ".join(w for w in (spec.get("color"), _noun(spec["label"], rng)) if w)


def _anchors(program: dict, rng: np.random.Generator) -> str:
    if program["op"] == "between":
        a, b = program["anchors"]
        return f"{_np(a, rng)} and {_np(b, rng)}"
    return _np(program["anchor"], rng)


def render_paraphrase(program: dict, rng: np.random.Generator) -> str:
    """A sentence of ``program`` in this split's wording (synonyms, Sr3D relations, ScanRefer / Sr3D frames;
    module doc). Same meaning as :func:`data_prep.synth_refer.render`, different words."""
    op, label = program["op"], program["label"]
    frame = _pick(FRAMES, rng)
    noun = _noun(label, rng)
    many = bool(program.get("all"))
    nouns = S.plural(noun)
    color = program.get("color")
    head = " ".join(w for w in (color, nouns if many else noun) if w)
    if op == "attr":
        size = _pick(SIZES[program["size"]], rng) if program.get("size") else None
        if frame == "sr3d":
            text = f"{_pick(VERBS, rng)} the {head}"
            return text + (f" that is the {size}" if size else "")
        text = f"there are {head}." if many else f"{_pick(OPENINGS, rng)} {indefinite(head)}."
        return text + (f" it is the {size} one." if size else "")
    rel = f"{_pick(RELATIONS[op], rng)} {_anchors(program, rng)}"
    view = f"facing the {program['view']} wall, " if op in S.VIEW_OPS else ""
    if frame == "sr3d":
        verb = _pick(VERBS + ("",), rng)
        verb = verb + " " if verb else ""
        return f"{view}{verb}the {head} that {'are' if many else 'is'} {rel}"
    if many:
        return f"there are {head}. {view}they are {rel}."
    return f"{_pick(OPENINGS, rng)} {indefinite(head)}. {view}it is {rel}."


def program_rng(seed: int, scene_id: str, program: dict) -> np.random.Generator:
    """The wording choices of one program in one scene: a function of (seed, scene, program) only, so the
    ScanRefer and Multi3DRefer twins of a program read the same and row order does not matter."""
    key = f"{seed}|{scene_id}|{json.dumps(program, sort_keys=True)}".encode()
    return np.random.default_rng([seed & 0xFFFFFFFF, zlib.crc32(key)])


# ======================================================================================================
# files
# ======================================================================================================
PARAPHRASE_FILES = {"scanrefer_val_paraphrase": "synth_scanrefer_val_paraphrase.json",
                    "multi3drefer_val_paraphrase": "synth_multi3drefer_val_paraphrase.json"}


def write_paraphrase_files(out_dir, layout: dict, seed: Optional[int] = None) -> dict[str, Path]:
    """Re-word the regular val files under ``out_dir/referring`` (module doc) and return {name: path}.

    Raises ValueError naming the file and row when a row's targets are not what its program evaluates to on
    the layout, or a regular file is missing (run :func:`data_prep.synth_refer.write_referring_files` first).
    """
    ref = Path(out_dir) / "referring"
    seed = int(layout.get("seed", 0) if seed is None else seed)
    scenes = layout.get("scenes") or {}
    objs = {sid: S.scene_objects(scenes[sid]) for sid in sorted(scenes)}
    paths: dict[str, Path] = {}
    for name, fname in PARAPHRASE_FILES.items():
        src = ref / fname.replace("_paraphrase", "")
        if not src.is_file():
            raise ValueError(f"{src}: regular val file missing; the paraphrase split re-words it")
        rows = json.loads(src.read_text(encoding="utf-8"))
        out = []
        for i, r in enumerate(rows):
            where = f"{src} row {i} ({r.get('scene_id')})"
            sid, program = r["scene_id"], r.get("program")
            if sid not in objs or not program:
                raise ValueError(f"{where}: no layout scene or no program to re-word")
            truth = S.evaluate(program, objs[sid])
            targets = r["object_ids"] if "object_ids" in r else [int(r["object_id"])]
            if sorted(int(t) for t in targets) != truth:
                raise ValueError(f"{where}: targets {targets} but the program evaluates to {truth}")
            text = render_paraphrase(program, program_rng(seed, sid, program))
            row = dict(r, description=text, wording="paraphrase")
            if "token" in r:
                row["token"] = S.tokenize(text)
            out.append(row)
        paths[name] = ref / fname
        write_json_atomic(paths[name], out)
    return paths


# ======================================================================================================
# where the wording comes from
# ======================================================================================================
def _has(text: str, phrase: str) -> bool:
    return re.search(r"\b" + re.escape(phrase) + r"\b", text) is not None


def count_real_wordings(real_root) -> dict:
    """Count this split's wordings in the real annotation subsets under ``real_root`` (:data:`REAL_FILES`):
    the same structure as :data:`REAL_COUNTS` (number of texts holding each phrase as whole words).
    Only counts leave this function; no real text is stored anywhere."""
    root = Path(real_root)
    by_class: dict[str, list[str]] = {}
    scanrefer, nr3d = [], []
    for rel in REAL_FILES["scanrefer"]:
        for e in json.loads((root / rel).read_text(encoding="utf-8-sig")):
            t = str(e["description"]).lower()
            scanrefer.append(t)
            by_class.setdefault(str(e["object_name"]).replace("_", " "), []).append(t)
    for rel in REAL_FILES["nr3d"]:
        with open(root / rel, newline="", encoding="utf-8-sig") as f:
            for r in csv.DictReader(f):
                t = r["utterance"].lower()
                nr3d.append(t)
                by_class.setdefault(r["instance_type"], []).append(t)
    sr3d: dict[str, list[str]] = {}
    with open(root / REAL_FILES["sr3d"][0], newline="", encoding="utf-8-sig") as f:
        for r in csv.DictReader(f):
            sr3d.setdefault(r["reference_type"], []).append(r["utterance"].lower())
    sr3d_op = {"closest": "closest", "farthest": "farthest", "between": "between", "on": "supported-by",
               "closest/beside": "closest", "left": "left", "right": "right"}
    want = REAL_COUNTS
    return {
        "synonyms": {label: {w: sum(_has(t, w) for t in by_class.get(REAL_CLASS.get(label, label), []))
                             for w in words} for label, words in want["synonyms"].items()},
        "sr3d": {op: {w: sum(_has(t, w) for t in sr3d.get(sr3d_op[op], [])) for w in words}
                 for op, words in want["sr3d"].items()},
        "scanrefer": {w: sum(_has(t, w) for t in scanrefer) for w in want["scanrefer"]},
        "nr3d": {w: sum(_has(t, w) for t in nr3d) for w in want["nr3d"]},
    }


def wording_words(text: str) -> Counter:
    """Words of a text as the project tokenizes synthetic text (lower case, punctuation apart)."""
    return Counter(w for w in S.tokenize(text) if re.match(r"[a-z0-9]", w))
