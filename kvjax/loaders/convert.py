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
        shapes.update(
            {
                p + "input_layernorm.weight": (c.hidden_size,),
                p + "post_attention_layernorm.weight": (c.hidden_size,),
                p + "self_attn.q_proj.weight": (q, c.hidden_size),
                p + "self_attn.k_proj.weight": (kv, c.hidden_size),
                p + "self_attn.v_proj.weight": (kv, c.hidden_size),
                p + "self_attn.o_proj.weight": (c.hidden_size, q),
                p + "mlp.gate_proj.weight": (c.intermediate_size, c.hidden_size),
                p + "mlp.up_proj.weight": (c.intermediate_size, c.hidden_size),
                p + "mlp.down_proj.weight": (c.hidden_size, c.intermediate_size),
            }
        )
        if c.qkv_bias:
            shapes.update(
                {
                    p + "self_attn.q_proj.bias": (q,),
                    p + "self_attn.k_proj.bias": (kv,),
                    p + "self_attn.v_proj.bias": (kv,),
                }
            )
    return shapes


def to_params(
    tensors: dict[str, np.ndarray],
    config: LlamaConfig,
    dtype,
    source: str,
    blocks: dict[str, tuple[str, np.ndarray]] | None = None,
) -> dict:
    """Check names and shapes against `config`, then build {'params': ...} (numpy arrays
    cast to `dtype`; linear weights transposed to linen's [in, out]).

    blocks: HF name -> (block type, uint8 [N, K/32*bytes]) GGUF blocks of the same weights; those
    weights become `kvjax.native.QuantizedWeight`s (the float array plus the blocks, read by the
    CPU decode kernel). The embedding table keeps its blocks only when it is the tied LM head."""
    import jax.numpy as jnp

    from ..native.quantized_matmul import check_blocks
    from ..native.weights import QuantizedWeight

    blocks = dict(blocks or {})
    if not config.tie_embeddings:
        blocks.pop("model.embed_tokens.weight", None)

    expected = expected_shapes(config)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ModelFileError(f"{source}: missing {len(missing)} tensors for {config.name}, e.g. {missing[:3]}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ModelFileError(
                f"{source}: tensor {name} has shape {tuple(tensors[name].shape)}, config expects {shape}"
            )

    def arr(name, transpose=False):
        x = np.asarray(tensors[name], dtype=np.float32)
        if not np.all(np.isfinite(x)):
            raise ModelFileError(f"{source}: non-finite values in a weight tensor (corrupt file?)")
        x = jnp.asarray(x.T if transpose else x, dtype=dtype)
        if name not in blocks:
            return x
        kind, data = blocks[name]
        rows, k = tensors[name].shape
        try:
            if check_blocks(data, kind, k) != rows:
                raise ValueError(f"{data.shape[0]} block rows, expected N={rows}")
        except ValueError as e:
            raise ModelFileError(
                f"{source}: the {kind} blocks of {name} do not match its shape {(rows, k)}: {e}"
            ) from e
        return QuantizedWeight(x, jnp.asarray(data), kind)

    params = {
        "embed_tokens": {"embedding": arr("model.embed_tokens.weight")},
        "norm": {"scale": arr("model.norm.weight")},
    }
    if not config.tie_embeddings:
        params["lm_head"] = {"kernel": arr("lm_head.weight", True)}
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        attn = {}
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            attn[proj] = {"kernel": arr(p + f"self_attn.{proj}.weight", True)}
            if config.qkv_bias and proj != "o_proj":
                attn[proj]["bias"] = arr(p + f"self_attn.{proj}.bias")
        params[f"layers_{i}"] = {
            "input_layernorm": {"scale": arr(p + "input_layernorm.weight")},
            "post_attention_layernorm": {"scale": arr(p + "post_attention_layernorm.weight")},
            "self_attn": attn,
            "mlp": {
                proj: {"kernel": arr(p + f"mlp.{proj}.weight", True)} for proj in ("gate_proj", "up_proj", "down_proj")
            },
        }
    return {"params": params}
