"""Reading one ``.npy`` array of a processed scene, shared by the scene3d and the foreign-format loaders."""

from __future__ import annotations

from pathlib import Path

import numpy as np


class SceneFormatError(ValueError):
    """A processed scene file is missing or does not match the format; the message names the file."""


def load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise SceneFormatError(f"{path}: missing file") from None
    except (ValueError, OSError, EOFError) as e:
        raise SceneFormatError(f"{path}: not a readable .npy array ({e})") from None
