"""Scene data: loading processed scenes (and, later, datasets, transforms, collate)."""

from scene3d.data.scene import Scene, SceneFormatError, SceneObject, load_processed_scene

__all__ = ["Scene", "SceneFormatError", "SceneObject", "load_processed_scene"]
