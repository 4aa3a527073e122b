"""Finding the parts of an HF decoder that sinkscope hooks: the transformers model inside a wrapper (peft, AVSR),
its decoder body, its list of blocks (each with `self_attn` and `mlp`), and in each block the modules whose
outputs the block adds to its residual stream."""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel

from sinkscope.errors import RecorderError


def find_hf_model(model: nn.Module) -> PreTrainedModel:
    """The outermost transformers model inside `model` (a plain HF model, a peft wrapper, an AVSR wrapper)."""
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            return module
    raise RecorderError(f"{type(model).__name__} contains no transformers PreTrainedModel to record")


def find_decoder_layers(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """The decoder body (e.g. LlamaModel) and its list of blocks, each with `self_attn` and `mlp`."""
    for module in model.modules():
        for child in module.children():
            if isinstance(child, nn.ModuleList) and len(child) > 0 and all(
                hasattr(block, "self_attn") and hasattr(block, "mlp") for block in child
            ):
                return module, child
    raise RecorderError(f"{type(model).__name__} has no list of decoder blocks with `self_attn` and `mlp`")


def first_output(output):
    """The hidden states of a module output that may be a tuple."""
    return output[0] if isinstance(output, tuple | list) else output


POST_NORMS = (("post_attention_layernorm", "post_feedforward_layernorm"),  # Gemma 2 and 3, OLMo 2, EXAONE 4
              ("post_self_attn_layernorm", "post_mlp_layernorm"))  # GLM-4
"""Pairs of norms that some blocks apply to the attention's and the MLP's outputs before adding them to the
residual stream (`h = h + norm(attn(...))`). Both names of a pair must be present: in Llama-like blocks
`post_attention_layernorm` is the norm *before* the MLP."""


def block_contributions(block: nn.Module) -> tuple[nn.Module, nn.Module, float]:
    """The modules whose outputs `block` adds to its residual stream for its attention and for its MLP, and the
    factor it scales both by: `self_attn` and `mlp` in Llama-like and parallel blocks; the post-norms (POST_NORMS)
    where the block has them; Granite's `residual_multiplier`. So that the recorder's `attn_out` and `mlp_out` are
    the block's two updates, `h_out = h_in + attn_out + mlp_out`, which the recorder checks once (`Recorder`)."""
    scale = getattr(block, "residual_multiplier", 1.0)
    scale = float(scale) if isinstance(scale, int | float) else 1.0
    for attn_name, mlp_name in POST_NORMS:
        attn, mlp = getattr(block, attn_name, None), getattr(block, mlp_name, None)
        if isinstance(attn, nn.Module) and isinstance(mlp, nn.Module):
            return attn, mlp, scale
    return block.self_attn, block.mlp, scale
