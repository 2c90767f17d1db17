"""Two CPU processes (gloo collectives) run one context-parallel generate.

tests/multihost_worker.py is launched twice through `kvjax.parallel.multihost.launch_local`;
each process holds one CPU device, the mesh's ring axis spans both, and each process puts
only its own shard of the prompt on its device. The job's tokens must equal a plain
one-process `kvjax.generate`. If one process dies before decoding, the other
must stop with a clear error within a bounded time. With tensor=2 across the two processes,
each loads only its half of an HF checkpoint's sharded weights (the loader's byte count and
the kernel's read count), and the tokens still equal one process's.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import multihost_worker
import numpy as np
import pytest

from kvjax.parallel import multihost

HERE = os.path.dirname(os.path.abspath(__file__))

pytestmark = pytest.mark.multiprocess


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path, *extra, timeout=300):
    out = tmp_path / "result.json"
    argv = [os.path.join(HERE, "multihost_worker.py"), "--out", str(out), *extra]
    procs = multihost.launch_local(
        2,
        argv,
        port=free_port(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=os.path.dirname(HERE),
    )
    t0, logs = time.monotonic(), []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=max(1.0, timeout - (time.monotonic() - t0)))[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return procs, logs, time.monotonic() - t0, out


@pytest.mark.slow
def test_two_processes_generate_like_one(tmp_path):
    procs, logs, _, out = launch(tmp_path)
    assert [p.returncode for p in procs] == [0, 0], "\n".join(x[-3000:] for x in logs)
    got = json.loads(out.read_text())
    assert got["processes"] == 2 and got["devices"] == 2, got
    from kvjax.generation import generate

    model = multihost_worker.build_model("tiny")
    ref = generate(model, multihost_worker.PROMPTS, max_new_tokens=8)
    assert np.asarray(got["tokens"]).tolist() == ref.tokens.tolist(), (got, ref.texts)


def _tiny_checkpoint(directory):
    """A random Llama (4 query / 2 KV heads, ~10 MB of float32) saved by transformers."""
    import torch
    import transformers
    from helpers import write_byte_tokenizer

    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(6.0)  # large enough that attention steers the greedy tokens
    model.save_pretrained(directory, safe_serialization=True)
    write_byte_tokenizer(directory)


@pytest.mark.slow
def test_two_processes_tensor_parallel_each_read_their_shards(tmp_path):
    from kvjax import load
    from kvjax.generation import generate

    ckpt = tmp_path / "ckpt"
    _tiny_checkpoint(ckpt)
    procs, logs, _, out = launch(tmp_path, "--checkpoint", str(ckpt), "--tensor", "2")
    assert [p.returncode for p in procs] == [0, 0], "\n".join(x[-3000:] for x in logs)
    ref = generate(load(str(ckpt)), multihost_worker.PROMPTS, max_new_tokens=8)
    assert json.loads(out.read_text())["tokens"] == ref.tokens.tolist()
    file_bytes = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    for i in range(2):
        r = json.loads((tmp_path / f"result.json.{i}").read_text())
        half = (r["total_bytes"] - r["replicated_bytes"]) // 2 + r["replicated_bytes"]
        assert r["local_bytes"] == half, r  # this process holds half of every split weight
        assert r["bytes_read"] == r["local_bytes"], r  # and read exactly that
        assert r["bytes_read"] <= r["rchar"] < 0.6 * file_bytes, (r, file_bytes)  # the kernel agrees


@pytest.mark.slow
def test_dead_process_makes_the_other_fail_fast(tmp_path):
    procs, logs, elapsed, out = launch(tmp_path, "--die-before", "decode", "--timeout", "60", timeout=240)
    survivor, dead = procs
    assert dead.returncode not in (0, None), logs[1][-2000:]
    assert survivor.returncode not in (0, None), logs[0][-3000:]
    clear = (
        "PeerFailure: decode failed in process 0/2: another process of the job stopped",
        "did not finish within",
        "Terminating process because the JAX distributed service detected",
    )
    assert any(c in logs[0] for c in clear), logs[0][-3000:]
    assert elapsed < 240 and not out.exists()


def test_watchdog_ends_a_stuck_step():
    code = (
        "import time; from kvjax.parallel import multihost\n"
        "with multihost.peer_guard('decode', timeout_s=1):\n    time.sleep(30)\n"
    )
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == multihost.EXIT_TIMEOUT, r.stderr
    assert "decode did not finish within 1 s in process 0/1" in r.stderr
    assert time.monotonic() - t0 < 60


def test_initialize_rejects_bad_process_id():
    with pytest.raises(ValueError, match=r"process_id=2 must be in \[0, num_processes=2\)"):
        multihost.initialize("127.0.0.1:1", 2, 2)
