"""Generation: `generate` / `stream` (text in, text out) over the compiled `prefill` and
`decode` steps (arrays in, arrays out).

    from kvjax.generation import generate, stream            # also kvjax.generate, kvjax.stream
    from kvjax.generation import prefill, decode, bucket_length

See `steps` (the jitted prefill and decode loop), `request` (argument checks, tokenizing),
`text` (incremental text and stop strings) and `api` (generate, stream).
"""

from .api import GenerateOutput, StreamPiece, TokenStream, generate, stream
from .request import prepare_request
from .steps import (
    DecodeLoop,
    bucket_length,
    decode,
    decode_start,
    decode_steps,
    new_tokens_bucket,
    prefill,
    prompt_positions,
)

__all__ = [
    "DecodeLoop",
    "GenerateOutput",
    "StreamPiece",
    "TokenStream",
    "bucket_length",
    "decode",
    "decode_start",
    "decode_steps",
    "generate",
    "new_tokens_bucket",
    "prefill",
    "prepare_request",
    "prompt_positions",
    "stream",
]
