"""Models: the offline LLM loader (`llm`), the encoders, the AVSR model (`avsr`), and trained models on disk
(`pretrained`: the `demo` registry, loading runs and exports, export)."""

from sinkscope.models.llm import KNOWN_MODELS, load_llm

__all__ = ["KNOWN_MODELS", "load_llm"]
