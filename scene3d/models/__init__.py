"""Models: the one place where object tokens, gating, the LLM head and the mask decoder meet."""

from scene3d.gating.adapter import GateSelection
from scene3d.models.cache import SceneCache
from scene3d.models.generation import Prediction
from scene3d.models.losses import ReferringLoss
from scene3d.models.referring import QueryBatch, ReferringConfig, ReferringSegmenter
from scene3d.models.sequence import PackedSequences
from scene3d.structures.scene_inputs import SceneInputs

__all__ = ["GateSelection", "PackedSequences", "Prediction", "QueryBatch", "ReferringConfig", "ReferringLoss",
           "ReferringSegmenter", "SceneCache", "SceneInputs"]
