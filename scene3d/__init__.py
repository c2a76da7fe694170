"""scene3d: 3D referring segmentation on ScanNet-format scenes.

Point clouds pass through a sparse-conv object tokenizer (spconv) with octree geometry codes and object
identifier tokens (``<OBJ000>`` ...) into an LLM head that answers "which points are *the chair left of the
desk*?". See ``DESIGN.md`` in the shared folder and the README for the architecture.

``from scene3d import Segmenter`` is the query API (:mod:`scene3d.api`); it is imported on first use so that
``import scene3d`` (and the CLI's ``--version``) does not load torch.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "Segmenter", "SceneData", "SegmentResult"]

_LAZY = {"Segmenter": "scene3d.api", "SceneData": "scene3d.api", "SegmentResult": "scene3d.api"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'scene3d' has no attribute {name!r}")
