"""LLM head: any local Hugging Face causal LM with object identifier tokens, prompts, the tiny test model."""

from scene3d.llm.loader import IdentifierLM, LLMConfig, LMOutput, identifier_tokens, load_llm, load_tokenizer
from scene3d.llm.prompt import (IdentifierVocab, ParsedAnswer, PromptConfig, ScenePrompt, build_prompt,
                                identifier_permutation, keep_largest_objects, parse_answer)
from scene3d.llm.tiny import TinyLLMConfig, build_tiny_llm, build_tiny_tokenizer, save_tiny_llm

__all__ = ["IdentifierLM", "IdentifierVocab", "LLMConfig", "LMOutput", "ParsedAnswer", "PromptConfig",
           "ScenePrompt", "TinyLLMConfig", "build_prompt", "build_tiny_llm", "build_tiny_tokenizer",
           "identifier_permutation", "identifier_tokens", "keep_largest_objects", "load_llm", "load_tokenizer",
           "parse_answer", "save_tiny_llm"]
