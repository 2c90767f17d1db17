"""Moved: `kvjax.generate` is the function `kvjax.generation.generate`, and the low-level steps
live in `kvjax.generation` (`from kvjax.generation import prefill, decode, bucket_length`).

This module only exists to say so: importing it raises ImportError with the new place.
"""

raise ImportError(
    "the module kvjax.generate is gone: kvjax.generate is now the function kvjax.generation.generate; "
    "import the low-level steps from kvjax.generation instead "
    "(from kvjax.generation import prefill, decode, bucket_length, generate)"
)
