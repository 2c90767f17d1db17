"""kvjax: long-context LLM inference in JAX with compressed KV caches."""

from . import attention, generate, policies  # `kvjax.generate(model, prompts, ...)` is callable
from . import attention_kernels  # registers attend(implementation="pallas")
from . import quant  # registers the quantized caches (kivi, kvquant, ...)
from . import native  # CPU decode matmuls on GGUF blocks (built on first use, not at import)
from .models import LlamaConfig, get_preset
from .loaders import load
from .policies import parse_policy
from .state import KVState, LayerContext, SlotKV

__version__ = "0.1.0"
