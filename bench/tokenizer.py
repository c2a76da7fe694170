"""Tokenizer figures: octree compression and sparse U-Net throughput on CPU.

Prints, per scene (a real-size synthetic ScanNet-format scene and the real ScanNet exports of mmdetection3d):
occupied voxels, plain octree tokens, compressed tokens, reduction ratio (goal >= 8x vs occupied voxels),
bits per point, encode+decode points/s (``scene3d.tokenizer.octree.octree_stats``), and backbone
forward+backward scenes/s.

    .venv/bin/python bench/tokenizer.py [--voxel-size 0.02] [--repeats 2] [--real-root ../shared/data/real]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scene3d.sparse.spconv_compat import sparse_tensor  # noqa: E402
from scene3d.structures.points import PointBatch  # noqa: E402
from scene3d.tokenizer.backbone import BackboneConfig, SparseUNet  # noqa: E402
from scene3d.tokenizer.model import input_features  # noqa: E402
from scene3d.tokenizer.voxelize import voxelize  # noqa: E402

REAL_EXPORTS = "open-mmlab__mmdetection3d/tests/data/scannet/scannet_train_instance_data"


def synthetic_scene(seed: int = 0):
    """A real-size synthetic ScanNet-format scene (``scene3d synth --preset real``: ~150k vertices, ~35
    objects), run through the real preprocessing in memory. Returns (coord, rgb in [0,1], instance)."""
    import tempfile

    from data_prep.scannet import build_scene, read_label_tsv
    from data_prep.synth import generate_dataset

    with tempfile.TemporaryDirectory() as tmp:
        out = generate_dataset(tmp, num_scenes=1, seed=seed, preset="real")
        sid = out["scenes"][0]
        scene = build_scene(Path(tmp) / "scans" / sid, read_label_tsv(out["files"]["labels"]))
    a = scene["arrays"]
    return a["coord"], a["color"].astype(np.float32) / 255.0, a["instance"].astype(np.int64)


def real_scenes(root: Path):
    folder = root / REAL_EXPORTS
    for name in ("scene0000_01", "scene0000_02"):
        vert_f, ins_f = folder / f"{name}_vert_all.npy", folder / f"{name}_ins_label_all.npy"
        if not vert_f.exists() or not ins_f.exists():
            print(f"[skip] {name}: {vert_f} or {ins_f} missing")
            continue
        vert = np.load(vert_f, allow_pickle=False)
        ins = np.load(ins_f, allow_pickle=False)
        if vert.ndim != 2 or vert.shape[1] != 6 or len(ins) != len(vert):
            raise ValueError(f"{vert_f}: expected [N, 6] with {len(ins)} labels, got {vert.shape}")
        yield name, vert[:, :3], vert[:, 3:] / 255.0, ins.astype(np.int64) - 1  # objectId+1 -> objectId, -1 none


def backbone_scenes_per_s(coord, color, voxel_size: float, repeats: int) -> tuple[float, int]:
    torch.manual_seed(0)
    cfg = BackboneConfig(in_channels=6)
    net = SparseUNet(cfg).train()
    pts = PointBatch.from_list([{"coord": torch.from_numpy(coord), "color": torch.from_numpy(color)}])
    vox = voxelize(pts, voxel_size, feat=input_features(pts))
    step = 2 ** cfg.depth
    shape = [((s + step - 1) // step) * step for s in vox.spatial_shape]

    def step_once():
        out = net(sparse_tensor(vox.feat, vox.indices, shape, 1))
        out.features[vox.inverse].square().mean().backward()

    step_once()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        step_once()
    return repeats / (time.perf_counter() - t0), vox.num_voxels


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--voxel-size", type=float, default=0.02)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--real-root", type=Path,
                    default=Path(os.environ.get("SCENE3D_REAL_DATA", Path(__file__).resolve().parents[2] / "shared/data/real")))
    args = ap.parse_args(argv)

    from scene3d.tokenizer.octree import octree_stats

    scenes = [("synthetic (real preset)", *synthetic_scene())] + list(real_scenes(args.real_root))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()} (spconv runs single-threaded), "
          f"voxel {args.voxel_size} m")
    head = (f"{'scene':<20}{'points':>8}{'part':>9}{'voxels':>9}{'plain':>9}{'compr':>8}{'ratio':>7}"
            f"{'bits/pt':>8}{'pts/s':>11}{'lossless':>9}")
    print(head)
    for name, coord, color, inst in scenes:
        st = octree_stats(torch.from_numpy(coord), torch.from_numpy(inst), voxel_size=args.voxel_size)
        for part, f in (("scene", st.scene), ("objects", st.objects)):
            print(f"{name:<20}{f.num_points:>8}{part:>9}{f.occupied_voxels:>9}{f.plain_tokens:>9}"
                  f"{f.compressed_tokens:>8}{f.reduction_ratio:>6.1f}x{f.bits_per_point:>8.2f}"
                  f"{f.points_per_s:>11.3g}{str(f.lossless):>9}")
    print(f"\nbackbone (channels {BackboneConfig().channels}, forward+backward, CPU):")
    for name, coord, color, _ in scenes:
        sps, nv = backbone_scenes_per_s(coord, color, args.voxel_size, args.repeats)
        print(f"{name:<20} {nv:>7} voxels  {sps:.3f} scenes/s")


if __name__ == "__main__":
    main()
