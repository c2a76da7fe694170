"""Training-time wording variants of the synthetic programs: the same program said several ways.

The synthetic files render each program with ONE template per op (``synth_refer.render``): "the chair closest
to the sofa", always. A model trained on them learns those exact words. Real annotators vary their wording,
and a pretrained LLM knows that "nearest" and "closest" mean the same thing only if training ever asks it to
map more than one wording to one meaning. :func:`reword` gives a training row another wording of its program,
drawn per item and epoch (``data.rewording``: the probability a row is reworded; ``ReferringDataset``).

The variants below are written here, by hand, as short noun phrases, each also said inside a request frame
("find ...", "look for ...", "..., please"; :data:`WRAPPERS`). They are DISJOINT from the paraphrase
split (data_prep/paraphrase.py), whose words and frames training must never see: none of its synonyms,
relation phrases, size words, verbs or sentence openings, and no copula ("is", "are", "that", ...) or
"facing" / "wall". ``tests/test_paraphrase.py`` renders every variant of every program of a benchmark and
checks that, with the same checks as the split itself, and that the val split is never reworded.

Only the words change: the label, colour, size and anchors are the program's, so the targets stay exact.
A class may be named by another name (:data:`SYNONYMS`: "settee" for sofa, "cupboard" for cabinet, ...),
never one of the paraphrase split's synonyms, which stay the test of names training never saw.

Three families of variants: noun phrases per op ("the chair nearest to the table"); the relation in a
relative clause or a second sentence, as annotators write it ("the chair which stands nearest to the table",
"a chair. the one nearest to the table."; the split's own frames use a copula, these never do); a viewpoint
said by the direction looked in alone ("looking north, ...") beside the side looked from. Words that belong to
one op stay with it: "close ..." is the closest op's (Sr3D's "close to" / "closer to" are closest), never the
near op's.
"""

from __future__ import annotations

import copy
from typing import Callable

import numpy as np

from data_prep.synth_refer import OPPOSITE, program_anchors, render
from scene3d.utils.text import indefinite, plural


def _np(spec: dict) -> str:
    """An anchor's noun phrase, as the template says it."""
    return "the " + " ".join(w for w in (spec.get("color"), spec["label"]) if w)


def _attr(p: dict) -> list[str]:
    size, color, label = p.get("size"), p.get("color"), p["label"]
    if p.get("all"):
        noun = plural(label)
        adj = f"{color} " if color else ""
        out = [f"every {adj}{label}", f"each {adj}{label}", f"the {adj}{noun}", f"all {adj}{noun}"]
        if color:
            out.append(f"all the {noun} in {color}")
        return out
    adj = " ".join(w for w in (size, color) if w)
    adj_sp = f"{adj} " if adj else ""
    out = [indefinite(f"{adj_sp}{label}"), f"{adj_sp}{label}"]
    if color:
        pre = f"{size} " if size else ""
        out += [f"the {pre}{label} in {color}", f"the {pre}{color} colored {label}"]
    if size and not color:
        out.append(f"the {label} of {size} size")
    if size:  # the size said after the thing, as a second phrase or sentence
        col = f"{color} " if color else ""
        for word in _SIZE_WORDS[size]:
            out += [f"the {col}{label}, the {word} one", f"{indefinite(col + label)}. the {word} one."]
    return out


#: size words of the attribute phrasings (the paraphrase split says "the largest" / "biggest" / "smallest")
_SIZE_WORDS = {"large": ("large", "big"), "small": ("small", "little")}


#: relative and two-sentence frames around a relation ("the chair which stands nearest to the table", "a
#: chair. the one nearest to the table."): real descriptions name the target first and put the relation in a
#: clause or a second sentence, where the template always says one noun phrase. Each frame formats ``t`` (the
#: target's words), ``ts`` (their plural) and ``r`` (the relation with its anchors); the multi-target op says
#: them in the plural. No copula ("is", "are", "that"): the paraphrase split's frames stay unseen.
_CLAUSES_ONE = ("the {t} which stands {r}", "the {t} located {r}", "the {t} positioned {r}",
                "the {t} which can be found {r}", "{a_t}. the one {r}.", "look at the {ts}. the one {r}.",
                "the {t}: the one {r}")
_CLAUSES_ALL = ("the {ts} which stand {r}", "the {ts} located {r}", "the {ts} positioned {r}",
                "{ts}. the ones {r}.", "look at the {ts}. all the ones {r}.", "the {ts}: every one {r}")


def _clauses(p: dict, relations: list[str], many: bool = False) -> list[str]:
    """Every relative / two-sentence frame around every relation phrase of ``relations``."""
    t = p["label"]
    frames = _CLAUSES_ALL if many else _CLAUSES_ONE
    return [f.format(t=t, a_t=indefinite(t), ts=plural(t), r=r) for r in relations for f in frames]


def _closest(p: dict) -> list[str]:
    a, t = _np(p["anchor"]), p["label"]
    return [f"the {t} nearest to {a}", f"the {t} nearest {a}", f"the closest {t} to {a}",
            f"of the {plural(t)}, the one closest to {a}", f"the {t} with the shortest distance to {a}",
            *_clauses(p, [f"nearest to {a}", f"closest to {a}", f"at the shortest distance from {a}"])]


def _farthest(p: dict) -> list[str]:
    a, t = _np(p["anchor"]), p["label"]
    return [f"the {t} furthest from {a}", f"the {t} most distant from {a}", f"the farthest {t} from {a}",
            f"of the {plural(t)}, the one farthest from {a}", f"the {t} with the longest distance to {a}",
            *_clauses(p, [f"furthest from {a}", f"farthest from {a}", f"most distant from {a}"])]


_SIDE = {"left": ("to the left of", "left of"), "right": ("to the right of", "right of"),
         "front": ("in front of",), "behind": ("behind", "in back of")}


def _view(p: dict) -> list[str]:
    v, a, t = p["view"], _np(p["anchor"]), p["label"]
    # the side one looks from, or only the direction one looks in (as real annotators often say it)
    clauses = [f"looking from the {OPPOSITE[v]} side of the room towards the {v}",
               f"seen from the {OPPOSITE[v]} side of the room", f"from the {OPPOSITE[v]} side, looking {v}",
               f"standing on the {OPPOSITE[v]} side and looking {v}", f"looking {v}",
               f"when you look towards the {v}", f"with your back to the {OPPOSITE[v]}"]
    out = [f"{c}, the {t} {rel} {a}" for c in clauses for rel in _SIDE[p["op"]]]
    return out + [f"{c}, {x}" for c in clauses[-3:] for x in _clauses(p, [f"{_SIDE[p['op']][0]} {a}"])]


def _between(p: dict) -> list[str]:
    a, b = (_np(s) for s in p["anchors"])
    t = p["label"]
    return [f"the {t} in between {a} and {b}", f"the {t} flanked by {a} and {b}",
            f"the {t} located between {a} and {b}", f"between {a} and {b}, the {t}",
            *_clauses(p, [f"between {a} and {b}", f"halfway between {a} and {b}"])]


def _on(p: dict) -> list[str]:
    a, t = _np(p["anchor"]), p["label"]
    return [f"the {t} on {a}", f"the {t} atop {a}", f"the {t} resting on {a}", f"the {t} on the top of {a}",
            f"the {t} which lies on {a}", f"the {t} which rests on {a}", f"the {t} standing on {a}",
            *_clauses(p, [f"on {a}", f"atop {a}", f"on top of {a}"])]


def _near(p: dict) -> list[str]:
    # no "close ..." here: the closest op owns those words, as in Sr3D ("close to" / "closer to" = closest)
    a, t = _np(p["anchor"]), p["label"]
    ts = plural(t)
    return [f"all the {ts} by {a}", f"every {t} next to {a}", f"all the {ts} adjacent to {a}",
            f"the {ts} next to {a}", f"all {ts} alongside {a}",
            *_clauses(p, [f"next to {a}", f"adjacent to {a}", f"right by {a}", f"alongside {a}"], many=True)]


_VARIANTS: dict[str, Callable[[dict], list[str]]] = {
    "attr": _attr, "closest": _closest, "farthest": _farthest, "left": _view, "right": _view, "front": _view,
    "behind": _view, "between": _between, "on": _on, "near": _near}


#: request frames around a noun phrase: the paraphrase split asks with verbs training never sees ("choose the
#: desk"); these teach that a request word around the phrase does not change what it denotes
WRAPPERS = ("find {}", "look for {}", "locate {}", "show me {}", "point to {}", "i mean {}", "{}, please", "{}.",
            "get {}", "give me {}", "highlight {}", "mark {}", "segment {}", "can you find {}?",
            "i am looking for {}", "where can i find {}?")


def phrasings(program: dict) -> list[str]:
    """The noun-phrase wordings of ``program``: the template's own first, then the variants of its op."""
    op = program.get("op")
    if op not in _VARIANTS:
        raise ValueError(f"unknown program op {op!r}")
    canonical = render(program)
    return [canonical] + [t for t in dict.fromkeys(_VARIANTS[op](program)) if t != canonical]


#: Other names of the synthetic classes that training may use (for the target and the anchors alike), so
#: that training asks the LLM to map more than one name to one class, as it does for relations. Never the
#: paraphrase split's synonyms (data_prep/paraphrase.py: couch, trashcan, trash bin, garbage can, night
#: stand, computer monitor, screen, bookcase, book shelf, cushion, cardboard box): those stay unseen, and
#: tests/test_paraphrase.py checks it.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "sofa": ("settee",), "trash can": ("waste basket", "dustbin"), "monitor": ("display",),
    "bookshelf": ("shelving unit",), "box": ("carton", "crate"), "cabinet": ("cupboard",), "chair": ("seat",),
}
#: the probability that a reworded row renames its classes (each class with synonyms draws one uniformly)
RENAME_P = 0.3


def _labelled(program: dict) -> list[dict]:
    """The specs of ``program`` that carry a class name: the program itself and its anchors."""
    return [program, *program_anchors(program)]


def renamings(program: dict) -> list[dict]:
    """``program`` and every copy of it with one or more of its classes named by a synonym (:data:`SYNONYMS`).
    The copies are for wording only: their labels are not the scene's."""
    out = [program]
    for i in range(len(_labelled(program))):
        grown = []
        for prog in out:
            label = _labelled(prog)[i]["label"]
            for syn in SYNONYMS.get(label, ()):
                renamed = copy.deepcopy(prog)
                _labelled(renamed)[i]["label"] = syn
                grown.append(renamed)
        out += grown
    return out


def rewordings(program: dict, synonyms: bool = True) -> list[str]:
    """Every text :func:`reword` may give for ``program`` (each phrasing bare or in a request frame, with the
    classes' own names or, unless ``synonyms`` is false, their synonyms), the template's own first."""
    progs = renamings(program) if synonyms else [program]
    out = [w.format(b) for prog in progs for b in phrasings(prog) for w in _wrappers(b)]
    return list(dict.fromkeys(out))


def _rename(program: dict, rng: np.random.Generator) -> dict:
    """A copy of ``program`` whose classes with synonyms are each named by one drawn uniformly."""
    renamed = copy.deepcopy(program)
    for spec in _labelled(renamed):
        syns = SYNONYMS.get(spec["label"])
        if syns:
            spec["label"] = syns[int(rng.integers(len(syns)))]
    return renamed


def reword(program: dict, rng: np.random.Generator) -> str:
    """Another wording of ``program``: a phrasing drawn uniformly (the template's included), bare or, with
    probability 1/2, in a request frame drawn uniformly, with probability :data:`RENAME_P` its classes named
    by synonyms; never the template's text itself."""
    template = render(program)
    if rng.random() < RENAME_P:
        program = _rename(program, rng)
    bases = phrasings(program)
    base = bases[int(rng.integers(len(bases)))]
    if base == template and len(bases) > 1 and rng.random() < 0.5:  # the template bare is never drawn
        base = bases[1 + int(rng.integers(len(bases) - 1))]
    wraps = _wrappers(base)
    wrap = "{}" if (rng.random() < 0.5 and base != template) or len(wraps) == 1 else \
        wraps[1 + int(rng.integers(len(wraps) - 1))]
    return wrap.format(base)


def _wrappers(base: str) -> tuple[str, ...]:
    """The frames a phrasing may be said in: itself, and the request frames unless it is whole sentences
    already ("a chair. the one nearest to the table.")."""
    return ("{}",) if base.endswith(".") else ("{}",) + WRAPPERS


def reword_row(row: dict, rng: np.random.Generator) -> "str | None":
    """:func:`reword` of a referring row whose text is its program's template wording; None for any other row
    (no program, another grammar, or worded otherwise). The ``reworder`` of ``ReferringDataset``."""
    prog = row.get("program")
    if not isinstance(prog, dict):
        return None
    try:
        if render(prog) != row.get("text"):
            return None
        return reword(prog, rng)
    except (KeyError, ValueError):  # not a synthetic-grammar program
        return None
