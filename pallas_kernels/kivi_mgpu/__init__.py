"""The Hopper (Mosaic GPU) KIVI decode kernel: codes in a fragment layout of their own, unpacked
straight into the registers that feed `wgmma` (Liu et al. 2024, KIVI,
https://arxiv.org/abs/2402.02750).

    fr = to_fragment_layout(k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, bits=2)
    out, lse = quantized_decode_attention_mgpu(q, fr, lengths, bits=2, k_res=kr, v_res=vr, res_lengths=rl)

Modules, each importing only those below it:
    kernel.py     the entry point and the Pallas kernel (`kernel_partials`)
    merge.py      the Triton kernel that merges the split-K partials and the residual window
    epilogue.py   its jnp reference (the XLA epilogue)
    fold.py       the key scales folded into the query (inline MLIR)
    registers.py  code unpacking and WGMMA-layout arrays, register by register (inline MLIR/PTX)
    shapes.py     input checks, query rows and columns, the tuning knobs and their defaults
    fragments.py  the fragment layout (`KiviFragments`, conversion from / to the standard layout)
"""

from .epilogue import assemble, finish_splits, residual_partial
from .fold import folds_scales
from .fragments import (
    MGPU_BITS,
    TILE,
    KiviFragments,
    fragment_slots,
    from_fragment_layout,
    key_channel,
    operand_dtype,
    register_of,
    to_fragment_layout,
)
from .kernel import LAZY_TAU, quantized_decode_attention_mgpu
from .merge import merge_partials, residual_chunk
from .shapes import (
    SPLIT_TOKENS,
    KiviMgpuBlockSizes,
    check_shapes,
    default_splits,
    default_stages,
    default_tiles_per_step,
    padded_rows,
    query_columns,
    score_columns,
    value_columns,
)

__all__ = [
    "LAZY_TAU",
    "MGPU_BITS",
    "SPLIT_TOKENS",
    "TILE",
    "KiviFragments",
    "KiviMgpuBlockSizes",
    "assemble",
    "check_shapes",
    "default_splits",
    "default_stages",
    "default_tiles_per_step",
    "finish_splits",
    "folds_scales",
    "fragment_slots",
    "from_fragment_layout",
    "key_channel",
    "merge_partials",
    "operand_dtype",
    "padded_rows",
    "quantized_decode_attention_mgpu",
    "query_columns",
    "register_of",
    "residual_chunk",
    "residual_partial",
    "score_columns",
    "to_fragment_layout",
    "value_columns",
]
