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
"facing" / "wall". ``tests/test_rewording.py`` renders every variant of every program of a benchmark and
checks that, with the same checks as ``tests/test_paraphrase.py``, and that the val split is never reworded.

Only the words change: the label, colour, size and anchors are the program's, so the targets stay exact.
Labels keep their names (the paraphrase split's synonyms test exactly that).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from data_prep.synth_refer import OPPOSITE, render
from scene3d.utils.text import plural


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
    out = [f"a {adj_sp}{label}", f"{adj_sp}{label}"]
    if color:
        pre = f"{size} " if size else ""
        out += [f"the {pre}{label} in {color}", f"the {pre}{color} colored {label}"]
    if size and not color:
        out.append(f"the {label} of {size} size")
    return out


def _closest(p: dict) -> list[str]:
    a, t = _np(p["anchor"]), p["label"]
    return [f"the {t} nearest to {a}", f"the {t} nearest {a}", f"the closest {t} to {a}",
            f"of the {plural(t)}, the one closest to {a}", f"the {t} with the shortest distance to {a}"]


def _farthest(p: dict) -> list[str]:
    a, t = _np(p["anchor"]), p["label"]
    return [f"the {t} furthest from {a}", f"the {t} most distant from {a}", f"the farthest {t} from {a}",
            f"of the {plural(t)}, the one farthest from {a}", f"the {t} with the longest distance to {a}"]


_SIDE = {"left": ("to the left of", "left of"), "right": ("to the right of", "right of"),
         "front": ("in front of",), "behind": ("behind", "in back of")}


def _view(p: dict) -> list[str]:
    v, a, t = p["view"], _np(p["anchor"]), p["label"]
    clauses = [f"looking from the {OPPOSITE[v]} side of the room towards the {v}",
               f"seen from the {OPPOSITE[v]} side of the room", f"from the {OPPOSITE[v]} side, looking {v}",
               f"standing on the {OPPOSITE[v]} side and looking {v}"]
    return [f"{c}, the {t} {rel} {a}" for c in clauses for rel in _SIDE[p["op"]]]


def _between(p: dict) -> list[str]:
    a, b = (_np(s) for s in p["anchors"])
    t = p["label"]
    return [f"the {t} in between {a} and {b}", f"the {t} flanked by {a} and {b}",
            f"the {t} located between {a} and {b}", f"between {a} and {b}, the {t}"]


def _on(p: dict) -> list[str]:
    a, t = _np(p["anchor"]), p["label"]
    return [f"the {t} on {a}", f"the {t} atop {a}", f"the {t} resting on {a}", f"the {t} on the top of {a}"]


def _near(p: dict) -> list[str]:
    a, t = _np(p["anchor"]), p["label"]
    ts = plural(t)
    return [f"all the {ts} by {a}", f"every {t} next to {a}", f"all the {ts} adjacent to {a}",
            f"the {ts} next to {a}", f"all {ts} close by {a}"]


_VARIANTS: dict[str, Callable[[dict], list[str]]] = {
    "attr": _attr, "closest": _closest, "farthest": _farthest, "left": _view, "right": _view, "front": _view,
    "behind": _view, "between": _between, "on": _on, "near": _near}


#: request frames around a noun phrase: the paraphrase split asks with verbs training never sees ("choose the
#: desk"); these teach that a request word around the phrase does not change what it denotes
WRAPPERS = ("find {}", "look for {}", "locate {}", "show me {}", "point to {}", "i mean {}", "{}, please", "{}.")


def phrasings(program: dict) -> list[str]:
    """The noun-phrase wordings of ``program``: the template's own first, then the variants of its op."""
    op = program.get("op")
    if op not in _VARIANTS:
        raise ValueError(f"unknown program op {op!r}")
    canonical = render(program)
    return [canonical] + [t for t in dict.fromkeys(_VARIANTS[op](program)) if t != canonical]


def rewordings(program: dict) -> list[str]:
    """Every text :func:`reword` may give for ``program`` (each phrasing bare or in a request frame), the
    template's own first."""
    bases = phrasings(program)
    out = [w.format(b) for b in bases for w in ("{}",) + WRAPPERS]
    return list(dict.fromkeys(out))


def reword(program: dict, rng: np.random.Generator) -> str:
    """Another wording of ``program``: a phrasing drawn uniformly (the template's included), bare or, with
    probability 1/2, in a request frame drawn uniformly; never the template's text itself."""
    bases = phrasings(program)
    base = bases[int(rng.integers(len(bases)))]
    wrap = "{}" if rng.random() < 0.5 else WRAPPERS[int(rng.integers(len(WRAPPERS)))]
    if base == bases[0] and wrap == "{}":
        if len(bases) > 1:
            base = bases[1 + int(rng.integers(len(bases) - 1))]
        else:
            wrap = WRAPPERS[int(rng.integers(len(WRAPPERS)))]
    return wrap.format(base)


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
