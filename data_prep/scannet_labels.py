"""Old home of :mod:`scene3d.data.labels` (the ScanNet class lists, read at run time by the scene loaders).

Kept as a re-export because bench/prep_scannet.py imports these names from here.
"""

from scene3d.data.labels import (  # noqa: F401
    CLASS_LABELS_20,
    CLASS_LABELS_200,
    NYU40_CLASSES,
    VALID_CLASS_IDS_20,
    VALID_CLASS_IDS_200,
)
