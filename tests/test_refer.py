"""data_prep.refer: readers of ScanRefer / Multi3DRefer / Nr3D / Sr3D, checked on the real subsets against
independent oracles (3D-STMN lookup.json for unique/multiple, ZSVG3D's Nr3D easy/view_dep), plus hand-made
files for the formats and the errors."""

from __future__ import annotations

import csv
import json
import logging
import re
from collections import defaultdict

import pytest

from data_prep import refer as R

TSV = "daveredrum__ScanRefer/data/scannet/meta_data/scannetv2-labels.combined.tsv"
SCANREFER = "ripl__Transcrib3D/data/scanrefer/"
REFERIT = "ripl__Transcrib3D/data/referit3d/"
AGG = "fatPeter__ThreeDAC/dataset/Scannet_v2/scans/scene0011_00/scene0011_00.aggregation.json"
SCANREFER_FILES = ["ScanRefer_filtered_val_sampled1000.json", "ScanRefer_filtered_train_sampled1000.json",
                   "ScanRefer_filtered_sampled50.json", "ScanRefer_filtered_sampled50_2.json",
                   "ScanRefer_filtered_train_ordinal.json"]


# ------------------------------------------------------------------------------------------------------
# real data
# ------------------------------------------------------------------------------------------------------
def _known_labels(root) -> dict:
    """{scene: {object_id: raw label}} from every real source that names objects: ScanRefer subsets
    (object_name), scene0011_00's aggregation (all 33 objects), Nr3D/Sr3D (instance_type, Sr3D anchors)."""
    labels: dict = defaultdict(dict)
    for f in SCANREFER_FILES:
        for e in json.loads((root / SCANREFER / f).read_text()):
            labels[e["scene_id"]][int(e["object_id"])] = e["object_name"].replace("_", " ")
    for g in json.loads((root / AGG).read_text())["segGroups"]:
        labels["scene0011_00"][int(g["objectId"])] = g["label"]
    for f in ["nr3d_test.csv", "nr3d_train_sampled1000.csv", "sr3d_test_sampled1000.csv"]:
        with open(root / REFERIT / f, newline="") as fh:
            for e in csv.DictReader(fh):
                labels[e["scan_id"]][int(e["target_id"])] = e["instance_type"]
                if "anchor_ids" in e:
                    for a, t in zip(R.parse_list_literal(e["anchor_ids"], f), R.parse_list_literal(e["anchors_types"], f)):
                        labels[e["scan_id"]][int(a)] = t
    return labels


def test_scanrefer_unique_matches_3dstmn_lookup(real_data, tmp_path):
    """ScanRefer's rule (population = described objects) reproduces every published flag where our real data
    labels every described object; counting all objects of the scan instead contradicts the oracle."""
    raw2nyu = R.load_label_map(real_data / TSV)
    lookup = json.loads((real_data / "sosppxo__3D-STMN/data/lookup.json").read_text())
    labels = _known_labels(real_data)
    # lookup.json's keys are exactly the objects ScanRefer describes in each scene
    covered = {s: {int(o): labels[s][int(o)] for o in objs} for s, objs in lookup.items()
               if all(int(o) in labels[s] for o in objs)}
    uniq = R.unique_objects(covered, raw2nyu)
    n_ann = 0
    for s, objs in covered.items():
        for o in objs:
            for ann, v in lookup[s][str(o)].items():
                assert uniq[s][o] == (v == 0), (s, o, ann, labels[s][o])   # lookup value 0 = unique
                n_ann += 1
    print(f"\nunique/multiple oracle coverage: {len(covered)}/{len(lookup)} scenes, {n_ann} annotations")
    assert len(covered) >= 10 and n_ann >= 500, "oracle coverage too small to mean anything"
    assert "scene0011_00" in covered

    # end to end through the reader: the ScanRefer subset rows of covered scenes, with that population
    rows_in = [e for f in SCANREFER_FILES for e in json.loads((real_data / SCANREFER / f).read_text())
               if e["scene_id"] in covered]
    dedup = {(e["scene_id"], e["object_id"], e["ann_id"]): e for e in rows_in}
    (tmp_path / "sub.json").write_text(json.dumps(list(dedup.values())))
    rows = R.read_scanrefer(tmp_path / "sub.json", raw2nyu, population=covered)
    assert len(rows) >= 20
    for r in rows:
        oid, ann = r["ann_id"].split("_")
        assert r["unique"] == (lookup[r["scene_id"]][oid][ann] == 0) and r["multiple"] == (not r["unique"])

    # the alternative (every object of the scan) contradicts the published flags
    contradictions = 0
    for s, objs in lookup.items():
        for o, anns in objs.items():
            if int(o) not in labels[s]:
                continue
            c = R.scanrefer_class(labels[s][int(o)], raw2nyu)
            same = [i for i, lab in labels[s].items() if i != int(o) and R.scanrefer_class(lab, raw2nyu) == c]
            contradictions += next(iter(anns.values())) == 0 and bool(same)
    assert contradictions > 0


def test_scanrefer_reader_real(real_data):
    raw2nyu = R.load_label_map(real_data / TSV)
    rows = R.read_scanrefer(real_data / SCANREFER / "ScanRefer_filtered_val_sampled1000.json", raw2nyu)
    assert len(rows) == 1000 and len({r["scene_id"] for r in rows}) == 138
    assert sum(r["scene_id"] == "scene0011_00" for r in rows) == 6
    assert all(set(r) == set(R.ROW_KEYS) and len(r["targets"]) == 1 and r["text"] for r in rows)
    assert len({(r["scene_id"], r["ann_id"]) for r in rows}) == 1000


def test_label_maps_agree(real_data):
    a = R.load_label_map(real_data / TSV)
    b = R.load_label_map(real_data / "Pointcept__Pointcept/pointcept/datasets/preprocessing/scannet/meta_data/"
                         "scannetv2-labels.combined.tsv")  # mixed CRLF / CR line endings
    assert len(a) == 607 and len(b) == 606 and all(a[k] == b[k] for k in b)
    assert R.scanrefer_class("kitchen_counter", a) == "counter" and R.scanrefer_class("tv", a) == "others"


def test_nr3d_easy_and_view_dep_match_zsvg3d(real_data):
    """ZSVG3D ships referit3d's easy / view_dep flags for 7457 Nr3D test utterances: an independent oracle."""
    rows = R.read_nr3d(real_data / REFERIT / "nr3d_test.csv")
    assert len(rows) == 7485 and sum(r["scene_id"] == "scene0011_00" for r in rows) == 55
    norm = lambda s: re.sub("[^a-z0-9]", "", s.lower())  # noqa: E731  (ZSVG3D re-spaced the captions)
    index = defaultdict(list)
    for r in rows:
        index[(r["scene_id"], r["targets"][0], norm(r["text"]))].append(r)
    matched = 0
    for q in json.loads((real_data / "CurryYuan__ZSVG3D/data/nr3d_val.json").read_text()):
        hits = index.get((q["scan_id"], q["target_id"], norm(q["caption"])))
        if hits:
            matched += 1
            assert all(h["easy"] == q["easy"] and h["view_dep"] == q["view_dep"] for h in hits), q
    print(f"\nNr3D easy/view_dep oracle coverage: {matched}/7457 utterances")
    assert matched >= 6000
    for r in rows:
        st = R.decode_stimulus_id(r["ann_id"].split("#")[0])
        assert r["distractors"] == st.distractor_ids and len(st.distractor_ids) == st.n_objects - 1
        assert r["easy"] == (len(r["distractors"]) <= 1)


def test_sr3d_reader_real(real_data):
    rows = R.read_sr3d(real_data / REFERIT / "sr3d_test_sampled1000.csv")
    assert len(rows) == 1000
    for r in rows:
        st = R.decode_stimulus_id(r["ann_id"].split("#")[0])
        assert sorted(r["distractors"]) == sorted(st.distractor_ids)   # column agrees with the stimulus id
        assert r["anchors"] and all(isinstance(a, int) for a in r["anchors"])
        assert r["targets"][0] not in r["anchors"]
    assert {r["view_dep"] for r in rows} == {True, False}


# ------------------------------------------------------------------------------------------------------
# hand-made files
# ------------------------------------------------------------------------------------------------------
LABELS = {"chair": 5, "table": 7, "tv": 25, "trash can": 39, "kitchen counter": 12, "wall": 1}


def _scanrefer_entry(scene, oid, name, ann, text="a thing"):
    return {"scene_id": scene, "object_id": str(oid), "object_name": name, "ann_id": str(ann), "description": text,
            "token": text.split()}


def test_scanrefer_unique_hand_made(tmp_path):
    entries = [_scanrefer_entry("scene0001_00", 1, "chair", 0), _scanrefer_entry("scene0001_00", 2, "chair", 0),
               _scanrefer_entry("scene0001_00", 3, "table", 0), _scanrefer_entry("scene0001_00", 3, "table", 1),
               _scanrefer_entry("scene0001_00", 4, "tv", 0), _scanrefer_entry("scene0001_00", 5, "trash_can", 0),
               _scanrefer_entry("scene0001_00", 6, "kitchen_counter", 0),
               _scanrefer_entry("scene0002_00", 1, "tv", 0), _scanrefer_entry("scene0002_00", 2, "mystery", 0)]
    (tmp_path / "s.json").write_text(json.dumps(entries))
    rows = R.read_scanrefer(tmp_path / "s.json", LABELS)
    got = {(r["scene_id"], r["ann_id"]): r["unique"] for r in rows}
    assert got == {("scene0001_00", "1_0"): False, ("scene0001_00", "2_0"): False,  # two chairs
                   ("scene0001_00", "3_0"): True, ("scene0001_00", "3_1"): True,    # one table, 2 descriptions
                   ("scene0001_00", "4_0"): False, ("scene0001_00", "5_0"): False,  # tv + trash can: both others
                   ("scene0001_00", "6_0"): True,                                   # counter class
                   ("scene0002_00", "1_0"): False, ("scene0002_00", "2_0"): False}  # unknown label -> others
    assert rows[5]["object_name"] == "trash can"
    with pytest.raises(ValueError, match="not in the uniqueness population"):
        R.read_scanrefer(tmp_path / "s.json", LABELS, population={"scene0001_00": {1: "chair"}})


def test_bad_scanrefer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        R.read_scanrefer(tmp_path / "nope.json", LABELS)
    (tmp_path / "a.json").write_text("{not json")
    with pytest.raises(R.ReferFormatError, match="a.json"):
        R.read_scanrefer(tmp_path / "a.json", LABELS)
    (tmp_path / "b.json").write_text(json.dumps({"x": 1}))
    with pytest.raises(R.ReferFormatError, match="JSON list"):
        R.read_scanrefer(tmp_path / "b.json", LABELS)
    (tmp_path / "c.json").write_text(json.dumps([{"scene_id": "scene0001_00"}]))
    with pytest.raises(R.ReferFormatError, match="missing keys"):
        R.read_scanrefer(tmp_path / "c.json", LABELS)
    (tmp_path / "d.json").write_text(json.dumps([_scanrefer_entry("kitchen", 1, "chair", 0)]))
    with pytest.raises(R.ReferFormatError, match="scene id"):
        R.read_scanrefer(tmp_path / "d.json", LABELS)
    (tmp_path / "e.json").write_text(json.dumps([_scanrefer_entry("scene0001_00", "x1", "chair", 0)]))
    with pytest.raises(R.ReferFormatError, match="object_id"):
        R.read_scanrefer(tmp_path / "e.json", LABELS)
    (tmp_path / "f.json").write_text(json.dumps([_scanrefer_entry("scene0001_00", 1, "chair", 0)] * 2))
    with pytest.raises(R.ReferFormatError, match="duplicate"):
        R.read_scanrefer(tmp_path / "f.json", LABELS)


def test_multi3drefer_reader(tmp_path):
    def e(ann, ids, et):
        return {"scene_id": "scene0003_00", "object_name": "chair", "ann_id": ann, "description": "the chairs",
                "object_ids": ids, "eval_type": et, "spatial": False}
    (tmp_path / "m.json").write_text(json.dumps([e(0, [], "zt_w_d"), e(1, [4], "st_wo_d"), e(2, [7, 3], "mt")]))
    rows = R.read_multi3drefer(tmp_path / "m.json")
    assert [r["targets"] for r in rows] == [[], [4], [3, 7]]
    assert [r["eval_type"] for r in rows] == ["zt_w_d", "st_wo_d", "mt"] and rows[0]["unique"] is None
    for bad, msg in [(e(0, [], "zz"), "eval_type"), (e(0, [1], "zt_wo_d"), "1 targets"), (e(0, [1], "mt"), "mt"),
                     (e(0, "1", "st_w_d"), "list")]:
        (tmp_path / "b.json").write_text(json.dumps([bad]))
        with pytest.raises(R.ReferFormatError, match=msg):
            R.read_multi3drefer(tmp_path / "b.json")
    # the optional anchor_ids (the synthetic files carry them): sorted, distinct; [] or absent -> None
    (tmp_path / "a.json").write_text(json.dumps([dict(e(0, [4], "st_wo_d"), anchor_ids=[5, 2, 5]),
                                                 dict(e(1, [4], "st_wo_d"), anchor_ids=[]), e(2, [4], "st_wo_d")]))
    assert [r["anchors"] for r in R.read_multi3drefer(tmp_path / "a.json")] == [[2, 5], None, None]
    for ids, msg in [("5", "anchor_ids must be a list"), ([-1], r"anchor_ids\[\]"), (["x"], r"anchor_ids\[\]")]:
        (tmp_path / "b.json").write_text(json.dumps([dict(e(0, [4], "st_wo_d"), anchor_ids=ids)]))
        with pytest.raises(R.ReferFormatError, match=rf"b\.json entry 0: {msg}"):
            R.read_multi3drefer(tmp_path / "b.json")


def test_decode_stimulus_id():
    assert R.decode_stimulus_id("scene0565_00-chair-4-25-0-1-24") == R.Stimulus("scene0565_00", "chair", 4, 25,
                                                                                 [0, 1, 24])
    assert R.decode_stimulus_id("scene0001_00-trash_can-1-3") == R.Stimulus("scene0001_00", "trash can", 1, 3, [])
    assert R.decode_stimulus_id("scene0001_00-t-shirt-2-3-9").instance_label == "t-shirt"
    for bad in ["scene0001_00-chair-3-25-1", "scene0001_00", "scene0001_00-chair-x-1"]:
        with pytest.raises(R.ReferFormatError, match="stimulus_id"):
            R.decode_stimulus_id(bad)


def test_token_lists_parsed_without_eval():
    assert R.parse_list_literal("['the', 'chair']", "t") == ["the", "chair"]
    for bad in ["__import__('os').system('true')", "['a'", "{'a': 1}"]:
        with pytest.raises(R.ReferFormatError):
            R.parse_list_literal(bad, "t")
    assert R.is_view_dependent(["the", "leftmost", "chair"]) and not R.is_view_dependent(["the", "left-most"])


def _nr3d_csv(path, rows):
    cols = ["stimulus_id", "utterance", "correct_guess", "speaker_id", "listener_id", "scan_id", "instance_type",
            "target_id", "tokens", "dataset", "mentions_target_class", "uses_object_lang", "uses_spatial_lang",
            "uses_color_lang", "uses_shape_lang", "is_train"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in cols})


def test_nr3d_hand_made_and_errors(tmp_path):
    good = {"stimulus_id": "scene0001_00-chair-2-5-6", "utterance": "facing the bed, the chair",
            "scan_id": "scene0001_00", "instance_type": "chair", "target_id": "5",
            "tokens": "['facing', 'the', 'bed', ',', 'the', 'chair']"}
    _nr3d_csv(tmp_path / "n.csv", [good, {**good, "stimulus_id": "scene0001_00-chair-3-5-6-7",
                                          "tokens": "['the', 'chair']"}])
    rows = R.read_nr3d(tmp_path / "n.csv")
    assert [r["ann_id"] for r in rows] == ["scene0001_00-chair-2-5-6#0", "scene0001_00-chair-3-5-6-7#1"]
    assert [(r["easy"], r["view_dep"], r["distractors"]) for r in rows] == [(True, True, [6]), (False, False, [6, 7])]
    _nr3d_csv(tmp_path / "x.csv", [{**good, "target_id": "9"}])
    with pytest.raises(R.ReferFormatError, match="disagrees"):
        R.read_nr3d(tmp_path / "x.csv")
    _nr3d_csv(tmp_path / "y.csv", [{**good, "tokens": "os.system('x')"}])
    with pytest.raises(R.ReferFormatError, match="tokens"):
        R.read_nr3d(tmp_path / "y.csv")
    (tmp_path / "z.csv").write_text("a,b\n1,2\n")
    with pytest.raises(R.ReferFormatError, match="missing nr3d columns"):
        R.read_nr3d(tmp_path / "z.csv")


def _row(scene, targets, **kw):
    r = {k: None for k in R.ROW_KEYS}
    r.update(dataset="sr3d", ann_id=f"{scene}-{targets}", scene_id=scene, targets=targets, text="t", **kw)
    return r


def test_write_and_filter_against_processed(tmp_path, caplog):
    proc = tmp_path / "processed"
    (proc / "scene0001_00").mkdir(parents=True)
    (proc / "scene0001_00" / "objects.json").write_text(json.dumps(
        {"objects": [{"object_id": i, "label": "chair"} for i in range(4)]}))
    rows = [_row("scene0001_00", [1], anchors=[2]), _row("scene0002_00", [1]), _row("scene0001_00", [9]),
            _row("scene0001_00", [1], anchors=[8]), _row("scene0001_00", [], distractors=[3])]
    with caplog.at_level(logging.WARNING):
        rep = R.filter_against_processed(rows, proc)
    assert [r["ann_id"] for r in rep.kept] == [rows[0]["ann_id"], rows[4]["ann_id"]]
    assert rep.reasons == {"missing_scene": 1, "missing_targets": 1, "missing_anchors": 1}
    assert "dropped 3 of 5" in caplog.text and "scene0002_00" in caplog.text
    n = R.write_refer_jsonl(rep.kept, tmp_path / "out.jsonl")
    assert n == 2 and R.read_refer_jsonl(tmp_path / "out.jsonl") == rep.kept
    with pytest.raises(ValueError, match="row format"):
        R.write_refer_jsonl([{"dataset": "x"}], tmp_path / "bad.jsonl")
    assert not (tmp_path / "bad.jsonl").exists()
    with pytest.raises(FileNotFoundError):
        R.filter_against_processed(rows, tmp_path / "none")


def test_prep_refer_cli(tmp_path, capsys):
    from scene3d.cli import main

    entries = [_scanrefer_entry("scene0001_00", 1, "chair", 0), _scanrefer_entry("scene0001_00", 2, "table", 0)]
    (tmp_path / "s.json").write_text(json.dumps(entries))
    (tmp_path / "l.tsv").write_text("id\traw_category\tnyu40id\n1\tchair\t5\n2\ttable\t7\n")
    out = tmp_path / "o.jsonl"
    assert main(["prep", "refer", "--dataset", "scanrefer", str(tmp_path / "s.json"), "--out", str(out),
                 "--labels", str(tmp_path / "l.tsv"), "--no-progress"]) == 0
    rows = R.read_refer_jsonl(out)
    assert [r["unique"] for r in rows] == [True, True] and "wrote 2" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--labels"):
        main(["prep", "refer", "--dataset", "scanrefer", str(tmp_path / "s.json"), "--out", str(out)])


def test_files_saved_with_a_bom_read_like_plain_utf8(tmp_path):
    """Spreadsheet programs save csv with a UTF-8 BOM; it must not hide the first column (stimulus_id)."""
    good = {"stimulus_id": "scene0001_00-chair-2-5-6", "utterance": "the chair", "scan_id": "scene0001_00",
            "instance_type": "chair", "target_id": "5", "tokens": "['the', 'chair']"}
    _nr3d_csv(tmp_path / "plain.csv", [good])
    bom = b"\xef\xbb\xbf"
    (tmp_path / "bom.csv").write_bytes(bom + (tmp_path / "plain.csv").read_bytes())
    assert R.read_nr3d(tmp_path / "bom.csv") == R.read_nr3d(tmp_path / "plain.csv")
    (tmp_path / "s.json").write_bytes(bom + json.dumps([_scanrefer_entry("scene0001_00", 1, "chair", 0)]).encode())
    (tmp_path / "l.tsv").write_bytes(bom + b"id\traw_category\tnyu40id\n1\tchair\t5\n")
    raw2nyu = R.load_label_map(tmp_path / "l.tsv")
    assert raw2nyu == {"chair": 5}
    rows = R.read_scanrefer(tmp_path / "s.json", raw2nyu)
    assert [r["targets"] for r in rows] == [[1]]
    R.write_refer_jsonl(rows, tmp_path / "o.jsonl")
    (tmp_path / "bom.jsonl").write_bytes(bom + (tmp_path / "o.jsonl").read_bytes())
    assert R.read_refer_jsonl(tmp_path / "bom.jsonl") == rows


def test_filter_against_an_mmdet_export_dir(real_data):
    """An mmdetection3d export has no objects.json; its objects come from the scene loader."""
    export = real_data / "open-mmlab__mmdetection3d/tests/data/scannet/scannet_train_instance_data"
    objs = R.load_processed_objects(export, "scene0000_01")
    assert 0 in objs and all(isinstance(o["label"], str) for o in objs.values())
    rows = [_row("scene0000_01", [0]), _row("scene0000_01", [999]), _row("scene0777_00", [0])]
    rep = R.filter_against_processed(rows, export)
    assert rep.kept == rows[:1] and rep.reasons == {"missing_targets": 1, "missing_scene": 1}


def test_prep_refer_cli_refuses_to_write_nothing(tmp_path):
    from scene3d.cli import main

    (tmp_path / "s.json").write_text(json.dumps([_scanrefer_entry("scene0001_00", 1, "chair", 0)]))
    (tmp_path / "l.tsv").write_text("id\traw_category\tnyu40id\n1\tchair\t5\n")
    (tmp_path / "processed").mkdir()
    out = tmp_path / "o.jsonl"
    out.write_text("earlier\n")
    with pytest.raises(SystemExit, match="all 1 rows .* dropped .*missing_scene=1.* not written"):
        main(["prep", "refer", "--dataset", "scanrefer", str(tmp_path / "s.json"), "--out", str(out),
              "--labels", str(tmp_path / "l.tsv"), "--processed", str(tmp_path / "processed"), "--no-progress"])
    assert out.read_text() == "earlier\n"
    (tmp_path / "none.json").write_text("[]")
    with pytest.raises(SystemExit, match="no multi3drefer rows"):
        main(["prep", "refer", "--dataset", "multi3drefer", str(tmp_path / "none.json"), "--out", str(out)])
    assert out.read_text() == "earlier\n"
