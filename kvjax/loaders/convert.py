"""Map checkpoint tensors (HF names, [out, in] matrices) onto the linen parameter tree."""

from __future__ import annotations

import numpy as np

from ..models.config import LlamaConfig
from .errors import ModelFileError


def expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape ([out, in] for linear weights)."""
    c = config
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    shapes = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size), "model.norm.weight": (c.hidden_size,)}
    if not c.tie_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (c.hidden_size,),
            p + "post_attention_layernorm.weight": (c.hidden_size,),
            p + "self_attn.q_proj.weight": (q, c.hidden_size),
            p + "self_attn.k_proj.weight": (kv, c.hidden_size),
            p + "self_attn.v_proj.weight": (kv, c.hidden_size),
            p + "self_attn.o_proj.weight": (c.hidden_size, q),
            p + "mlp.gate_proj.weight": (c.intermediate_size, c.hidden_size),
            p + "mlp.up_proj.weight": (c.intermediate_size, c.hidden_size),
            p + "mlp.down_proj.weight": (c.hidden_size, c.intermediate_size),
        })
        if c.qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
    return shapes


def to_params(tensors: dict[str, np.ndarray], config: LlamaConfig, dtype, source: str) -> dict:
    """Check names and shapes against `config`, then build {'params': ...} (numpy arrays
    cast to `dtype`; linear weights transposed to linen's [in, out])."""
    import jax.numpy as jnp

    expected = expected_shapes(config)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ModelFileError(f"{source}: missing {len(missing)} tensors for {config.name}, e.g. {missing[:3]}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ModelFileError(
                f"{source}: tensor {name} has shape {tuple(tensors[name].shape)}, config expects {shape}"
            )

    def arr(x, transpose=False):
        x = np.asarray(x, dtype=np.float32)
        if not np.all(np.isfinite(x)):
            raise ModelFileError(f"{source}: non-finite values in a weight tensor (corrupt file?)")
        return jnp.asarray(x.T if transpose else x, dtype=dtype)

    params = {"embed_tokens": {"embedding": arr(tensors["model.embed_tokens.weight"])},
              "norm": {"scale": arr(tensors["model.norm.weight"])}}
    if not config.tie_embeddings:
        params["lm_head"] = {"kernel": arr(tensors["lm_head.weight"], True)}
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        attn = {}
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            attn[proj] = {"kernel": arr(tensors[p + f"self_attn.{proj}.weight"], True)}
            if config.qkv_bias and proj != "o_proj":
                attn[proj]["bias"] = arr(tensors[p + f"self_attn.{proj}.bias"])
        params[f"layers_{i}"] = {
            "input_layernorm": {"scale": arr(tensors[p + "input_layernorm.weight"])},
            "post_attention_layernorm": {"scale": arr(tensors[p + "post_attention_layernorm.weight"])},
            "self_attn": attn,
            "mlp": {proj: {"kernel": arr(tensors[p + f"mlp.{proj}.weight"], True)}
                    for proj in ("gate_proj", "up_proj", "down_proj")},
        }
    return {"params": params}
