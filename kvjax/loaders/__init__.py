"""Model loaders: GGUF files and HF safetensors directories (no hub access)."""

from .dtypes import bfloat16_supported, compute_dtype
from .errors import ModelFileError
from .load import Model, load

__all__ = ["Model", "ModelFileError", "bfloat16_supported", "compute_dtype", "load"]
