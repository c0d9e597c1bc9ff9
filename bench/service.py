"""What the benchmarks that go through the real service share (end_to_end.py, serve_load.py): the
random full-size Wan2.1-T2V-1.3B checkpoint and a `diffserve serve` process on a free port.

`build_checkpoint(path, tiny)` writes tests/fixtures/tiny/wan.py's build_wan with the real configs (the
1.3B DiT, UMT5-XXL in bf16, the default Wan VAE, the UniPC flow scheduler; ~17 GB, built on the GPU), or
the tiny checkpoint with tiny=True. `Server(model_path, workdir, extra, startup_timeout_s)` starts
`python -m diffserve.client.cli serve` with its local worker (as tests/conftest.py starts one), waits
until the health service says SERVING (the worker has loaded, and warmed up when asked) and holds a
blocking `Client` on it; `stop()` sends SIGINT and waits. Its outputs and state (keys, job store) live in
`workdir`, so no run inherits another's queued jobs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from dit_forward import WAN_13B

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # tests.fixtures.tiny

# google/umt5-xxl's encoder (Wan2.1's text encoder).
UMT5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_decoder_layers=24, num_heads=64,
                relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
                dense_act_fn="gelu_new", dropout_rate=0.0, layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1,
                decoder_start_token_id=0, tie_word_embeddings=False)
UMT5_VOCAB = 256384

# 20 words of the test tokenizer's vocabulary + </s>: 21 tokens.
PROMPT = "a cat and a dog playing in the snow at sunset , cinematic slow motion shot of a red car"


def build_checkpoint(path: Path, tiny: bool) -> Path:
    from tests.fixtures.tiny.wan import build_tiny_wan, build_wan

    if tiny:
        return build_tiny_wan(path)
    path = build_wan(path, transformer=WAN_13B, vae={}, umt5=UMT5_XXL, vocab_size=UMT5_VOCAB, device="cuda", dtype=torch.bfloat16)
    torch.cuda.empty_cache()
    return path


class Server:
    """`diffserve serve` on a free port with its local worker (as tests/conftest.py starts one).
    `extra` comes after the defaults (`--max-batch-size 1`, ...), so it overrides them."""

    def __init__(self, model_path: Path, workdir: Path, extra: list[str], startup_timeout_s: float):
        from diffserve.client import Client, DiffserveError

        ready = workdir / "port"
        cmd = [sys.executable, "-m", "diffserve.client.cli", "serve", "--model-path", str(model_path), "--port", "0",
               "--output-dir", str(workdir / "outputs"), "--state-dir", str(workdir / "state"), "--ready-file", str(ready), "--log-level", "WARNING",
               "--max-batch-size", "1", "--no-restart-workers", *extra]
        self.proc = subprocess.Popen(cmd)
        deadline = time.monotonic() + startup_timeout_s
        while not ready.exists():
            self._check(deadline)
            time.sleep(0.1)
        self.target = f"127.0.0.1:{ready.read_text()}"
        self.client = Client(self.target)
        while True:  # the worker loads the model (and warms up) before the server says SERVING
            try:
                if self.client.health() == "SERVING":
                    return
            except DiffserveError:
                pass
            self._check(deadline)
            time.sleep(0.5)

    def _check(self, deadline: float) -> None:
        if self.proc.poll() is not None:
            raise SystemExit(f"error: the server exited with code {self.proc.returncode}")
        if time.monotonic() > deadline:
            self.stop()
            raise SystemExit("error: the server did not start in time")

    def workers(self) -> list[int]:
        """The pids of the worker processes under the server (from /proc: no psutil on the device)."""
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                    with open(f"/proc/{entry}/cmdline", "rb") as f:
                        cmdline = f.read()
                except (OSError, ValueError, IndexError):
                    continue
                children.setdefault(ppid, []).append(int(entry))
                if b"diffserve.worker" in cmdline:
                    children.setdefault(-1, []).append(int(entry))
        under, todo = set(), [self.proc.pid]
        while todo:
            pid = todo.pop()
            for child in children.get(pid, []):
                if child not in under:
                    under.add(child)
                    todo.append(child)
        return sorted(under & set(children.get(-1, [])))

    def dump_stacks(self) -> None:
        """SIGUSR1 to every worker: each prints its threads' Python stacks to stderr (worker/__main__.py)."""
        for pid in self.workers():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1)

    def kill(self) -> None:
        """SIGKILL to the server and its workers (after a timeout: no drain)."""
        for pid in [*self.workers(), self.proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
