"""Model loaders: GGUF files and HF safetensors directories (no hub access)."""

from .errors import ModelFileError
from .load import Model, load

__all__ = ["Model", "ModelFileError", "load"]
