"""Inference helpers that sit on top of the model folders (real-time streaming decoding)."""

from .streaming import PoyoStreamingDecoder, StreamingOutput

__all__ = ["PoyoStreamingDecoder", "StreamingOutput"]
