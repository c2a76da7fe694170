"""data_prep.paraphrase: the val programs re-worded; training never sees the split's words or frames, every
row keeps its twin's targets and program, the regular files do not change, the wording is counted in the
real annotations."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch

from data_prep import paraphrase as P
from data_prep.rewording import RENAME_P, SYNONYMS, phrasings, renamings, reword, reword_row, rewordings
from data_prep import synth_refer as S
from data_prep.synthetic import prepare_synthetic
from scene3d.data.assembly import alignment_rows
from scene3d.data.referring import read_jsonl
from scene3d.config import compose, to_objects
from scene3d.data.referring import ReferringDataset
from scene3d.llm.prompt import PromptConfig

COMPASS = ("north", "south", "east", "west")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return prepare_synthetic(tmp_path_factory.mktemp("parabench"), num_scenes=6, seed=2, progress=False)


def _layout(bench) -> dict:
    return json.loads((bench.root / "raw" / "synth_layout.json").read_text())


def training_texts(bench) -> list[str]:
    """Every text training reads: the train split of each file, the Sr3D rows of train scenes, the stage-1
    alignment rows of the train scenes."""
    layout = _layout(bench)
    train_scenes = sorted(s for s, v in layout["scenes"].items() if v["split"] == "train")
    rows = read_jsonl(bench.train) + read_jsonl(bench.extra["scanrefer_train"])
    rows += [r for r in read_jsonl(bench.extra["sr3d"]) if r["scene_id"] in train_scenes]
    rows += alignment_rows(bench.processed, train_scenes)
    assert rows
    return [r["text"] for r in rows]


def words(text: str) -> set[str]:
    return set(P.wording_words(text))


def frame(text: str, layout: dict) -> str:
    """The text with every class name (and synonym, and plurals), colour and compass word replaced: what is
    left is the frame (the words around the slots)."""
    labels = {o["label"] for s in layout["scenes"].values() for o in s["objects"]}
    colors = {o["color_name"] for s in layout["scenes"].values() for o in s["objects"]}
    nouns = labels | {w for syn in P.SYNONYMS.values() for w in syn}
    nouns |= {S.plural(n) for n in nouns}
    out = " " + " ".join(S.tokenize(text)) + " "
    for n in sorted(nouns, key=len, reverse=True):
        out = out.replace(f" {n} ", " <N> ")
    for w in (*colors, *COMPASS):
        out = re.sub(rf"\b{w}\b", "<W>", out)
    return out.strip()


def pairs(bench):
    """(regular row, paraphrase row) twins of both files, matched by (scene, ann_id)."""
    out = []
    for reg, para in (("val", "val_paraphrase"), ("scanrefer_val", "scanrefer_val_paraphrase")):
        regular = {(r["scene_id"], r["ann_id"]): r for r in read_jsonl(getattr(bench, reg, None)
                                                                        or bench.extra[reg])}
        rows = read_jsonl(bench.extra[para])
        assert rows and len(rows) == len(regular)
        for r in rows:
            out.append((regular[(r["scene_id"], r["ann_id"])], r))
    return out


def test_twins_keep_targets_and_program_and_differ_in_wording(bench):
    layout = _layout(bench)
    for reg, para in pairs(bench):
        assert para["targets"] == reg["targets"] and para["program"] == reg["program"]
        assert para["eval_type"] == reg["eval_type"] and para["unique"] == reg["unique"]
        objs = S.scene_objects(layout["scenes"][para["scene_id"]])
        assert S.evaluate(para["program"], objs) == para["targets"]
        assert para["text"] != reg["text"]
        assert frame(para["text"], layout) != frame(reg["text"], layout)
        assert para["dataset"] == reg["dataset"] + "_paraphrase"
        assert layout["scenes"][para["scene_id"]]["split"] == "val"


def test_training_never_sees_the_paraphrase_words_or_frames(bench):
    assert_disjoint_from_split(training_texts(bench), bench)


def test_rewording_never_uses_the_paraphrase_words_or_frames(bench):
    # every wording data.rewording may give a training row (data_prep/rewording.py) is held to the same checks
    # Every phrasing in every request frame with the classes' own names, and every phrasing with every
    # renaming of the classes (data_prep.rewording.SYNONYMS). A renaming only swaps the class nouns, so its
    # texts in request frames hold nothing more of the split than these two sets do (checked below: no
    # training synonym holds a word of the split's synonyms); listing that product too would take minutes.
    progs = list({json.dumps(r["program"], sort_keys=True): r["program"] for r in read_jsonl(bench.train)}.values())
    texts = [t for prog in progs for t in rewordings(prog, synonyms=False)]
    texts += [t for prog in progs for renamed in renamings(prog) for t in phrasings(renamed)]
    assert len(texts) > 3 * len(progs)
    assert_disjoint_from_split(texts, bench)
    split_words = set().union(*(words(syn) for syns in P.SYNONYMS.values() for syn in syns))
    for label, syns in SYNONYMS.items():
        for syn in syns:
            assert not words(syn) & split_words, (label, syn)


def test_rewording_in_the_training_dataset(bench):
    rows = read_jsonl(bench.train)
    plain = ReferringDataset(bench.processed, bench.train, max_points=500, rows=rows, questions_per_scene=4)
    varied = ReferringDataset(bench.processed, bench.train, max_points=500, rows=rows, questions_per_scene=4,
                              rewording=1.0, reworder=reword_row)
    changed = 0
    for idx in range(len(plain)):
        a, b = plain[idx], varied[idx]
        assert torch.equal(a["points"]["coord"], b["points"]["coord"])  # same subsample and augmentation
        for ra, rb in zip(a["samples"], b["samples"]):
            assert ra["text"] == S.render(ra["program"])
            assert rb["targets"] == ra["targets"] and rb["program"] == ra["program"]
            others = rewordings(ra["program"])[1:]
            assert (rb["text"] in others) if others else rb["text"] == ra["text"]
            changed += rb["text"] != ra["text"]
    assert changed > 0
    varied.set_epoch(1)
    assert [r["text"] for r in varied[0]["samples"]] != [r["text"] for r in plain[0]["samples"]]
    with pytest.raises(ValueError, match="rewording"):
        ReferringDataset(bench.processed, bench.train, rows=rows, rewording=1.5, reworder=reword_row)
    with pytest.raises(ValueError, match="needs a reworder"):
        ReferringDataset(bench.processed, bench.train, rows=rows, rewording=0.5)
    with pytest.raises(ValueError, match="data.rewording"):
        to_objects(compose("train", ["data.rewording=-0.1"]))


def assert_disjoint_from_split(texts, bench):
    """No text of ``texts`` holds a word, phrase or frame of the paraphrase split, and every paraphrase row
    holds a word none of them has."""
    layout = _layout(bench)
    seen = set().union(*(words(t) for t in texts))
    joined = [" " + " ".join(S.tokenize(t)) + " " for t in texts]
    train_frames = {frame(t, layout) for t in texts}

    def in_training(phrase: str) -> bool:
        p = " " + " ".join(S.tokenize(phrase)) + " "
        return any(p in t for t in joined)

    # the split's own vocabulary: synonyms, relation phrases, sizes, verbs, openings, the viewpoint words
    for label, syns in P.SYNONYMS.items():
        for syn in syns:
            assert not in_training(syn), (label, syn)
    for op, phrases in P.RELATIONS.items():
        for phrase in phrases:
            assert not in_training(phrase), (op, phrase)
    for w in (*[s for v in P.SIZES.values() for s in v], *P.VERBS, "facing", "wall", "is", "are", "that",
              "there", "they", "it", "this"):
        assert w not in seen, w
    for opening in P.OPENINGS:
        assert not in_training(opening)
    # the verbs are not in the prompt either ("find" is, so the split does not use it)
    prompt = PromptConfig()
    assert not set(P.VERBS) & words(" ".join([prompt.system, prompt.question_prefix, prompt.chat_question]))
    rows = [p for _, p in pairs(bench)]
    for r in rows:
        assert words(r["text"]) - seen, r["text"]  # every row holds a word training never saw
        assert frame(r["text"], layout) not in train_frames, r["text"]
    # a label with synonyms is always written as one of them
    for r in rows:
        text = " " + " ".join(S.tokenize(r["text"])) + " "
        for label, syns in P.SYNONYMS.items():
            for syn in sorted(syns, key=len, reverse=True):
                text = text.replace(f" {syn} ", " _ ").replace(f" {S.plural(syn)} ", " _ ")
            assert f" {label} " not in text and f" {S.plural(label)} " not in text, r["text"]


def test_split_covers_every_op_and_synonyms(bench):
    rows = [p for _, p in pairs(bench)]
    ops = {r["program"]["op"] for r in rows}
    assert {"attr", "closest", "farthest", "near"} <= ops
    used = " ".join(r["text"] for r in rows)
    assert sum(any(re.search(rf"\b{s}\b", used) for s in syns) for syns in P.SYNONYMS.values()) >= 3
    assert {0, 1} <= {min(len(r["targets"]), 2) for r in rows}


def test_same_program_same_text_in_both_files(bench):
    multi = {(r["scene_id"], json.dumps(r["program"], sort_keys=True)): r["text"]
             for r in read_jsonl(bench.extra["val_paraphrase"])}
    sr = read_jsonl(bench.extra["scanrefer_val_paraphrase"])
    assert sr
    for r in sr:
        assert multi[(r["scene_id"], json.dumps(r["program"], sort_keys=True))] == r["text"]


def test_raw_files_marked_and_regular_files_unchanged(bench, tmp_path):
    raw = bench.root / "raw"
    ref = raw / "referring"
    layout = _layout(bench)
    for name in P.PARAPHRASE_FILES.values():
        rows = json.loads((ref / name).read_text())
        assert rows and all(r["wording"] == "paraphrase" for r in rows)
        regular = json.loads((ref / name.replace("_paraphrase", "")).read_text())
        assert all("wording" not in r for r in regular)
        if "token" in rows[0]:
            assert all(r["token"] == S.tokenize(r["description"]) for r in rows)
    # the regular files written alone (no paraphrase writer) have the same bytes
    alone = S.write_referring_files(tmp_path / "alone", layout, layout["seed"])
    for path in alone.values():
        assert path.read_bytes() == (ref / path.name).read_bytes(), path.name
    # and writing the split again gives the same bytes
    again = P.write_paraphrase_files(tmp_path / "alone", layout)
    for path in again.values():
        assert path.read_bytes() == (ref / path.name).read_bytes(), path.name


def test_wrong_targets_and_missing_files_are_errors(bench, tmp_path):
    layout = _layout(bench)
    with pytest.raises(ValueError, match="regular val file missing"):
        P.write_paraphrase_files(tmp_path / "empty", layout)
    shutil.copytree(bench.root / "raw" / "referring", tmp_path / "r" / "referring")
    path = tmp_path / "r" / "referring" / "synth_multi3drefer_val.json"
    rows = json.loads(path.read_text())
    i = next(i for i, r in enumerate(rows) if r["object_ids"])
    rows[i]["object_ids"] = [9999]
    path.write_text(json.dumps(rows))
    with pytest.raises(ValueError, match=rf"synth_multi3drefer_val.json row {i} .*9999"):
        P.write_paraphrase_files(tmp_path / "r", layout)


def test_render_paraphrase_per_op():
    rng = P.program_rng(0, "scene5000_00", {"op": "attr"})
    anchor = {"label": "sofa", "color": None}
    progs = [{"op": "attr", "label": "trash can", "color": "red", "size": "large", "all": False},
             {"op": "attr", "label": "chair", "color": "red", "size": None, "all": True},
             {"op": "closest", "label": "chair", "anchor": anchor},
             {"op": "farthest", "label": "chair", "anchor": anchor},
             {"op": "left", "label": "chair", "anchor": anchor, "view": "north"},
             {"op": "between", "label": "chair", "anchors": [anchor, {"label": "desk", "color": "brown"}]},
             {"op": "on", "label": "pillow", "anchor": {"label": "bed", "color": None}},
             {"op": "near", "label": "chair", "anchor": anchor, "all": True}]
    for p in progs:
        for _ in range(8):
            text = P.render_paraphrase(p, rng)
            assert text != S.render(p)
            toks = S.tokenize(text)
            assert "sofa" not in toks and "closest" not in toks and "farthest" not in toks
            if p["op"] == "left":
                assert "facing the north wall, " in text and "left" in toks
            if p.get("all"):
                assert "chairs" in toks
            if p["op"] == "between":
                assert "brown desk" in text and "couch" in toks
    assert P.render_paraphrase(progs[0], P.program_rng(1, "s", progs[0])) == \
        P.render_paraphrase(progs[0], P.program_rng(1, "s", progs[0]))


def test_wording_counted_in_the_real_annotations(real_data):
    """The counts in the module doc are what the real files hold, and every phrase the split uses occurs there."""
    counts = P.count_real_wordings(real_data)
    assert counts == P.REAL_COUNTS
    for label, syns in P.SYNONYMS.items():
        assert all(counts["synonyms"][label][s] >= 1 for s in syns), label
    found = {phrase: n for group in ("scanrefer", "nr3d") for phrase, n in counts[group].items()}
    found.update({phrase: n for per_op in counts["sr3d"].values() for phrase, n in per_op.items()})
    for phrase in [p for v in P.RELATIONS.values() for p in v] + [f"the {s}" for v in P.SIZES.values() for s in v]:
        assert any(phrase.startswith(q) and n >= 1 for q, n in found.items()), phrase
    for opening in P.OPENINGS:
        assert found[opening + " a"] >= 1


def test_rewordings_keep_the_program_slots_and_each_op_its_own_words(bench):
    # every wording still names the target class, the colour, the anchors and the view: the targets
    # stay exact; "close ..." belongs to the closest op only (Sr3D's "close to" is closest), so the near op's
    # wordings never hold it; relations are also said in a clause or a second sentence ("a chair. the one ...")
    progs = {json.dumps(r["program"], sort_keys=True): r["program"] for r in read_jsonl(bench.train)}
    ops = set()
    for prog in progs.values():
        texts = rewordings(prog)
        ops.add(prog["op"])
        for t in texts:
            padded = " " + " ".join(S.tokenize(t)) + " "
            names = (prog["label"], *SYNONYMS.get(prog["label"], ()))
            assert any(f" {n} " in padded or f" {S.plural(n)} " in padded for n in names), t
            for spec in prog.get("anchors") or ([prog["anchor"]] if "anchor" in prog else []):
                assert any(" " + " ".join(S.tokenize(S.noun_phrase({**spec, "label": n}))) + " " in padded
                           for n in (spec["label"], *SYNONYMS.get(spec["label"], ()))), (t, spec)
            if prog.get("color"):
                assert f" {prog['color']} " in padded, t
            if prog.get("view"):  # said as the direction looked in, or the side looked from
                assert f" {prog['view']} " in padded or f" {S.OPPOSITE[prog['view']]} " in padded, t
            if prog["op"] == "near":
                assert not any(w.startswith("clos") for w in words(t)), t
        if prog["op"] != "attr":
            assert any(". the one" in t for t in texts), prog
        if prog["op"] == "closest":
            assert any("closest" in words(t) for t in texts)
    assert {"closest", "farthest", "near", "on"} <= ops


def test_reword_renames_classes_with_training_synonyms_only():
    # about RENAME_P of the draws name the classes otherwise, target and anchor alike, and only by
    # data_prep.rewording.SYNONYMS (never the split's); the other draws keep the names
    prog = {"op": "closest", "label": "sofa", "anchor": {"label": "box", "color": "red"}}
    rng = np.random.default_rng(0)
    texts = [reword(prog, rng) for _ in range(600)]
    renamed = [t for t in texts if not words(t) & {"sofa", "sofas"}]
    assert all(words(t) & {"settee", "settees"} for t in renamed)
    assert abs(len(renamed) / len(texts) - RENAME_P) < 0.06
    anchors = [t for t in renamed if "red box" not in t]
    assert anchors and all(("red carton" in t) or ("red crate" in t) for t in anchors)
    split = set().union(*(words(s) for syns in P.SYNONYMS.values() for s in syns))
    assert not set().union(*(words(t) for t in texts)) & (split - {"box", "monitor", "can", "trash"})
    # whole sentences are said as they are, never inside a request frame
    assert all(t.count(".") <= 2 and ".." not in t and not re.search(r"\w look at", t) for t in texts)
    assert any(t.endswith(". the one closest to the red box.") for t in texts)
