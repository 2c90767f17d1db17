"""Evaluation hooks: offline texts, retrieval tasks, perplexity with a policy active."""

from .metrics import perplexity
from .run import evaluate
from .tasks import Sample, kv_retrieval_sample, passkey_sample
from .texts import load_text

__all__ = ["Sample", "evaluate", "kv_retrieval_sample", "load_text", "passkey_sample", "perplexity"]
