"""Tiny random HF decoders for fast, exact tests."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _tiny(config_cls, model_cls, seed: int, kv_heads: int, overrides: dict):
    torch.manual_seed(seed)
    return model_cls(config_cls(**{**BASE, "num_key_value_heads": kv_heads, **overrides})).eval()


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """3 layers, 4 query heads sharing 2 KV heads."""
    return _tiny(LlamaConfig, LlamaForCausalLM, seed, 2, overrides)


def tiny_qwen2(seed: int = 0, **overrides) -> Qwen2ForCausalLM:
    """3 layers, 4 query heads sharing 1 KV head."""
    return _tiny(Qwen2Config, Qwen2ForCausalLM, seed, 1, overrides)
