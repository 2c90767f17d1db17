"""Functional decoder models: the Llama layout and the families built on it (installed as
`kvjax.models`)."""

from .config import LlamaConfig, RopeScaling
from .forward import forward, hidden_states, init_params, logits_from_hidden
from .fuse import fuse_projections, unfuse_projections
from .llama import Llama
from .presets import PRESETS, get_preset
from .rope import apply_rope, invert_rope

__all__ = [
    "PRESETS",
    "Llama",
    "LlamaConfig",
    "RopeScaling",
    "apply_rope",
    "forward",
    "fuse_projections",
    "get_preset",
    "hidden_states",
    "init_params",
    "invert_rope",
    "logits_from_hidden",
    "unfuse_projections",
]
