"""Forward + backward time of the sparse U-Net (scene3d.tokenizer.backbone.SparseUNet, default config) on random
voxels, on CPU or on spconv's CUDA build. Prints figures (median of --repeats after 3 warm-ups); asserts nothing.

    .venv/bin/python bench/sparse_unet.py --voxels 20000
    python3 bench/sparse_unet.py --device cuda --voxels 200000 --json out.json      # tools/gpu_check.sh
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from scene3d.sparse.spconv_compat import sparse_tensor  # noqa: E402
from scene3d.tokenizer.backbone import BackboneConfig, SparseUNet  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--voxels", type=int, default=20000, help="random voxels drawn (duplicates merged)")
    ap.add_argument("--grid", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    net = SparseUNet(BackboneConfig()).to(dev)
    idx = torch.unique(torch.randint(0, args.grid, (args.voxels, 3)), dim=0)
    idx = torch.cat([torch.zeros(len(idx), 1, dtype=idx.dtype), idx], 1).int().to(dev)
    feat = torch.randn(len(idx), net.cfg.in_channels, device=dev)

    def step():
        net(sparse_tensor(feat, idx, [args.grid] * 3, 1)).features.sum().backward()

    for _ in range(3):
        step()
    times = []
    for _ in range(args.repeats):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    res = {"device": str(dev), "voxels": len(idx), "ms": 1e3 * statistics.median(times),
           "threads": torch.get_num_threads()}
    print(f"sparse U-Net {BackboneConfig().channels}, {len(idx)} voxels, {dev}: {res['ms']:.1f} ms per forward+backward "
          f"(median of {args.repeats})")
    if args.json:
        with open(args.json + ".tmp", "w") as fh:
            json.dump(res, fh)
        os.replace(args.json + ".tmp", args.json)
    return res


if __name__ == "__main__":
    main()
