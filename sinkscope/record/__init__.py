"""Recording: the streamed attention function and the Recorder context manager."""

from sinkscope.record.recorder import Recorder, find_decoder_layers, find_hf_model

__all__ = ["Recorder", "find_decoder_layers", "find_hf_model"]
