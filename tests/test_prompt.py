"""Prompts: layout, ignored labels, identifier shuffle and the identifier <-> object round trip."""

import pytest
import torch

from scene3d.constants import IGNORE_INDEX, OBJ_PLACEHOLDER, SEG_TOKEN
from scene3d.llm.loader import identifier_tokens
from scene3d.llm.prompt import (IdentifierVocab, PromptConfig, build_prompt, identifier_permutation,
                                keep_largest_objects, parse_answer)
from scene3d.llm.tiny import build_tiny_tokenizer

K = 12


@pytest.fixture(scope="module")
def tv():
    tok = build_tiny_tokenizer()
    tok.add_tokens(identifier_tokens(K) + [SEG_TOKEN, OBJ_PLACEHOLDER], special_tokens=True)
    ids = tok.convert_tokens_to_ids(identifier_tokens(K) + [SEG_TOKEN, OBJ_PLACEHOLDER])
    return tok, IdentifierVocab(tuple(ids[:K]), ids[K], ids[K + 1])


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_identity_layout_and_labels(tv):
    tok, v = tv
    cfg = PromptConfig()
    p = build_prompt(tok, v, 3, "the brown chair", targets=[2, 0], config=cfg)
    # hand-assembled expectation
    expect = _ids(tok, cfg.system)
    for k in range(3):
        expect += [v.obj_token_ids[k], v.placeholder_id]
    expect += _ids(tok, cfg.scene_end)
    prefix_len = len(expect)
    expect += _ids(tok, cfg.question_prefix) + _ids(tok, "the brown chair") + _ids(tok, cfg.answer_prefix)
    answer_start = len(expect)
    expect += [v.obj_token_ids[0], v.obj_token_ids[2], v.seg_token_id]
    assert p.input_ids.tolist() == expect
    assert p.prefix_len == prefix_len and p.answer_start == answer_start
    assert p.seg_pos == len(expect) - 1
    assert p.placeholder_pos.tolist() == [i for i, t in enumerate(expect) if t == v.placeholder_id]
    assert p.placeholder_obj.tolist() == [0, 1, 2]
    assert (p.labels[:answer_start] == IGNORE_INDEX).all()
    assert p.labels[answer_start:].tolist() == expect[answer_start:]
    assert tok.decode(p.input_ids[answer_start:]) == "<OBJ000> <OBJ002> [SEG]"


def test_shuffle_is_seeded_and_consistent(tv):
    tok, v = tv
    a = build_prompt(tok, v, 5, "a table", targets=[1, 3], seed=7)
    b = build_prompt(tok, v, 5, "a table", targets=[1, 3], seed=7)
    c = build_prompt(tok, v, 5, "a table", targets=[1, 3], seed=8)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.slot_of_object, b.slot_of_object)
    assert not torch.equal(a.slot_of_object, c.slot_of_object)
    slots = a.slot_of_object.tolist()
    assert len(set(slots)) == 5 and all(0 <= s < K for s in slots)
    # the identifier right before each placeholder is the one of the object spliced there
    id_of = v.identifier_of_token()
    for pos, obj in zip(a.placeholder_pos.tolist(), a.placeholder_obj.tolist()):
        assert id_of[int(a.input_ids[pos - 1])] == slots[obj]
    # identifiers appear in increasing order in the prefix
    listed = [id_of[int(a.input_ids[p - 1])] for p in a.placeholder_pos.tolist()]
    assert listed == sorted(listed)
    # the answer names the targets' identifiers, sorted
    named = [id_of[int(t)] for t in a.input_ids[a.answer_start:-1]]
    assert named == sorted([slots[1], slots[3]])


@pytest.mark.parametrize("seed", [None, 0, 1, 2, 3])
def test_identifier_round_trip(tv, seed):
    tok, v = tv
    targets = [4, 0, 6]
    p = build_prompt(tok, v, 8, "the lamps", targets=targets, seed=seed)
    parsed = parse_answer(p.input_ids[p.answer_start:].tolist(), v, p.slot_of_object)
    assert sorted(parsed.objects) == sorted(targets)
    assert parsed.has_seg and parsed.unknown == []


def test_zero_targets(tv):
    tok, v = tv
    p = build_prompt(tok, v, 4, "the piano", targets=[])
    assert tok.decode(p.input_ids[p.answer_start:]) == "none [SEG]"
    parsed = parse_answer(p.input_ids[p.answer_start:].tolist(), v, p.slot_of_object)
    assert parsed.objects == [] and parsed.has_seg


def test_parse_unknown_and_after_seg(tv):
    _, v = tv
    slot_of_object = torch.tensor([3, -1, 0])
    ids = [v.obj_token_ids[0], v.obj_token_ids[5], v.obj_token_ids[0], v.seg_token_id, v.obj_token_ids[3]]
    parsed = parse_answer(ids, v, slot_of_object)
    assert parsed.identifiers == [0, 5] and parsed.objects == [2] and parsed.unknown == [5]


def test_overflow_rules(tv):
    tok, v = tv
    with pytest.raises(ValueError, match="identifiers"):
        keep_largest_objects(K + 1, K)
    with pytest.raises(ValueError):
        build_prompt(tok, v, K + 1, "a chair", targets=[0])
    prio = torch.tensor([5.0, 1.0, 9.0, 1.0, 7.0])
    assert keep_largest_objects(5, 3, prio).tolist() == [0, 2, 4]
    assert keep_largest_objects(5, 4, prio).tolist() == [0, 1, 2, 4]  # tie at 1.0: lower index wins
    # targets outside `keep` are not named
    p = build_prompt(tok, v, 5, "a chair", targets=[1, 2], keep=torch.tensor([0, 2]))
    parsed = parse_answer(p.input_ids[p.answer_start:].tolist(), v, p.slot_of_object)
    assert parsed.objects == [2] and p.slot_of_object[1] == -1


def test_bad_inputs(tv):
    tok, v = tv
    with pytest.raises(ValueError, match="non-empty"):
        build_prompt(tok, v, 2, "  ", targets=[0])
    with pytest.raises(ValueError, match="target"):
        build_prompt(tok, v, 2, "a chair", targets=[2])
    with pytest.raises(ValueError):
        identifier_permutation(K + 1, K, seed=0)


def test_object_names_sit_between_identifier_and_token(tv):
    """``names``: each prompted object's class name is written after its identifier, before its token (so the
    token's state has read it); it follows its object through the identifier shuffle and the top-K keep."""
    tok, v = tv
    cfg = PromptConfig()
    names = ["chair", None, "brown table"]
    p = build_prompt(tok, v, 3, "the chair", targets=[0], config=cfg, names=names)
    expect = _ids(tok, cfg.system)
    for k, n in enumerate(names):
        expect += [v.obj_token_ids[k]] + (_ids(tok, " " + n) if n else []) + [v.placeholder_id]
    expect += _ids(tok, cfg.scene_end)
    assert p.input_ids[: p.prefix_len].tolist() == expect
    assert p.placeholder_pos.tolist() == [i for i, t in enumerate(expect) if t == v.placeholder_id]
    # shuffled identifiers and a kept subset: the name before each placeholder is its own object's
    p = build_prompt(tok, v, 3, "the chair", targets=[0], seed=4, keep=torch.tensor([0, 2]), config=cfg, names=names)
    ids = p.input_ids.tolist()
    for pos, obj in zip(p.placeholder_pos.tolist(), p.placeholder_obj.tolist()):
        want = _ids(tok, " " + names[obj])
        assert ids[pos - len(want) : pos] == want and ids[pos - len(want) - 1] == v.obj_token_ids[int(p.slot_of_object[obj])]
    assert tok.decode(_ids(tok, " brown table")) .strip() in tok.decode(ids[: p.prefix_len])
    with pytest.raises(ValueError, match="names has 2 entries for 3 objects"):
        build_prompt(tok, v, 3, "the chair", names=["chair", "table"], config=cfg)
