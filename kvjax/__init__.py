"""kvjax: long-context LLM inference in JAX with compressed KV caches."""

from . import (  # `kvjax.generate(model, prompts, ...)` is callable
    attention,
    attention_kernels,  # registers attend(implementation="pallas")
    generate,
    native,  # CPU decode matmuls on GGUF blocks (built on first use, not at import)
    policies,
    quant,  # registers the quantized caches (kivi, kvquant, ...)
)
from .loaders import load
from .models import LlamaConfig, get_preset
from .policies import parse_policy
from .state import KVState, LayerContext, SlotKV

__version__ = "0.1.0"
