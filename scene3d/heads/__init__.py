"""Output heads: the grounding head (which objects, from the LLM's states) and the mask head (which points)."""

from scene3d.heads.grounding import FourierEncoding, GroundingHead
from scene3d.heads.mask_decoder import DecoderOutput, MaskDecoder, MaskDecoderConfig

__all__ = ["DecoderOutput", "FourierEncoding", "GroundingHead", "MaskDecoder", "MaskDecoderConfig"]
