"""Finding the parts of an HF decoder that sinkscope hooks: the transformers model inside a wrapper (peft, AVSR),
its decoder body and its list of blocks (each with `self_attn` and `mlp`)."""

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
