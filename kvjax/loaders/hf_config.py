"""HF `config.json` -> `LlamaConfig`, per family.

Each supported `model_type` is the Llama layout plus the switches of `FAMILIES`; the fields
every family shares are read once (`_common`), RoPE from either spelling transformers has used
(`rope_theta` + `rope_scaling`, or `rope_parameters`, per layer type for Gemma 3). A field kvjax
cannot honour (a RoPE type, partial rotary embeddings, biases the layout lacks, bidirectional
attention) is an error naming it, never a silently different model.
"""

from __future__ import annotations

from ..models.config import GLOBAL, LOCAL, LlamaConfig, RopeScaling
from .errors import ModelFileError

#: model_type -> the family switches (LlamaConfig fields) its checkpoints need.
FAMILIES: dict[str, dict] = {
    "llama": {},
    "mistral": {},
    "qwen2": dict(qkv_bias=True),
    "qwen3": dict(qk_norm=True),
    "phi3": {},
    "gemma2": dict(norm_offset=1.0, sandwich_norms=True, embed_scale=True),
    "gemma3_text": dict(norm_offset=1.0, sandwich_norms=True, embed_scale=True, qk_norm=True),
}
#: multimodal wrappers whose text model kvjax reads: model_type -> the text model's model_type.
TEXT_OF = {"gemma3": "gemma3_text"}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES) + tuple(TEXT_OF)
#: HF activation names -> LlamaConfig.hidden_act.
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}
_ROPE_TYPES = ("default", "linear", "llama3")


class _Reader:
    """Field access on one config dict with errors that name the file and the field."""

    def __init__(self, c: dict, path: str, kind: str):
        self.c, self.path, self.kind = c, path, kind

    def need(self, key: str, where: dict | None = None, what: str = "config.json"):
        where = self.c if where is None else where
        if where.get(key) is None:
            raise ModelFileError(f"{self.path}: {what} lacks the field {key!r} (needed for a {self.kind} model)")
        return where[key]

    def fail(self, field: str, value, why: str):
        raise ModelFileError(f"{self.path}: {field}={value!r} is not supported for {self.kind}: {why}")


def _rope(r: _Reader, params: dict | None, where: str) -> tuple[float | None, RopeScaling | None]:
    """(theta, scaling) of one RoPE parameter dict (rope_scaling or rope_parameters)."""
    if not params:
        return None, None
    rtype = params.get("rope_type", params.get("type")) or "default"
    what = f"{where} ({rtype} rope)"
    theta = params.get("rope_theta")
    prf = params.get("partial_rotary_factor")
    if prf not in (None, 1, 1.0):
        r.fail(f"{where}.partial_rotary_factor", prf, "kvjax rotates whole heads")
    if rtype == "default":
        return theta, None
    if rtype == "linear":
        return theta, RopeScaling("linear", float(r.need("factor", params, what)))
    if rtype == "llama3":
        return theta, RopeScaling(
            "llama3",
            float(r.need("factor", params, what)),
            float(r.need("low_freq_factor", params, what)),
            float(r.need("high_freq_factor", params, what)),
            int(r.need("original_max_position_embeddings", params, what)),
        )
    return r.fail(f"{where}.rope_type", rtype, f"kvjax implements {_ROPE_TYPES}")


def _rope_fields(r: _Reader) -> dict:
    """rope_theta, rope_scaling and (Gemma 3) local_rope_theta from either spelling."""
    c = r.c
    params = c.get("rope_parameters")
    if isinstance(params, dict) and GLOBAL in params:  # per layer type (Gemma 3, transformers 5)
        theta, scaling = _rope(r, params[GLOBAL], f"rope_parameters.{GLOBAL}")
        local, local_scaling = _rope(r, params.get(LOCAL), f"rope_parameters.{LOCAL}")
        if local_scaling is not None:
            r.fail(f"rope_parameters.{LOCAL}.rope_type", params[LOCAL].get("rope_type"), "local layers use plain RoPE")
    else:
        theta, scaling = _rope(r, params if isinstance(params, dict) else None, "rope_parameters")
        t2, s2 = _rope(r, c.get("rope_scaling"), "rope_scaling")
        theta, scaling = theta or t2, scaling or s2
        local = c.get("rope_local_base_freq")
    if c.get("partial_rotary_factor") not in (None, 1, 1.0):
        r.fail("partial_rotary_factor", c["partial_rotary_factor"], "kvjax rotates whole heads")
    theta = c.get("rope_theta") or theta or 10000.0
    out = dict(rope_theta=float(theta), rope_scaling=scaling)
    if r.kind == "gemma3_text":
        out["local_rope_theta"] = float(local or 10000.0)
    return out


def _layer_types(r: _Reader, layers: int) -> tuple[dict, tuple | None]:
    """(sliding_window, layer_types) fields."""
    c, kind = r.c, r.kind
    window = c.get("sliding_window")
    if kind in ("qwen2", "qwen3") and not c.get("use_sliding_window", False):
        window = None
    if kind in ("llama",):
        window = None
    if window is None:
        return {}, None
    types = c.get("layer_types")
    if types is None and kind == "gemma2":
        types = [LOCAL if (i + 1) % 2 else GLOBAL for i in range(layers)]
    elif types is None and kind == "gemma3_text":
        pattern = int(c.get("sliding_window_pattern", 6))
        types = [LOCAL if (i + 1) % pattern else GLOBAL for i in range(layers)]
    elif types is None and kind in ("qwen2", "qwen3"):
        first_global = int(c.get("max_window_layers", layers))
        types = [LOCAL if i < first_global else GLOBAL for i in range(layers)]
    if types is not None:
        bad = sorted(set(types) - {LOCAL, GLOBAL})
        if bad or len(types) != layers:
            r.fail("layer_types", types, f"expected {LOCAL!r} or {GLOBAL!r} for each of {layers} layers")
        if LOCAL not in types:
            return {}, None
        types = tuple(types)
    return {"sliding_window": int(window)}, types


def config_from_hf(c: dict, path: str, name: str) -> LlamaConfig:
    """The LlamaConfig of HF config dict `c` (read from `path`)."""
    if not isinstance(c, dict):
        raise ModelFileError(f"{path}: expected a JSON object, got {type(c).__name__}")
    kind = c.get("model_type")
    if kind in TEXT_OF:
        text = c.get("text_config")
        if not isinstance(text, dict):
            raise ModelFileError(f"{path}: a {kind} config needs its text_config (the language model's fields)")
        c = {**text, "model_type": TEXT_OF[kind], "_name_or_path": c.get("_name_or_path")}
        c.setdefault("tie_word_embeddings", True)
        kind = TEXT_OF[kind]
    if kind not in FAMILIES:
        raise ModelFileError(f"{path}: unsupported model_type {kind!r}; kvjax reads {SUPPORTED_MODEL_TYPES}")
    r = _Reader(c, path, kind)
    act = c.get("hidden_activation") or c.get("hidden_act") or "silu"
    if act not in _ACTIVATIONS:
        r.fail("hidden_act", act, f"kvjax implements {sorted(_ACTIVATIONS)}")
    if c.get("attention_bias") and kind != "qwen2":
        r.fail("attention_bias", True, "kvjax's layout has biases on q/k/v only (Qwen2)")
    if c.get("mlp_bias"):
        r.fail("mlp_bias", True, "kvjax's MLP has no biases")
    if c.get("use_bidirectional_attention"):
        r.fail("use_bidirectional_attention", True, "kvjax decodes causally")
    heads = r.need("num_attention_heads")
    layers = r.need("num_hidden_layers")
    window, types = _layer_types(r, layers)
    eos = c.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    pad = c.get("pad_token_id")
    fields = dict(
        name=c.get("_name_or_path") or name,
        model_type=kind.removesuffix("_text"),
        vocab_size=r.need("vocab_size"),
        hidden_size=r.need("hidden_size"),
        intermediate_size=r.need("intermediate_size"),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=c.get("num_key_value_heads") or heads,
        head_dim=c.get("head_dim") or r.need("hidden_size") // heads,
        rms_norm_eps=c.get("rms_norm_eps", 1e-5),
        max_position=c.get("max_position_embeddings", 4096),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        hidden_act=_ACTIVATIONS[act],
        layer_types=types,
        bos_id=c.get("bos_token_id"),
        eos_ids=eos_ids,
        pad_id=pad if pad is not None else (eos_ids[0] if eos_ids else 0),
        **window,
        **_rope_fields(r),
        **FAMILIES[kind],
    )
    if kind in ("gemma2", "gemma3_text"):
        fields["query_pre_attn_scalar"] = float(r.need("query_pre_attn_scalar"))
        fields["attn_logit_softcap"] = c.get("attn_logit_softcapping")
        fields["final_logit_softcap"] = c.get("final_logit_softcapping")
    try:
        return LlamaConfig(**fields)
    except ValueError as e:
        raise ModelFileError(f"{path}: {e}") from e


def text_tensor_name(name: str) -> str | None:
    """A multimodal checkpoint's language-model tensor under its text-model name ('model.X',
    'lm_head.weight'); None for tensors of other towers (vision, projector)."""
    for prefix in ("model.language_model.", "language_model.model."):
        if name.startswith(prefix):
            return "model." + name[len(prefix) :]
    if name in ("language_model.lm_head.weight", "lm_head.weight"):
        return "lm_head.weight"
    return (
        name if name.startswith("model.layers.") or name in ("model.embed_tokens.weight", "model.norm.weight") else None
    )
