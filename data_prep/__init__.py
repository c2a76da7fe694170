"""Raw dataset readers and converters (ScanNet, ScanRefer, Multi3DRefer, Nr3D/Sr3D) and the generator of
synthetic ScanNet-format scenes. Importable on its own; the ``scene3d`` CLI is a thin layer over it."""
