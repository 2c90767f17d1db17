"""Static model configuration for the decoder families kvjax runs: Llama 2/3/3.1/3.2, Mistral,
Qwen2, Qwen3, Gemma 2, Gemma 3, Phi-3 and SmolLM2.

One dataclass describes them all: the Llama architecture plus the switches each family turns
on (q/k norms, Gemma's sandwich norms, soft-capping, local layers...). Configs are frozen,
hashable dataclasses so they can be static `jax.jit` arguments.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

#: layer_types entries (HF's names): a local (sliding-window) layer and a global one.
LOCAL, GLOBAL = "sliding_attention", "full_attention"
#: MLP activations: SwiGLU's SiLU, and GeGLU's tanh-approximated GELU (HF "gelu_pytorch_tanh").
ACTIVATIONS = ("silu", "gelu_tanh")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling.

    kind="llama3": Llama 3.1's piecewise wavelength scaling (factor, low/high frequency
    factors, original context). kind="linear": positions divided by `factor`.
    """

    kind: Literal["llama3", "linear"] = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture of one decoder (the Llama layout and each family's switches).

    Shapes follow from it: q [B, T, num_heads, head_dim], k/v [B, T, num_kv_heads, head_dim].

    Family switches (defaults: Llama):
    model_type: the HF family name ("llama", "qwen3", "gemma2", ...), for messages.
    qk_norm: RMSNorm over head_dim of every q and k head before RoPE (Qwen3, Gemma 3).
    norm_offset: RMSNorm multiplies by (norm_offset + weight): 1.0 for Gemma's zero-centred
        weights, 0.0 elsewhere.
    sandwich_norms: Gemma 2/3 blocks: the attention and MLP outputs are normed
        (post_attention_layernorm, post_feedforward_layernorm) before their residual add, and the
        MLP input norm is pre_feedforward_layernorm.
    hidden_act: the gated MLP's activation, "silu" (SwiGLU) or "gelu_tanh" (GeGLU).
    embed_scale: multiply token embeddings by sqrt(hidden_size) (Gemma).
    query_pre_attn_scalar: attention scale query_pre_attn_scalar**-0.5 instead of head_dim**-0.5.
    attn_logit_softcap / final_logit_softcap: cap * tanh(x / cap) on attention logits / on the
        output logits (Gemma 2).
    sliding_window: the window of local layers: a query sees keys with q_pos - k_pos < window.
    layer_types: per layer LOCAL or GLOBAL; None: every layer is local when sliding_window is
        set (Mistral, Phi-3), else global.
    local_rope_theta: RoPE base of local layers, which then use no rope scaling (Gemma 3); None:
        every layer uses rope_theta and rope_scaling.
    fused_projections / fused_groups: q/k/v and gate/up stored as one matrix each, laid out in
        fused_groups groups of whole heads (`kvjax.models.fuse`; one group per tensor-parallel shard).
    Shard-local fields (set by `kvjax.parallel` on the config one tensor-parallel shard runs with,
    whose head, MLP and vocabulary sizes are then the shard's): tensor_axis: the mesh axis whose
    partial sums the row-parallel matmuls reduce; vocab_parallel: the embedding and LM head hold
    this shard's vocabulary rows only.
    """

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    max_position: int = 4096
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2
    sliding_window: int | None = None  # Mistral v0.1 style local attention
    fused_projections: bool = False  # q/k/v and gate/up as one matmul each (models.fuse_projections)
    bos_id: int | None = 1
    eos_ids: tuple[int, ...] = (2,)
    pad_id: int = 0
    model_type: str = "llama"
    qk_norm: bool = False
    norm_offset: float = 0.0
    sandwich_norms: bool = False
    hidden_act: str = "silu"
    embed_scale: bool = False
    query_pre_attn_scalar: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    layer_types: tuple[str, ...] | None = None
    local_rope_theta: float | None = None
    fused_groups: int = 1
    tensor_axis: str | None = None
    vocab_parallel: bool = False

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "head_dim", "fused_groups"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{field}={getattr(self, field)} must be positive")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r}; expected one of {ACTIVATIONS}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window={self.sliding_window} must be a positive number of tokens")
        if self.layer_types is not None:
            if not isinstance(self.layer_types, tuple):
                object.__setattr__(self, "layer_types", tuple(self.layer_types))
            if len(self.layer_types) != self.num_layers or set(self.layer_types) - {LOCAL, GLOBAL}:
                raise ValueError(
                    f"layer_types={self.layer_types!r} must list {LOCAL!r} or {GLOBAL!r} for each of "
                    f"num_layers={self.num_layers} layers"
                )
            if LOCAL in self.layer_types and self.sliding_window is None:
                raise ValueError("layer_types has local layers but sliding_window is None")
        for field in ("attn_logit_softcap", "final_logit_softcap", "query_pre_attn_scalar"):
            value = getattr(self, field)
            if value is not None and not value > 0:
                raise ValueError(f"{field}={value} must be positive (or None)")
        if self.fused_projections:
            for field in ("num_heads", "num_kv_heads", "intermediate_size"):
                if getattr(self, field) % self.fused_groups:
                    raise ValueError(
                        f"{field}={getattr(self, field)} must be a multiple of fused_groups={self.fused_groups}"
                    )

    # ---- per-layer views ------------------------------------------------------------------
    def is_local(self, layer: int) -> bool:
        """Whether `layer` attends through the sliding window."""
        if self.sliding_window is None:
            return False
        return self.layer_types is None or self.layer_types[layer] == LOCAL

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of `layer` (None: a global layer). A compression policy may keep at
        most this many prompt tokens there: no later query can see an older one."""
        return self.sliding_window if self.is_local(layer) else None

    def for_layer(self, layer: int) -> LlamaConfig:
        """The config layer `layer` runs with: `sliding_window` its own window (None on a global
        layer; layer_types dropped), and on a local layer of a model with `local_rope_theta` that
        RoPE base without scaling. Policies see it as `LayerContext.config`, so their attention
        (and `ctx.config.sliding_window`) follows the layer; `init_layer` receives the model's
        config and the layer index, for which `layer_window` answers."""
        changes = {}
        if self.layer_types is not None:
            changes.update(layer_types=None, sliding_window=self.layer_window(layer))
        if self.local_rope_theta is not None:
            changes["local_rope_theta"] = None
            if self.is_local(layer):
                changes.update(rope_theta=self.local_rope_theta, rope_scaling=None)
        return dataclasses.replace(self, **changes) if changes else self

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA ratio)."""
        return self.num_heads // self.num_kv_heads

    def kv_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        """Dense K+V cache bytes for one token over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * bytes_per_element

    def num_params(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * h * (self.num_heads * 2 + self.num_kv_heads * 2)
        if self.qkv_bias:
            attn += h * (self.num_heads + 2 * self.num_kv_heads)
        if self.qk_norm:
            attn += 2 * h
        per_layer = attn + 3 * d * f + (4 if self.sandwich_norms else 2) * d
        emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.num_layers * per_layer + emb + d
