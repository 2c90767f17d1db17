"""Functional Llama-family decoder (Llama 2/3/3.1, Mistral, Qwen2, SmolLM2).

    logits, kv_state = forward(params, tokens, positions, kv_state, config=..., policy=...)

Why Flax linen and not NNX: the model must be a pure function of an explicit parameter
pytree. linen's `apply(params, ...)` is exactly that, with nothing to split or merge
before `jit`, `scan` or `shard_map`, and its parameter dict maps one-to-one onto
checkpoint names, orbax and sharding rules. The KV cache is never module state: each
layer hands its slice of `kv_state` to the policy and returns the policy's new state.
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


class RMSNorm(nn.Module):
    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (xf * scale.astype(jnp.float32)).astype(self.dtype)


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

    def __call__(self, tokens):
        (table,) = promote_dtype(float_weight(self.embedding), dtype=self.dtype, inexact=False)
        return jnp.take(table, tokens, axis=0)

    def attend(self, query):
        """query [..., D] -> [..., V] (query @ embedding^T)."""

        def float_path(q):
            q, table = promote_dtype(q, float_weight(self.embedding), dtype=self.dtype)
            return jnp.dot(q, table.T)

        return dense_matmul(query, self.embedding, float_path).astype(self.dtype)


def _dense(features, name, dtype, param_dtype, bias=False):
    return Linear(features, bias, dtype, param_dtype, name=name)


class Attention(nn.Module):
    config: LlamaConfig
    policy: Any
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x, positions, state, ctx):
        c = self.config
        b, t, _ = x.shape
        nq, nkv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        if c.fused_projections:  # one [D, nq + 2 nkv] matmul (a single weight read per decode step)
            qkv = _dense(nq + 2 * nkv, "qkv_proj", self.dtype, self.param_dtype, c.qkv_bias)(x)
            q, k, v = jnp.split(qkv, [nq, nq + nkv], axis=-1)
        else:
            q = _dense(nq, "q_proj", self.dtype, self.param_dtype, c.qkv_bias)(x)
            k = _dense(nkv, "k_proj", self.dtype, self.param_dtype, c.qkv_bias)(x)
            v = _dense(nkv, "v_proj", self.dtype, self.param_dtype, c.qkv_bias)(x)
        q = apply_rope(q.reshape(b, t, c.num_heads, c.head_dim), positions, c)
        k = apply_rope(k.reshape(b, t, c.num_kv_heads, c.head_dim), positions, c)
        v = v.reshape(b, t, c.num_kv_heads, c.head_dim)
        step = self.policy.prefill if ctx.phase == "prefill" else self.policy.decode
        state, out = step(state, q, k, v, positions, ctx)
        if ctx.phase == "prefill":
            # The next layer starts only after this layer's cache is final (compressed, quantized):
            # nothing downstream reads the compressed state, so XLA's scheduler may otherwise
            # postpone every layer's compression to the end of the prompt, keeping all layers'
            # uncompressed caches and scoring buffers alive at once.
            out, state = jax.lax.optimization_barrier((out, state))
        out = out.reshape(b, t, c.num_heads * c.head_dim).astype(self.dtype)
        return _dense(c.hidden_size, "o_proj", self.dtype, self.param_dtype)(out), state


class MLP(nn.Module):
    config: LlamaConfig
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        c = self.config
        if c.fused_projections:
            gate, up = jnp.split(
                _dense(2 * c.intermediate_size, "gate_up_proj", self.dtype, self.param_dtype)(x), 2, -1
            )
        else:
            gate = _dense(c.intermediate_size, "gate_proj", self.dtype, self.param_dtype)(x)
            up = _dense(c.intermediate_size, "up_proj", self.dtype, self.param_dtype)(x)
        return _dense(c.hidden_size, "down_proj", self.dtype, self.param_dtype)(nn.silu(gate) * up)


class Block(nn.Module):
    config: LlamaConfig
    policy: Any
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x, positions, state, ctx):
        c = self.config
        h = RMSNorm(c.rms_norm_eps, self.dtype, name="input_layernorm")(x)
        h, state = Attention(c, self.policy, self.dtype, self.param_dtype, name="self_attn")(h, positions, state, ctx)
        x = x + h
        h = RMSNorm(c.rms_norm_eps, self.dtype, name="post_attention_layernorm")(x)
        return x + MLP(c, self.dtype, self.param_dtype, name="mlp")(h), state


class Llama(nn.Module):
    """Decoder. __call__(tokens [B,T], positions [B,T], layer_states, ctx) ->
    (hidden [B,T,D], layer_states). `ctx` is a `kvjax.state.LayerContext` template;
    the layer index is filled in per layer."""

    config: LlamaConfig
    policy: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        self.embed_tokens = Embed(c.vocab_size, c.hidden_size, self.dtype, self.param_dtype)
        self.layers = [
            Block(c, self.policy, self.dtype, self.param_dtype, name=f"layers_{i}") for i in range(c.num_layers)
        ]
        self.norm = RMSNorm(c.rms_norm_eps, self.dtype)
        if not c.tie_embeddings:
            self.lm_head = _dense(c.vocab_size, "lm_head", self.dtype, self.param_dtype)

    def __call__(self, tokens, positions, layer_states, ctx):
        x = self.embed_tokens(tokens)
        new_states = []
        for i, block in enumerate(self.layers):
            x, st = block(x, positions, layer_states[i], dataclasses.replace(ctx, layer=i))
            new_states.append(st)
        x = self.norm(x)
        if self.is_initializing():
            self.logits(x)  # create lm_head's parameters too
        return x, tuple(new_states)

    def logits(self, hidden):
        """hidden [..., D] -> logits [..., V] in float32."""
        if self.config.tie_embeddings:
            return self.embed_tokens.attend(hidden).astype(jnp.float32)
        return self.lm_head(hidden).astype(jnp.float32)
