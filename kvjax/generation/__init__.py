"""Generation: `generate` / `stream` (text in, text out) over the compiled `prefill` and
`decode` steps (arrays in, arrays out).

    from kvjax.generation import generate, stream            # also kvjax.generate, kvjax.stream
    from kvjax.generation import prefill, decode, bucket_length
    from kvjax.generation import extend                      # continue from a state (resume)
    from kvjax.generation import TriForce, speculative_decode  # speculative decoding

See `steps` (the jitted prefill and decode loop), `request` (argument checks, tokenizing),
`text` (incremental text and stop strings), `api` (generate, stream), `resume` (feed more
tokens into an existing state at per-row offsets), `prefix` (BatchLLM prefix sharing) and
`speculative` (lossless speculative decoding with compressed drafts, TriForce).
"""

from .api import GenerateOutput, StreamPiece, TokenStream, generate, stream
from .request import prepare_request
from .resume import extend
from .speculative import TriForce, speculative_decode
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
    "TriForce",
    "bucket_length",
    "decode",
    "decode_start",
    "decode_steps",
    "extend",
    "generate",
    "new_tokens_bucket",
    "prefill",
    "prepare_request",
    "prompt_positions",
    "speculative_decode",
    "stream",
]
