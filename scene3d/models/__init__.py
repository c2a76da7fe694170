"""Models: the one place where object tokens, gating, the LLM head and the mask decoder meet."""

from scene3d.models.cache import SceneCache
from scene3d.models.referring import (GateSelection, ModelInputs, Prediction, ReferringBatch, ReferringConfig,
                                      ReferringLoss, ReferringSegmenter, SceneInputs)

__all__ = ["GateSelection", "ModelInputs", "Prediction", "ReferringBatch", "ReferringConfig", "ReferringLoss",
           "ReferringSegmenter", "SceneCache", "SceneInputs"]
