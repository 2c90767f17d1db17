"""Functional Llama-family models (installed as `kvjax.models`)."""

from .config import LlamaConfig, RopeScaling
from .fuse import fuse_projections
from .forward import forward, hidden_states, init_params, logits_from_hidden
from .llama import Llama
from .presets import PRESETS, get_preset
from .rope import apply_rope, invert_rope

__all__ = [
    "LlamaConfig", "RopeScaling", "Llama", "fuse_projections", "forward", "hidden_states", "init_params",
    "logits_from_hidden", "PRESETS", "get_preset", "apply_rope", "invert_rope",
]
