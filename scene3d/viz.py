"""Pictures of a query's answer: a coloured PLY of the scene and a two-panel PNG (top view + oblique view).

Masked points are painted in bright per-object colours (:data:`PALETTE`); the rest of the scene keeps a
dimmed version of its own colours (grey where it has none), so the answer stands out in any viewer.

==========================  ==============================================================================
function                    what it does
==========================  ==============================================================================
:func:`highlight_colors`    ``[N, 3]`` uint8 colours: scene dimmed, masked points in palette colours
:func:`write_ply`           binary PLY of points (+ colours, + mesh faces if given), written atomically
:func:`render_png`          two panels rendered with matplotlib's Agg backend (no display, no GPU, no open3d)
:func:`save_result`         both files for a :class:`~scene3d.api.SegmentResult`; returns their paths
==========================  ==============================================================================

Masks are ``[N]`` bool (one colour) or ``[T, N]`` bool (one colour per object; a later object wins where
two overlap).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import numpy as np

from scene3d.utils.io import atomic_path

#: highlight colours of objects 0, 1, ... (cycled): red, blue, green, orange, magenta, cyan, yellow, purple
PALETTE = np.array([[230, 25, 45], [0, 110, 255], [20, 200, 60], [255, 140, 0], [240, 50, 230], [0, 210, 210],
                    [255, 225, 25], [145, 30, 180]], dtype=np.uint8)
BASE_GREY = np.array([170, 170, 170], dtype=np.uint8)


class SavedPictures(NamedTuple):
    ply: Path
    png: Path


def _as_masks(mask, n: int) -> np.ndarray:
    """``[N]`` or ``[T, N]`` bool -> ``[T, N]`` bool (validated)."""
    m = np.asarray(mask)
    if m.ndim == 1:
        m = m[None]
    if m.ndim != 2 or m.shape[1] != n:
        raise ValueError(f"mask must be [N={n}] or [T, N={n}], got shape {np.asarray(mask).shape}")
    if m.dtype != bool:
        raise ValueError(f"mask must be boolean, got dtype {m.dtype}")
    return m


def _check_coord(coord) -> np.ndarray:
    c = np.asarray(coord, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] != 3:
        raise ValueError(f"coord must be [N, 3], got shape {c.shape}")
    if c.shape[0] == 0:
        raise ValueError("coord: no points to draw")
    if not np.isfinite(c).all():
        raise ValueError("coord: NaN/inf coordinates")
    return c


def highlight_colors(color: Optional[np.ndarray], mask, n: Optional[int] = None, dim: float = 0.45) -> np.ndarray:
    """Scene colours with masked points highlighted.

    ``color`` [N, 3] uint8 (or None: grey); unmasked points are blended towards grey by ``dim`` (0 keeps the
    scene colours, 1 makes them grey); object ``t`` of ``mask`` [T, N] gets ``PALETTE[t % 8]``.
    """
    if color is None:
        if n is None:
            raise ValueError("highlight_colors needs n when color is None")
        base = np.tile(BASE_GREY, (n, 1)).astype(np.float64)
    else:
        base = np.asarray(color, dtype=np.float64)
        n = base.shape[0]
        if base.ndim != 2 or base.shape[1] != 3:
            raise ValueError(f"color must be [N, 3], got shape {base.shape}")
    masks = _as_masks(mask, n)
    out = (1 - dim) * base + dim * BASE_GREY.astype(np.float64)
    out = out.round().clip(0, 255).astype(np.uint8)
    for t in range(masks.shape[0]):
        out[masks[t]] = PALETTE[t % len(PALETTE)]
    return out


def write_ply(path, coord, color: Optional[np.ndarray] = None, faces: Optional[np.ndarray] = None) -> Path:
    """Binary little-endian PLY of ``coord`` [N, 3] (float32) with optional ``color`` [N, 3] uint8 and
    triangle ``faces`` [F, 3]; written atomically (temp file + rename)."""
    from plyfile import PlyData, PlyElement

    c = _check_coord(coord)
    fields = [("x", "f4"), ("y", "f4"), ("z", "f4")]
    if color is not None:
        color = np.asarray(color)
        if color.shape != c.shape or color.dtype != np.uint8:
            raise ValueError(f"color must be [N={len(c)}, 3] uint8, got {color.shape} {color.dtype}")
        fields += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
    vert = np.empty(len(c), dtype=fields)
    vert["x"], vert["y"], vert["z"] = c[:, 0], c[:, 1], c[:, 2]
    if color is not None:
        vert["red"], vert["green"], vert["blue"] = color[:, 0], color[:, 1], color[:, 2]
    elements = [PlyElement.describe(vert, "vertex")]
    if faces is not None:
        f = np.asarray(faces)
        if f.ndim != 2 or f.shape[1] != 3 or (f.size and (f.min() < 0 or f.max() >= len(c))):
            raise ValueError(f"faces must be [F, 3] vertex indices below {len(c)}")
        face = np.empty(len(f), dtype=[("vertex_indices", "i4", (3,))])
        face["vertex_indices"] = f
        elements.append(PlyElement.describe(face, "face"))
    path = Path(path)
    with atomic_path(path) as tmp:
        PlyData(elements, text=False, byte_order="<").write(str(tmp))
    return path


def _oblique(c: np.ndarray, azim_deg: float, elev_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """Orthographic view from azimuth/elevation: screen xy ``[N, 2]`` and depth ``[N]`` (larger = nearer).

    Hand-written because matplotlib's 3D scatter does not sort individual points by depth (the nearer
    surface can be painted over) and is slow for 10^5 points; a projection plus a depth sort is both exact
    and fast.
    """
    a, e = np.radians(azim_deg), np.radians(elev_deg)
    toward_cam = np.array([np.cos(e) * np.cos(a), np.cos(e) * np.sin(a), np.sin(e)])
    right = np.array([-np.sin(a), np.cos(a), 0.0])
    up = np.cross(toward_cam, right)
    x = c - c.mean(0)
    return np.stack([x @ right, x @ up], 1), x @ toward_cam


def render_png(path, coord, color: Optional[np.ndarray], mask, title: str = "", boxes: Optional[np.ndarray] = None,
               labels: Optional[Sequence[str]] = None, size: tuple = (1400, 700), dpi: int = 100,
               max_points: int = 120_000, azim: float = -60.0, elev: float = 35.0, seed: int = 0, max_legend: int = 10,
               gt_mask=None, gt_labels: Optional[Sequence[str]] = None, gt_title: str = "ground truth") -> Path:
    """Two panels (top view, oblique view) of the scene with ``mask`` highlighted; PNG of ``size`` pixels.

    ``boxes`` [T, 6] (center + size) are outlined in the top view; ``labels`` name the objects in the legend.
    At most ``max_points`` unmasked points are drawn (random subset); masked points are always all drawn,
    on top, so the answer is visible even behind walls. With ``gt_mask`` (``[N]`` or ``[G, N]``; may be empty:
    "no target") a second row shows the ground truth the same way, so a prediction can be checked by eye;
    the picture is then twice as tall.
    """
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    c = _check_coord(coord)
    rows = 1 if gt_mask is None else 2
    fig = Figure(figsize=(size[0] / dpi, rows * size[1] / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = np.asarray(fig.subplots(rows, 2)).reshape(rows, 2)
    _draw_views(axes[0], c, color, mask, boxes, labels, max_points, azim, elev, seed, max_legend, "")
    if gt_mask is not None:
        _draw_views(axes[1], c, color, gt_mask, None, gt_labels, max_points, azim, elev, seed, max_legend,
                    gt_title + ": ")
    if title:
        fig.suptitle(title, fontsize=11)
    top = 0.86 if rows == 1 else 0.93
    fig.subplots_adjust(left=0.06, right=0.98, top=top, bottom=0.08 / rows, wspace=0.08, hspace=0.15)
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            fig.savefig(f, format="png", dpi=dpi)
    return path


def _draw_views(axes, c, color, mask, boxes, labels, max_points, azim, elev, seed, max_legend, prefix) -> None:
    """The top and oblique views of one highlighted mask on ``axes`` (two matplotlib axes)."""
    from matplotlib.patches import Patch, Rectangle

    ax_top, ax_obl = axes
    n = len(c)
    masks = _as_masks(mask, n)
    rgb = highlight_colors(color, masks, n).astype(np.float64) / 255.0
    hit = masks.any(0)
    rest = np.flatnonzero(~hit)
    if rest.size > max_points:
        rest = np.sort(np.random.default_rng(seed).choice(rest, max_points, replace=False))
    sel = np.flatnonzero(hit)
    s_rest = float(np.clip(4e4 / max(rest.size, 1), 0.5, 6.0))
    s_hit = max(2.5 * s_rest, 1.5)
    # top view: higher points drawn later (a floor never hides a table top)
    for idx, s in ((rest, s_rest), (sel, s_hit)):
        o = idx[np.argsort(c[idx, 2], kind="stable")]
        ax_top.scatter(c[o, 0], c[o, 1], c=rgb[o], s=s, marker=".", linewidths=0)
    if boxes is not None:
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 6)
        for t, (cx, cy, _, sx, sy, _) in enumerate(b):
            ax_top.add_patch(Rectangle((cx - sx / 2, cy - sy / 2), sx, sy, fill=False, lw=1.2,
                                       ec=PALETTE[t % len(PALETTE)] / 255.0))
    ax_top.set_aspect("equal")
    ax_top.set_title(f"{prefix}top view" + ("" if hit.any() else " (nothing highlighted)"))
    ax_top.set_xlabel("x (m)")
    ax_top.set_ylabel("y (m)")
    # oblique view: far points first
    xy, depth = _oblique(c, azim, elev)
    for idx, s in ((rest, s_rest), (sel, s_hit)):
        o = idx[np.argsort(depth[idx], kind="stable")]
        ax_obl.scatter(xy[o, 0], xy[o, 1], c=rgb[o], s=s, marker=".", linewidths=0)
    ax_obl.set_aspect("equal")
    ax_obl.set_axis_off()
    ax_obl.set_title(f"{prefix}oblique view (azimuth {azim:g}°, elevation {elev:g}°)")
    if masks.shape[0] and hit.any():
        names = list(labels) if labels is not None else [f"object {t}" for t in range(masks.shape[0])]
        shown = [t for t in range(masks.shape[0]) if masks[t].any()]
        handles = [Patch(color=PALETTE[t % len(PALETTE)] / 255.0, label=names[t]) for t in shown[:max_legend]]
        if len(shown) > max_legend:
            handles.append(Patch(color="none", label=f"... {len(shown) - max_legend} more"))
        ax_obl.legend(handles=handles, loc="lower right", fontsize=8, framealpha=0.8)


def slug(text: str, max_len: int = 40) -> str:
    """A file-name-safe short form of a query (``"the chair, by the window"`` -> ``the_chair_by_the_window``)."""
    s = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    return s[:max_len].rstrip("_") or "query"


def object_names(result, scene=None) -> list:
    """Legend names of a result's objects: ``id 3 chair (0.91)`` / ``proposal 2 (0.55)``, with the name the
    model's prompt gave the object where it writes names (``proposal 2 'chair' (0.55)``)."""
    out = []
    labels = getattr(scene, "labels", {}) or {}
    named = list(getattr(result, "object_names", ()) or ())  # the model's own (predicted) names, if it writes any
    for i, (row, oid, sc) in enumerate(zip(result.objects.tolist(), result.object_ids.tolist(), result.scores.tolist())):
        said = f" '{named[i]}'" if i < len(named) and named[i] else ""
        if oid >= 0:
            lab = labels.get(oid)
            out.append(f"id {oid}{' ' + lab if lab else ''}{said} ({sc:.2f})")
        else:
            out.append(f"proposal {row}{said} ({sc:.2f})")
    return out


def save_result(scene, result, out_dir, stem: Optional[str] = None, targets: Optional[Sequence[int]] = None,
                **render_kw) -> SavedPictures:
    """Write ``<stem>.ply`` (scene coloured, answer highlighted) and ``<stem>.png`` (two views) for a
    :class:`~scene3d.api.SegmentResult` on a :class:`~scene3d.api.SceneData`; returns their paths.
    ``targets`` (ground-truth object ids, possibly empty) adds a ground-truth row to the PNG (needs the
    scene's instances)."""
    out_dir = Path(out_dir)
    stem = stem or f"{scene.scene_id}_{slug(result.text)}"
    masks = result.object_masks if result.object_masks.shape[0] else result.point_mask
    colors = highlight_colors(scene.color, masks, scene.num_points)
    ply = write_ply(out_dir / f"{stem}.ply", scene.coord, colors)
    n_pts = int(result.point_mask.sum())
    title = (f'"{result.text}" -> {len(result.objects)} object(s), {n_pts} of {scene.num_points} points'
             f" [{result.source}]")
    if targets is not None:
        if scene.instance is None:
            raise ValueError(f"scene {scene.scene_id}: ground-truth targets need the scene's instance labels")
        tids = [int(t) for t in targets]
        inst = np.asarray(scene.instance)
        labels = getattr(scene, "labels", {}) or {}
        render_kw["gt_mask"] = np.stack([inst == t for t in tids]) if tids else np.zeros((0, scene.num_points), bool)
        render_kw["gt_labels"] = [f"id {t}{' ' + labels[t] if t in labels else ''}" for t in tids]
        render_kw.setdefault("gt_title", "ground truth" + ("" if tids else " (no target)"))
    png = render_png(out_dir / f"{stem}.png", scene.coord, scene.color, masks, title=title, boxes=result.boxes,
                     labels=object_names(result, scene), **render_kw)
    return SavedPictures(ply, png)


__all__ = ["PALETTE", "SavedPictures", "highlight_colors", "object_names", "render_png", "save_result", "slug",
           "write_ply"]
