"""Quantized KV caches: KIVI, KVQuant, ZipCache, RotateKV, block floating point, KV4 and a
naive round-to-nearest baseline, all packed into uint32 words and composable after an
eviction policy (`snapkv:budget=0.2+kivi:bits=2`). Importing registers every method."""

from . import affine
from .attention import kivi_decode_attention_reference, register_quantized_kernel
from .base import QuantPolicy, QuantState, Stream, dequantize_state
from .kivi import KIVI
from .rtn import RTN

__all__ = ["KIVI", "RTN", "QuantPolicy", "QuantState", "Stream", "affine", "dequantize_state",
           "kivi_decode_attention_reference", "register_quantized_kernel"]
