"""Tiny model configurations and helpers shared by the test folders.

Every test that needs a small random Llama builds it from `TINY` here, changing only what
its check needs (a head_dim the Hopper fragment layout takes, a byte-level vocabulary...),
so the configurations are not copied from file to file. Scripts that tests start in a
child process (parallel/parallel_child.py, parallel/multihost_worker.py) import this
module too (they put tests/ on sys.path).
"""

from __future__ import annotations

import dataclasses
import os

from kvjax.models import LlamaConfig

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

TINY = LlamaConfig(
    name="tiny",
    vocab_size=97,
    hidden_size=48,
    intermediate_size=96,
    num_layers=3,
    num_heads=6,
    num_kv_heads=2,
    head_dim=32,
    rope_theta=10000.0,
    max_position=512,
    bos_id=1,
    eos_ids=(2,),
    pad_id=0,
)


def tiny_config(**changes) -> LlamaConfig:
    """`TINY` with `changes` applied (and named after them unless a name is given)."""
    if "name" not in changes:
        changes["name"] = "tiny-" + "-".join(f"{k}{v}" for k, v in sorted(changes.items()))
    return dataclasses.replace(TINY, **changes)


#: Two layers, head_dim 16, long positions: the multi-device and multi-process checks.
TINY_PARALLEL = tiny_config(
    name="tiny-parallel", vocab_size=101, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
    head_dim=16, max_position=4096,
)  # fmt: skip
#: A byte-level vocabulary (256 bytes + 3 specials) for the ByteTokenizer of multi-process runs.
TINY_BYTES = dataclasses.replace(TINY_PARALLEL, name="tiny-bytes", vocab_size=259)
#: head_dim 32, two layers: the quantized caches' checks.
TINY_QUANT = tiny_config(
    name="tiny-quant", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
    head_dim=32, max_position=1024,
)  # fmt: skip
#: head_dim 64 (what the Hopper KIVI fragment layout takes), one layer.
TINY_FRAGMENTS = tiny_config(
    name="tiny-frag", vocab_size=128, hidden_size=256, intermediate_size=256, num_layers=1, num_heads=6,
    head_dim=64, max_position=4096,
)  # fmt: skip


def teacher_forced_logits(params, cfg, policy, tokens, lengths, steps: int, implementation=None):
    """Prefill `tokens` [B, T] (true `lengths`) under `policy`, then feed each step's greedy
    token for `steps` decode steps. Returns (logits [steps + 1, B, V] as numpy, final state)."""
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    from kvjax.generation import prefill
    from kvjax.models.forward import forward
    from kvjax.state import LayerContext

    logits, state = prefill(
        params, tokens, lengths, config=cfg, policy=policy, max_new_tokens=steps + 1, implementation=implementation
    )
    out = [np.asarray(logits)]
    nxt = jnp.argmax(logits, axis=-1)
    ctx = LayerContext(0, cfg, "decode", True, 0, steps + 1, implementation)
    step = jax.jit(functools.partial(forward, config=cfg, policy=policy, ctx=ctx))
    for _ in range(steps):
        logits, state = step(
            params, nxt[:, None], state.lengths[:, None], state, logits_at=jnp.zeros(nxt.shape, jnp.int32)
        )
        out.append(np.asarray(logits))
        nxt = jnp.argmax(logits, axis=-1)
    return np.stack(out), state


def write_byte_tokenizer(directory) -> None:
    """A byte-level BPE tokenizer.json (256 byte tokens, no merges) in `directory`, for HF
    checkpoints that tests write (the loader needs a tokenizer beside the weights)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(os.path.join(str(directory), "tokenizer.json"))
