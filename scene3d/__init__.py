"""scene3d: 3D referring segmentation on ScanNet-format scenes.

Point clouds pass through a sparse-conv object tokenizer (spconv) with octree geometry codes and object
identifier tokens (``<OBJ000>`` ...) into an LLM head that answers "which points are *the chair left of the
desk*?". See ``DESIGN.md`` in the shared folder and the README for the architecture.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
