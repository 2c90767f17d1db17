"""Evaluation hooks: offline texts, retrieval tasks, perplexity with a policy active."""

from .metrics import perplexity
from .tasks import Sample, kv_retrieval_sample, passkey_sample
from .texts import load_text
from .run import evaluate

__all__ = ["Sample", "evaluate", "kv_retrieval_sample", "load_text", "passkey_sample", "perplexity"]
