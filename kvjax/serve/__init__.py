"""Serving: a continuous-batching engine over compressed KV caches (`Engine`) and an
OpenAI-compatible HTTP server (`kvjax.serve.server`, `kvjax serve`). See docs/serving.md."""

from .engine import Engine, Event, Handle

__all__ = ["Engine", "Event", "Handle"]
