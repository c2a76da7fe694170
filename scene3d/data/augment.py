"""Training augmentations that must keep a referring row true: quarter turns of the scene about z with the
row's compass words turned with it, and colour jitter.

Why quarter turns, and why the words: a ScanNet scan is axis-aligned, but which wall faces +x is arbitrary
from scan to scan (the two scans of scene0000 in ``../shared/data/real`` are a quarter turn apart). A model
trained on one scan in one orientation learns its absolute positions and box extents and does not recognise
the same room turned. Viewpoint rows say directions as compass words in the scan's frame (``north = +y``,
``east = +x``; data_prep/synth_refer.py: "looking from the south side of the room towards the north",
"facing the north wall"), so turning the points alone would make them false: each compass word is turned
with the scene (after a quarter turn counter-clockwise seen from above, what was north is west). Quarter
turns only, so "the west side of the room" is still a side of the axis-aligned room. Rows without compass
words (closest, between, ScanRefer-style "facing the bed") are unchanged by the rule.

No library does this: the text rule is this project's row format, and the point rotation is two lines.
"""

from __future__ import annotations

import re
from typing import Optional

import numpy as np
import torch

#: compass words in counter-clockwise order seen from above (z up): a quarter turn maps each to the next
COMPASS = ("north", "west", "south", "east")
# whole words, with the adjective / adverb endings and the compound forms ("north-east", "northeast") a
# description may use: each compass part is turned on its own
_WORD = re.compile(r"\b(north|south|east|west)(?=(?:ern|erly|wards?|east|west)?\b)", re.IGNORECASE)
_COMPOUND = re.compile(r"\b(north|south)(east|west)", re.IGNORECASE)


def _turn_word(word: str, quarter_turns: int) -> str:
    out = COMPASS[(COMPASS.index(word.lower()) + quarter_turns) % 4]
    return out.capitalize() if word[:1].isupper() else out


def turn_compass(text: str, quarter_turns: int) -> str:
    """``text`` with every compass word turned ``quarter_turns`` quarter turns counter-clockwise (seen from
    above), as the scene was: ``turn_compass("facing the north wall", 1) == "facing the west wall"``.
    A compound such as "northeast" turns to a valid compound ("northwest" after one turn)."""
    k = int(quarter_turns) % 4
    if k == 0:
        return text

    def compound(m: re.Match) -> str:
        a, b = _turn_word(m.group(1), k), _turn_word(m.group(2), k).lower()
        # "north"/"south" lead an English compound: east-north -> north-east
        if a.lower() in ("east", "west"):
            a, b = b, a.lower()
            a = a.capitalize() if m.group(1)[:1].isupper() else a
        return a + b

    placeholder = []

    def hold(m: re.Match) -> str:
        placeholder.append(compound(m))
        return f"\x00{len(placeholder) - 1}\x00"

    held = _COMPOUND.sub(hold, text)
    turned = _WORD.sub(lambda m: _turn_word(m.group(1), k), held)
    return re.sub("\x00(\\d+)\x00", lambda m: placeholder[int(m.group(1))], turned)


#: the most orientations quarter turns give (test-time turns, scene3d.models.turns)
MAX_TURNS = 4


def check_turns(turns, where: str = "turns") -> int:
    """``turns`` (how many orientations to answer in, test-time turns) as an int in 1..4, else a one-line error
    naming ``where``."""
    if isinstance(turns, bool) or not isinstance(turns, int) or not 1 <= turns <= MAX_TURNS:
        raise ValueError(f"{where} must be an integer in 1..{MAX_TURNS} (orientations voted over: 1 = the scan as "
                         f"given only, 4 = all four quarter turns), got {turns!r}")
    return turns


def turn_row(row: dict, quarter_turns: int) -> dict:
    """A copy of a referring row with its text (and its program's ``view``, where it has one) turned with the
    scene; the row itself is unchanged."""
    k = int(quarter_turns) % 4
    if k == 0:
        return row
    out = {**row, "text": turn_compass(row["text"], k)}
    prog = row.get("program")
    if isinstance(prog, dict) and prog.get("view") in COMPASS:
        out["program"] = {**prog, "view": turn_compass(prog["view"], k)}
    return out


def turn_points(points: dict, quarter_turns: int, center: Optional[np.ndarray] = None) -> dict:
    """``points`` (scene_to_tensors' dict) turned ``quarter_turns`` quarter turns counter-clockwise about the
    vertical axis through ``center`` (default: the middle of the points' xy extent, so the scene stays where
    it was); normals turn with it. Exact: a quarter turn swaps and negates coordinates, no rounding."""
    k = int(quarter_turns) % 4
    if k == 0:
        return points
    coord = points["coord"]
    c = (coord[:, :2].amin(0) + coord[:, :2].amax(0)) / 2 if center is None else torch.as_tensor(
        center, dtype=coord.dtype)[:2]

    def turn(xy: torch.Tensor) -> torch.Tensor:
        for _ in range(k):  # (x, y) -> (-y, x)
            xy = torch.stack([-xy[:, 1], xy[:, 0]], 1)
        return xy

    out = dict(points)
    out["coord"] = torch.cat([turn(coord[:, :2] - c) + c, coord[:, 2:]], 1)
    if "normal" in points:
        n = points["normal"]
        out["normal"] = torch.cat([turn(n[:, :2]), n[:, 2:]], 1)
    return out


def canonical_turns(coord) -> int:
    """How many quarter turns counter-clockwise (about the middle of the xy extent, as :func:`turn_points`
    turns) put a scan into its canonical frame: the one where the per-axis median of its points' xy, relative
    to the middle of the xy extent, lies in the first quadrant (angle in [0, 90) degrees from +x).

    Why: ScanNet aligns each scan's walls with the axes but leaves which wall faces +x arbitrary, so two scans
    of one room can lie a quarter turn apart (scene0000_01 / scene0000_02). A rule that reads only the scan's
    own geometry gives both the same frame wherever their point mass sits on the same side of the room's
    middle. It is exact under quarter turns: a scan turned k quarter turns gets ``canonical_turns - k`` (mod
    4), so it lands in the same frame (a median exactly on an axis is the only tie). This is moment-based
    sign disambiguation as in PCA canonicalisation of point clouds, restricted to quarter turns; it is a
    heuristic and as stable as the median's distance from a quadrant boundary (:func:`frame_margin`).
    ``coord``: ``[N, >=2]`` torch tensor or numpy array, N >= 1."""
    return _canonical(coord)[0]


def frame_margin(coord) -> float:
    """Degrees between the median direction of :func:`canonical_turns` and the nearest quadrant boundary (0 to
    45): how far the scan's points would have to shift before its canonical frame changes; 0 for a median at
    the middle of the extent."""
    return _canonical(coord)[1]


def _canonical(coord) -> tuple:
    xy = np.asarray(coord.detach().cpu().numpy() if isinstance(coord, torch.Tensor) else coord,
                    dtype=np.float64)[:, :2]
    if not len(xy):
        raise ValueError("canonical_turns needs at least one point")
    mid = (xy.min(0) + xy.max(0)) / 2
    mx, my = np.median(xy - mid, axis=0)
    if mx == 0 and my == 0:
        return 0, 0.0
    angle = float(np.degrees(np.arctan2(my, mx))) % 360.0
    quadrant = int(angle // 90) % 4
    inside = angle - 90.0 * quadrant
    return (-quadrant) % 4, min(inside, 90.0 - inside)


def jitter_color(color: torch.Tensor, strength: float, rng: np.random.Generator) -> torch.Tensor:
    """``color [N, 3]`` in [0, 1] under one random brightness gain (1 +- strength) and per-channel shift
    (+- strength / 2) for the whole scan: the lighting of another scan of the same room."""
    if strength <= 0:
        return color
    gain = float(rng.uniform(1 - strength, 1 + strength))
    shift = torch.from_numpy(rng.uniform(-strength / 2, strength / 2, size=3).astype(np.float32))
    return (color * gain + shift).clamp_(0.0, 1.0)
