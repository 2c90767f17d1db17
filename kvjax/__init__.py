"""kvjax: long-context LLM inference in JAX with compressed KV caches.

`kvjax.load` a model, then `kvjax.generate(model, prompts, policy="snapkv:budget=0.2")` (text
in, text out, with stats) or `kvjax.stream(...)` (the same, token by token); the low-level
compiled steps are in `kvjax.generation`, the policies in `kvjax.policies` and `kvjax.quant`.
"""

from . import (
    attention,
    attention_kernels,
    native,  # CPU decode matmuls on GGUF blocks (built on first use, not at import)
    policies,
    quant,  # registers the quantized caches (kivi, kvquant, ...)
)
from .ape import ape
from .generation import GenerateOutput, generate, stream
from .loaders import load
from .models import LlamaConfig, get_preset
from .policies import parse_policy
from .session import Session
from .state import KVState, LayerContext, SlotKV

__version__ = "0.1.0"

__all__ = [
    "GenerateOutput",
    "KVState",
    "LayerContext",
    "LlamaConfig",
    "Session",
    "SlotKV",
    "__version__",
    "ape",
    "attention",
    "attention_kernels",
    "generate",
    "get_preset",
    "load",
    "native",
    "parse_policy",
    "policies",
    "quant",
    "stream",
]
