"""One process of a multi-process CPU job (launched by tests/test_multihost.py).

    KVJAX_COORDINATOR=127.0.0.1:PORT KVJAX_NUM_PROCESSES=2 KVJAX_PROCESS_ID=i \\
        python tests/multihost_worker.py --out result.json [--model tiny|smollm2] [--die-before decode]
        [--checkpoint DIR --tensor 2]

Every process builds the same model, runs `kvjax.parallel.generate` over a mesh that
spans all processes' devices, and process 0 writes the tokens as JSON. `--die-before
decode` makes process 1 exit abruptly after prefill (the failure test). `--checkpoint`
loads an HF directory straight onto the mesh instead (`--tensor` devices on the tensor
axis): each process reads only its devices' slices and writes what it read to OUT.<index>.
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
    """UTF-8 bytes shifted by 3 (0 pad, 1 bos, 2 eos): a tokenizer with no files (ids from 259 up,
    in a vocabulary rounded up, decode to nothing)."""

    bos_id, eos_ids = 1, (2,)

    def encode(self, text: str) -> list[int]:
        return [b + 3 for b in text.encode()]

    def decode(self, ids, skip_special: bool = True) -> str:
        return bytes(int(i) - 3 for i in ids if 3 <= int(i) < 259).decode(errors="replace")


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


def _rchar() -> int:
    """Bytes this process has read through read()-like system calls (/proc/self/io)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def load_on_mesh(path: str, mesh, out: str):
    """`kvjax.load(path, mesh=mesh)`, writing to OUT.<process index> the bytes it read (the
    loader's count and the kernel's rchar) and the bytes of the slices this process holds."""
    import jax

    from kvjax.loaders import load

    jax.devices()
    before = _rchar()
    model = load(path, mesh=mesh)
    read = _rchar() - before
    leaves = jax.tree.leaves(model.params)
    with open(f"{out}.{jax.process_index()}", "w") as f:
        json.dump(
            {
                "bytes_read": model.load_stats["bytes_read"],
                "rchar": read,
                "local_bytes": sum(s.data.nbytes for x in leaves for s in x.addressable_shards),
                "total_bytes": sum(x.nbytes for x in leaves),
                "replicated_bytes": sum(x.nbytes for x in leaves if x.sharding.is_fully_replicated),
            },
            f,
        )
    return model


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="tiny", choices=("tiny", "smollm2"))
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--die-before", choices=("decode",), default=None)
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--tensor", type=int, default=1)
    args = ap.parse_args()

    from kvjax.parallel import multihost

    multihost.initialize(heartbeat_timeout_s=10, init_timeout_s=60)
    import jax

    from kvjax.parallel import context, generate, make_mesh

    mesh = make_mesh(seq=jax.device_count() // args.tensor, tensor=args.tensor)
    if args.checkpoint:
        model = load_on_mesh(args.checkpoint, mesh, args.out)
    else:
        model = build_model(args.model)
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
