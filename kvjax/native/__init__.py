"""Native (C++, XLA FFI) CPU kernels: x @ W^T straight from GGUF quantized blocks for decode.

`quantized_matmul` (kernel) and `quantized_matmul_reference` (jnp) in `quantized_matmul.py`;
the on-first-use build in `build.py`; the `QuantizedWeight` pytree and the model's dispatch in
`weights.py`.
"""

from .quantized_matmul import (
    BLOCK_BYTES,
    dequantize_reference,
    native_available,
    quantized_matmul,
    quantized_matmul_reference,
)
from .weights import QUANTIZED_MAX_ROWS, QuantizedWeight

__all__ = [
    "BLOCK_BYTES",
    "QUANTIZED_MAX_ROWS",
    "QuantizedWeight",
    "dequantize_reference",
    "native_available",
    "quantized_matmul",
    "quantized_matmul_reference",
]
