"""Recording: the streamed attention function and the Recorder context manager."""

from sinkscope.record.blocks import find_decoder_layers, find_hf_model
from sinkscope.record.recorder import Recorder

__all__ = ["Recorder", "find_decoder_layers", "find_hf_model"]
