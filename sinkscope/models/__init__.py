"""Models: the LLM loader (and, later, the AVSR model)."""

from sinkscope.models.llm import KNOWN_MODELS, load_llm

__all__ = ["KNOWN_MODELS", "load_llm"]
