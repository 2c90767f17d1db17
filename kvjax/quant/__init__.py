"""Quantized KV caches: KIVI, KVQuant, ZipCache, RotateKV, block floating point, KV4 and a
naive round-to-nearest baseline, all packed into uint32 words and composable after an
eviction policy (`snapkv:budget=0.2+kivi:bits=2`). Importing registers every method."""

from . import affine
from .attention import kivi_decode_attention_reference, register_quantized_kernel
from .base import QuantPolicy, QuantState, Stream, dequantize_state
from .bfp import BFP
from .calibration import CalibrationError
from .kivi import KIVI
from .kv4 import KV4
from .kvquant import KVQuant
from .rotatekv import RotateKV
from .rtn import RTN
from .zipcache import ZipCache

__all__ = [
    "BFP",
    "KIVI",
    "KV4",
    "RTN",
    "CalibrationError",
    "KVQuant",
    "QuantPolicy",
    "QuantState",
    "RotateKV",
    "Stream",
    "ZipCache",
    "affine",
    "dequantize_state",
    "kivi_decode_attention_reference",
    "register_quantized_kernel",
]
