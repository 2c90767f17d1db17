"""Functional decoder for the Llama layout and the families built on it (Llama 2/3/3.1/3.2,
Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3, Phi-3, SmolLM2; `LlamaConfig` holds their switches).

    logits, kv_state = forward(params, tokens, positions, kv_state, config=..., policy=...)

Why Flax linen and not NNX: the model must be a pure function of an explicit parameter
pytree. linen's `apply(params, ...)` is exactly that, with nothing to split or merge
before `jit`, `scan` or `shard_map`, and its parameter dict maps one-to-one onto
checkpoint names, orbax and sharding rules. The KV cache is never module state: each
layer hands its slice of `kv_state` to the policy and returns the policy's new state.

Each layer runs with its own config (`LlamaConfig.for_layer`: a local layer's window and RoPE
base) and hands it to the policy as `LayerContext.config`. Under tensor parallelism
(`kvjax.parallel`) the same code runs on one shard with the shard's config (`tensor_axis` set):
q/k/v and gate/up produce the shard's heads and MLP columns, o_proj and down_proj produce partial
sums that one `psum` per block reduces, the embedding and LM head hold the shard's vocabulary
rows (Megatron-LM's layout, Shoeybi et al. 2019).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from kvjax.native.weights import dense_matmul, float_weight

from .config import LlamaConfig
from .rope import apply_rope
from .softcap import SoftcapAttention


class RMSNorm(nn.Module):
    """x / rms(x) * (offset + scale), computed in float32 (offset 1 for Gemma's zero-centred
    weights)."""

    eps: float
    dtype: Any = jnp.float32
    offset: float = 0.0

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.zeros if self.offset else nn.initializers.ones
        scale = self.param("scale", init, (x.shape[-1],), jnp.float32)
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (xf * (self.offset + scale.astype(jnp.float32))).astype(self.dtype)


def _norm(c: LlamaConfig, dtype, name: str) -> RMSNorm:
    return RMSNorm(c.rms_norm_eps, dtype, c.norm_offset, name=name)


def _reduce(c: LlamaConfig, y):
    """Sum a row-parallel matmul's partial results over the tensor-parallel shards."""
    return y if c.tensor_axis is None else jax.lax.psum(y, c.tensor_axis)


def split_groups(y, sizes, groups: int):
    """The outputs of a fused projection laid out in `groups` groups (`kvjax.models.fuse`):
    y [..., sum(sizes)] -> [y_i [..., sizes[i]]], each part's columns in their original order."""
    lead = y.shape[:-1]
    y = y.reshape(*lead, groups, -1)
    cuts, at = [], 0
    for size in sizes[:-1]:
        at += size // groups
        cuts.append(at)
    return [p.reshape(*lead, -1) for p in jnp.split(y, cuts, axis=-1)]


class Linear(nn.Module):
    """nn.Dense's parameters ('kernel' [in, out], 'bias' [out]) and math. The kernel may also be
    a `kvjax.native.QuantizedWeight` (the float kernel plus the GGUF blocks it came from): then
    few rows (decode) on a CPU read the blocks through the native kernel (`dense_matmul`)."""

    features: int
    use_bias: bool
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.normal(0.02), (x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype) if self.use_bias else None

        def float_path(x):
            x, k = promote_dtype(x, float_weight(kernel), dtype=self.dtype)
            return jax.lax.dot_general(x, k, (((x.ndim - 1,), (0,)), ((), ())))

        y = dense_matmul(x, kernel, float_path).astype(self.dtype)
        if bias is not None:
            y = y + promote_dtype(bias, dtype=self.dtype)[0]
        return y


class Embed(nn.Module):
    """nn.Embed's parameter ('embedding' [V, D]) and math; the table may be a QuantizedWeight
    (the tied LM head then reads its blocks in decode, as Linear does)."""

    num_embeddings: int
    features: int
    dtype: Any
    param_dtype: Any

    def setup(self):
        self.embedding = self.param(
            "embedding", nn.initializers.normal(0.02), (self.num_embeddings, self.features), self.param_dtype
        )

    def __call__(self, tokens, tensor_axis: str | None = None):
        """tokens [...] -> [..., D]. tensor_axis: the table holds one shard's contiguous block of
        vocabulary rows; tokens outside it give zeros, and the shards' rows are summed."""
        (table,) = promote_dtype(float_weight(self.embedding), dtype=self.dtype, inexact=False)
        if tensor_axis is None:
            return jnp.take(table, tokens, axis=0)
        local = tokens - jax.lax.axis_index(tensor_axis) * self.num_embeddings
        mine = (local >= 0) & (local < self.num_embeddings)
        rows = jnp.take(table, jnp.clip(local, 0, self.num_embeddings - 1), axis=0)
        return jax.lax.psum(jnp.where(mine[..., None], rows, 0).astype(self.dtype), tensor_axis)

    def attend(self, query):
        """query [..., D] -> [..., V] (query @ embedding^T)."""

        def float_path(q):
            q, table = promote_dtype(q, float_weight(self.embedding), dtype=self.dtype)
            return jnp.dot(q, table.T)

        return dense_matmul(query, self.embedding, float_path).astype(self.dtype)


def _dense(features, name, dtype, param_dtype, bias=False):
    return Linear(features, bias, dtype, param_dtype, name=name)


class Attention(nn.Module):
    config: LlamaConfig  # this layer's (`LlamaConfig.for_layer`)
    policy: Any
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x, positions, state, ctx, policy_params=None):
        c = self.config
        b, t, _ = x.shape
        nq, nkv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        if c.fused_projections:  # one [D, nq + 2 nkv] matmul (a single weight read per decode step)
            qkv = _dense(nq + 2 * nkv, "qkv_proj", self.dtype, self.param_dtype, c.qkv_bias)(x)
            q, k, v = split_groups(qkv, (nq, nkv, nkv), c.fused_groups)
        else:
            q = _dense(nq, "q_proj", self.dtype, self.param_dtype, c.qkv_bias)(x)
            k = _dense(nkv, "k_proj", self.dtype, self.param_dtype, c.qkv_bias)(x)
            v = _dense(nkv, "v_proj", self.dtype, self.param_dtype, c.qkv_bias)(x)
        q = q.reshape(b, t, c.num_heads, c.head_dim)
        k = k.reshape(b, t, c.num_kv_heads, c.head_dim)
        if c.qk_norm:  # per-head RMSNorm over head_dim before RoPE (Qwen3, Gemma 3)
            q = _norm(c, self.dtype, "q_norm")(q)
            k = _norm(c, self.dtype, "k_norm")(k)
        q = apply_rope(q, positions, c)
        k = apply_rope(k, positions, c)
        v = v.reshape(b, t, c.num_kv_heads, c.head_dim)
        if c.query_pre_attn_scalar is not None:
            # Attention scales logits by head_dim**-0.5; Gemma's scale is query_pre_attn_scalar**-0.5.
            q = (q * ((c.head_dim / c.query_pre_attn_scalar) ** 0.5)).astype(q.dtype)
        if c.attn_logit_softcap is not None:
            ctx = dataclasses.replace(ctx, implementation=SoftcapAttention(c.attn_logit_softcap, ctx.implementation))
        step = self.policy.prefill if ctx.phase == "prefill" else self.policy.decode
        if policy_params is None:
            state, out = step(state, q, k, v, positions, ctx)
        else:  # traced policy parameters (`forward(..., policy_params=...)`): jax.grad reaches them
            if not getattr(self.policy, "takes_params", False):
                raise ValueError(
                    f"policy_params were given but policy {self.policy.spec()!r} takes no traced parameters"
                )
            state, out = step(state, q, k, v, positions, ctx, params=policy_params)
        if ctx.phase == "prefill":
            # The next layer starts only after this layer's cache is final (compressed, quantized):
            # nothing downstream reads the compressed state, so XLA's scheduler may otherwise
            # postpone every layer's compression to the end of the prompt, keeping all layers'
            # uncompressed caches and scoring buffers alive at once.
            out, state = jax.lax.optimization_barrier((out, state))
        out = out.reshape(b, t, c.num_heads * c.head_dim).astype(self.dtype)
        return _reduce(c, _dense(c.hidden_size, "o_proj", self.dtype, self.param_dtype)(out)), state


def _activation(name: str):
    return nn.silu if name == "silu" else (lambda x: nn.gelu(x, approximate=True))


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)), SwiGLU or GeGLU (`LlamaConfig.hidden_act`)."""

    config: LlamaConfig
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        c = self.config
        f = c.intermediate_size
        if c.fused_projections:
            fused = _dense(2 * f, "gate_up_proj", self.dtype, self.param_dtype)(x)
            gate, up = split_groups(fused, (f, f), c.fused_groups)
        else:
            gate = _dense(f, "gate_proj", self.dtype, self.param_dtype)(x)
            up = _dense(f, "up_proj", self.dtype, self.param_dtype)(x)
        h = _activation(c.hidden_act)(gate) * up
        return _reduce(c, _dense(c.hidden_size, "down_proj", self.dtype, self.param_dtype)(h))


class Block(nn.Module):
    """Pre-norm decoder block; with `sandwich_norms` (Gemma 2/3) the attention and MLP outputs are
    normed too before their residual adds."""

    config: LlamaConfig  # this layer's (`LlamaConfig.for_layer`)
    policy: Any
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x, positions, state, ctx, policy_params=None):
        c = self.config
        h = _norm(c, self.dtype, "input_layernorm")(x)
        attn = Attention(c, self.policy, self.dtype, self.param_dtype, name="self_attn")
        h, state = attn(h, positions, state, ctx, policy_params)
        if c.sandwich_norms:
            x = x + _norm(c, self.dtype, "post_attention_layernorm")(h)
            h = _norm(c, self.dtype, "pre_feedforward_layernorm")(x)
            h = MLP(c, self.dtype, self.param_dtype, name="mlp")(h)
            return x + _norm(c, self.dtype, "post_feedforward_layernorm")(h), state
        x = x + h
        h = _norm(c, self.dtype, "post_attention_layernorm")(x)
        return x + MLP(c, self.dtype, self.param_dtype, name="mlp")(h), state


class Llama(nn.Module):
    """Decoder. __call__(tokens [B,T], positions [B,T], layer_states, ctx, policy_params=None) ->
    (hidden [B,T,D], layer_states). `ctx` is a `kvjax.state.LayerContext` template;
    the layer index and the layer's config are filled in per layer. policy_params: a pytree of
    traced policy parameters handed whole to every layer's policy call as `params=` (the policy
    picks its layer's slice by `ctx.layer`); only policies with `takes_params` accept them."""

    config: LlamaConfig
    policy: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        self.embed_tokens = Embed(c.vocab_size, c.hidden_size, self.dtype, self.param_dtype)
        self.layers = [
            Block(c.for_layer(i), self.policy, self.dtype, self.param_dtype, name=f"layers_{i}")
            for i in range(c.num_layers)
        ]
        self.norm = RMSNorm(c.rms_norm_eps, self.dtype, c.norm_offset)
        if not c.tie_embeddings:
            self.lm_head = _dense(c.vocab_size, "lm_head", self.dtype, self.param_dtype)

    def __call__(self, tokens, positions, layer_states, ctx, policy_params=None):
        c = self.config
        x = self.embed_tokens(tokens, c.tensor_axis if c.vocab_parallel else None)
        if c.embed_scale:  # Gemma: sqrt(hidden_size), rounded to the compute dtype as HF does
            x = x * jnp.asarray(c.hidden_size**0.5, x.dtype)
        new_states = []
        for i, block in enumerate(self.layers):
            layer_ctx = dataclasses.replace(ctx, layer=i, config=c.for_layer(i))
            x, st = block(x, positions, layer_states[i], layer_ctx, policy_params)
            new_states.append(st)
        x = self.norm(x)
        if self.is_initializing():
            self.logits(x)  # create lm_head's parameters too
        return x, tuple(new_states)

    def logits(self, hidden):
        """hidden [..., D] -> logits [..., V] in float32 (soft-capped when the model does; under
        a vocabulary-parallel shard, the shards' columns gathered)."""
        c = self.config
        if c.tie_embeddings:
            out = self.embed_tokens.attend(hidden).astype(jnp.float32)
        else:
            out = self.lm_head(hidden).astype(jnp.float32)
        if c.vocab_parallel:
            out = jax.lax.all_gather(out, c.tensor_axis, axis=out.ndim - 1, tiled=True)
        if c.final_logit_softcap is not None:
            out = c.final_logit_softcap * jnp.tanh(out / c.final_logit_softcap)
        return out
