"""One process of a multi-process CPU job (launched by tests/test_multihost.py).

    KVJAX_COORDINATOR=127.0.0.1:PORT KVJAX_NUM_PROCESSES=2 KVJAX_PROCESS_ID=i \\
        python tests/multihost_worker.py --out result.json [--model tiny|smollm2] [--die-before decode]

Every process builds the same model, runs `kvjax.parallel.generate` over a mesh that
spans all processes' devices, and process 0 writes the tokens as JSON. `--die-before
decode` makes process 1 exit abruptly after prefill (the failure test).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: helpers

PROMPTS = ["Sequence parallel prefill splits a long prompt over devices.", "Ring attention rotates keys"]
EXIT_PEER_FAILURE = 3


class ByteTokenizer:
    """UTF-8 bytes shifted by 3 (0 pad, 1 bos, 2 eos): a tokenizer with no files."""

    bos_id, eos_ids = 1, (2,)

    def encode(self, text: str) -> list[int]:
        return [b + 3 for b in text.encode()]

    def decode(self, ids, skip_special: bool = True) -> str:
        return bytes(int(i) - 3 for i in ids if int(i) >= 3).decode(errors="replace")


def build_model(name: str):
    """The same model in every process: SmolLM2 from its GGUF, or a small random Llama."""
    import jax
    from helpers import TINY_BYTES

    from kvjax.loaders import Model, load
    from kvjax.models.forward import init_params

    if name == "smollm2":
        return load("smollm2")
    cfg = TINY_BYTES
    params = jax.tree.map(lambda x: x * 6.0, init_params(cfg, jax.random.key(7)))
    return Model(cfg, params, ByteTokenizer())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="tiny", choices=("tiny", "smollm2"))
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--die-before", choices=("decode",), default=None)
    ap.add_argument("--timeout", type=float, default=120.0)
    args = ap.parse_args()

    from kvjax.parallel import multihost

    multihost.initialize(heartbeat_timeout_s=10, init_timeout_s=60)
    import jax

    from kvjax.parallel import context, generate, make_mesh

    model = build_model(args.model)
    mesh = make_mesh(seq=jax.device_count())
    if args.die_before == "decode":
        real_decode = context.decode

        def dying_decode(*a, **kw):
            if jax.process_index() == 1:
                print("process 1: killing itself (SIGKILL) before decode", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            return real_decode(*a, **kw)

        context.decode = dying_decode
    try:
        out = generate(model, PROMPTS, mesh=mesh, max_new_tokens=args.max_new_tokens, timeout_s=args.timeout)
    except multihost.PeerFailure as err:
        print(f"PeerFailure: {err}", file=sys.stderr, flush=True)
        os._exit(EXIT_PEER_FAILURE)  # skip jax.distributed's shutdown barrier: the peer is gone
    if jax.process_index() == 0:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "tokens": out.tokens.tolist(),
                    "texts": out.texts,
                    "processes": jax.process_count(),
                    "devices": jax.device_count(),
                    "stats": {k: v for k, v in out.stats.items() if isinstance(v, (int, float, str))},
                },
                f,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
