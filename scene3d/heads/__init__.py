"""Output heads: the mask decoder that turns the LLM's [SEG] state into point masks and object scores."""

from scene3d.heads.mask_decoder import DecoderOutput, FourierEncoding, MaskDecoder, MaskDecoderConfig

__all__ = ["DecoderOutput", "FourierEncoding", "MaskDecoder", "MaskDecoderConfig"]
