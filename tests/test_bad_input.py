"""Bad input fails loudly (issue 16, items 5-10): every row of the table below is a command line that must
exit non-zero with one line on stderr naming the path or argument at fault, and no traceback unless
``--debug`` is given. Commands run in process through ``scene3d.cli.main``; two run as real subprocesses
to check what a user's terminal shows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.scannet import process_scans
from scene3d.cli import main

REPO = Path(__file__).resolve().parents[1]
MMDET = "open-mmlab__mmdetection3d/tests/data/scannet/scannet_train_instance_data"
NR3D_COLUMNS = ["assignmentid", "stimulus_id", "utterance", "correct_guess", "speaker_id", "listener_id",
                "scan_id", "instance_type", "target_id", "tokens"]


def run_cli(argv, capsys) -> tuple[int, str]:
    """Exit status and stderr of ``scene3d ARGV`` as the console script would give them: a ``SystemExit``
    with a message is printed on stderr with status 1, as the interpreter does at exit."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            rc = 1
        else:
            rc = 0 if e.code is None else e.code
    return rc, capsys.readouterr().err


def error_line(err: str) -> str:
    """The one ``scene3d ...: error: ...`` line of stderr (asserts there is exactly one and no traceback)."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("scene3d ") and ": error: " in ln]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def data(synth_root, tmp_path_factory):
    """Processed synthetic scenes, their ScanRefer rows as jsonl, and a few bad files."""
    root = tmp_path_factory.mktemp("bad_input")
    processed = root / "processed"
    tsv = synth_root / "scannetv2-labels.combined.tsv"
    assert process_scans(synth_root / "scans", processed, tsv, progress=False).ok
    refer = {}
    for split in ("train", "val"):
        refer[split] = root / f"{split}.jsonl"
        assert main(["prep", "refer", "--dataset", "scanrefer", str(synth_root / "referring" /
                     f"synth_scanrefer_{split}.json"), "--out", str(refer[split]), "--processed", str(processed),
                     "--labels", str(tsv), "--no-progress"]) == 0
    bad_ckpt = root / "bad_ckpt"  # a checkpoint directory whose weights file is garbage
    bad_ckpt.mkdir()
    (bad_ckpt / "meta.json").write_text(json.dumps({"format_version": 1, "step": 1,
                                                    "files": ["model.safetensors", "config.yaml"]}))
    (bad_ckpt / "config.yaml").write_text("experiment: x\n")
    (bad_ckpt / "model.safetensors").write_bytes(b"not a safetensors file")
    a_file = root / "a_file"
    a_file.write_text("not a directory\n")
    (root / "empty_scans").mkdir()
    (root / "empty_split.txt").write_text("# nothing\n")
    nr3d_bad = root / "nr3d_bad.csv"
    nr3d_bad.write_text("a,b\n1,2\n")
    other_scene = root / "other_scene.json"  # rows of a scene that is not processed: every row is dropped
    other_scene.write_text(json.dumps([{"scene_id": "scene0999_00", "object_id": "1", "object_name": "chair",
                                        "ann_id": "0", "description": "the chair"}]))
    (root / "no_rows.json").write_text("[]")
    (root / "broken.json").write_text("[{")
    return dict(root=root, processed=processed, tsv=tsv, refer=refer, bad_ckpt=bad_ckpt, a_file=a_file,
                scans=synth_root / "scans", synth_refer=synth_root / "referring")


def train_args(d) -> list[str]:
    return ["experiment=synthetic_cpu", "data.synthetic=null", f"data.processed_dir={d['processed']}",
            f"data.train={d['refer']['train']}", f"data.val={d['refer']['val']}", "trainer.max_steps=1",
            "trainer.progress=false", "eval.in_training=false", "data.max_points=1500"]


# (id, argv builder, words the error line must contain); {root} etc. are the fixture's paths
TABLE = [
    # 5. prep scannet on something that is not raw scans, or on zero scenes
    ("prep-scannet-mmdet-export", lambda d, real: ["prep", "scannet", real / MMDET, d["root"] / "o1", "--labels",
                                                   d["tsv"], "--no-progress"],
     lambda d, real: [str(real / MMDET), "mmdetection3d"]),
    ("prep-scannet-empty-dir", lambda d, real: ["prep", "scannet", d["root"] / "empty_scans", d["root"] / "o2",
                                                "--labels", d["tsv"], "--no-progress"],
     lambda d, real: [str(d["root"] / "empty_scans"), "zero scenes"]),
    ("prep-scannet-empty-split", lambda d, real: ["prep", "scannet", d["scans"], d["root"] / "o3", "--labels",
                                                  d["tsv"], "--split-file", d["root"] / "empty_split.txt",
                                                  "--no-progress"],
     lambda d, real: ["empty", "zero scenes"]),
    ("prep-scannet-processed-dir", lambda d, real: ["prep", "scannet", d["processed"], d["root"] / "o4",
                                                    "--labels", d["tsv"], "--no-progress"],
     lambda d, real: [str(d["processed"]), "need no prep"]),
    ("prep-scannet-out-is-file", lambda d, real: ["prep", "scannet", d["scans"], d["a_file"], "--labels", d["tsv"],
                                                  "--no-progress"],
     lambda d, real: [str(d["a_file"]), "not a directory"]),
    # 7. prep refer errors are one line naming the file
    ("prep-refer-missing-src", lambda d, real: ["prep", "refer", "--dataset", "nr3d", d["root"] / "nope.csv",
                                                "--out", d["root"] / "x.jsonl"],
     lambda d, real: [str(d["root"] / "nope.csv")]),
    ("prep-refer-bad-columns", lambda d, real: ["prep", "refer", "--dataset", "nr3d", d["root"] / "nr3d_bad.csv",
                                                "--out", d["root"] / "x.jsonl"],
     lambda d, real: [str(d["root"] / "nr3d_bad.csv"), "stimulus_id"]),
    ("prep-refer-broken-json", lambda d, real: ["prep", "refer", "--dataset", "multi3drefer",
                                                d["root"] / "broken.json", "--out", d["root"] / "x.jsonl"],
     lambda d, real: [str(d["root"] / "broken.json"), "JSON"]),
    ("prep-refer-processed-not-dir", lambda d, real: ["prep", "refer", "--dataset", "multi3drefer",
                                                      d["root"] / "no_rows.json", "--out", d["root"] / "x.jsonl",
                                                      "--processed", d["a_file"]],
     lambda d, real: ["--processed", str(d["a_file"])]),
    # 9. nothing to write is an error
    ("prep-refer-no-rows", lambda d, real: ["prep", "refer", "--dataset", "multi3drefer", d["root"] / "no_rows.json",
                                            "--out", d["root"] / "x.jsonl"],
     lambda d, real: [str(d["root"] / "no_rows.json"), "no multi3drefer rows"]),
    ("prep-refer-all-dropped", lambda d, real: ["prep", "refer", "--dataset", "scanrefer", d["root"] / "other_scene.json",
                                                "--out", d["root"] / "x.jsonl", "--labels", d["tsv"],
                                                "--processed", d["processed"], "--no-progress"],
     lambda d, real: [str(d["root"] / "other_scene.json"), "all 1 rows", "missing_scene=1"]),
    # 7. eval / train
    ("eval-nonexistent", lambda d, real: ["eval", d["root"] / "nonexistent"],
     lambda d, real: [str(d["root"] / "nonexistent"), "no such file"]),
    ("eval-bad-checkpoint", lambda d, real: ["eval", d["bad_ckpt"], "--no-progress"],
     lambda d, real: [str(d["bad_ckpt"] / "model.safetensors"), "safetensors"]),
    ("eval-data-override-without-data", lambda d, real: ["eval", d["bad_ckpt"], "data.val=x.jsonl"],
     lambda d, real: ["data.val=x.jsonl", "data="]),
    ("query-bad-checkpoint", lambda d, real: ["query", d["bad_ckpt"], d["processed"] / "scene5000_00", "a chair",
                                              "--no-pictures"],
     lambda d, real: [str(d["bad_ckpt"] / "model.safetensors")]),
    ("train-bad-init-checkpoint", lambda d, real: ["train", *train_args(d), f"out_dir={d['root'] / 'r1'}",
                                                   f"trainer.init_from={d['bad_ckpt']}"],
     lambda d, real: [str(d["bad_ckpt"] / "model.safetensors")]),
    ("train-out-dir-is-file", lambda d, real: ["train", *train_args(d), f"out_dir={d['a_file']}"],
     lambda d, real: [str(d["a_file"]), "not a directory"]),
    ("synth-out-dir-is-file", lambda d, real: ["synth", d["a_file"], "--scenes", "1"],
     lambda d, real: [str(d["a_file"])]),
]


@pytest.mark.parametrize("argv_of,needles_of", [t[1:] for t in TABLE], ids=[t[0] for t in TABLE])
def test_bad_input_fails_with_one_line_naming_it(argv_of, needles_of, data, capsys, request):
    uses_real = "mmdet" in request.node.callspec.id
    real = request.getfixturevalue("real_data") if uses_real else None
    rc, err = run_cli(argv_of(data, real), capsys)
    assert rc != 0, err
    line = error_line(err)
    for needle in needles_of(data, real):
        assert needle in line, (needle, line)


def test_all_dropped_keeps_the_earlier_output(data, capsys):
    out = data["root"] / "kept.jsonl"
    out.write_text('{"earlier": true}\n')
    rc, err = run_cli(["prep", "refer", "--dataset", "scanrefer", data["root"] / "other_scene.json", "--out", out,
                       "--labels", data["tsv"], "--processed", data["processed"], "--no-progress"], capsys)
    assert rc != 0 and "earlier one is kept" in error_line(err)
    assert out.read_text() == '{"earlier": true}\n'
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".kept.jsonl.")]  # no temp file left


def _console(args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scene3d", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"), timeout=300)


def test_console_shows_one_line_and_debug_shows_the_traceback(data, tmp_path):
    out = _console(["eval", data["bad_ckpt"], "--no-progress"], tmp_path)
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0 and "Traceback" not in out.stderr, out.stderr
    assert str(data["bad_ckpt"] / "model.safetensors") in out.stderr and "--debug" in out.stderr
    dbg = _console(["--debug", "eval", data["bad_ckpt"], "--no-progress"], tmp_path)
    assert dbg.returncode == 1 and "Traceback" in dbg.stderr and "CheckpointError" in dbg.stderr
    dbg = _console(["eval", data["bad_ckpt"], "--no-progress", "--debug"], tmp_path)  # after the command too
    assert "Traceback" in dbg.stderr


def test_console_prep_scannet_on_export_exits_nonzero(real_data, tmp_path):
    out = _console(["prep", "scannet", real_data / MMDET, tmp_path / "out", "--labels",
                    real_data / "daveredrum__ScanRefer/data/scannet/meta_data/scannetv2-labels.combined.tsv",
                    "--no-progress"], tmp_path)
    assert out.returncode == 2 and "mmdetection3d" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
