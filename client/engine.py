"""The in-process API: `from diffserve import Engine`.

    from diffserve import Engine

    with Engine("models/Wan2.1-T2V-1.3B", num_gpus=2) as engine:
        out = engine.generate("a red fox in the snow", seed=1, num_frames=1)
        out.image.save("fox.png")            # PIL image; out.frames: uint8 (T, H, W, 3); out.job: pb.Job
        stream = engine.stream("a fox running", num_frames=33)
        for event in stream:                 # the job's JobEvents as they happen
            print(event.WhichOneof("event"))
        video = stream.result.frames

An Engine is a private `diffserve serve` subprocess, started as `generate --model-path` starts its
one (client/local.py), and a Client on it. Its keyword arguments are serve's flags by their
argparse names (`num_gpus=2`, `compile=True`, `warmup_shape=["480x832x81"]`); generate and stream
take GenerationParams' fields (client.make_params). The server dies with the Engine: on close(),
at the end of a with-block, when the Engine is garbage-collected or the interpreter exits, and
with the process however it ends (client/local.py). Ctrl-C inside generate cancels the job.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import difflib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from diffserve.client import local
from diffserve.client.client import Client, DiffserveError, local_image, make_params
from diffserve.v1 import generation_pb2 as pb

if TYPE_CHECKING:
    import numpy
    import PIL.Image

# serve flags the Engine sets itself: the server listens on loopback for the Engine's own client.
ENGINE_FLAGS = (*local.OWNED_FLAGS, "--model-path", "--host", "--tls-cert", "--tls-key", "--tls-client-ca", "--auth-tokens")
TAIL_LINES = 40  # of the server's stderr, in the error when it does not start


class _ServeFlags(argparse.ArgumentParser):
    """serve's parser (scheduler/app.py's add_serve_flags: argparse only, nothing of the scheduler
    runs here), each flag's action kept by its keyword name; parse errors raise ValueError."""

    def __init__(self) -> None:
        self.actions: dict[str, argparse.Action] = {}
        super().__init__(add_help=False)
        from diffserve.scheduler.app import add_serve_flags

        add_serve_flags(self)

    def add_argument(self, *args, **kwargs) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        if action.help != argparse.SUPPRESS:
            self.actions[action.dest] = action
        return action

    def error(self, message: str):
        raise ValueError(message)


def serve_argv(model_path: str | os.PathLike, flags: dict) -> list[str]:
    """serve's argv for keyword arguments named as its flags: `name=value` is `--name value`,
    True adds a switch (False leaves it off), a list repeats a repeatable flag, None is the default.
    Unknown names and the flags the Engine sets itself raise TypeError, bad values ValueError."""
    table = _ServeFlags()
    argv = ["--model-path", str(model_path)]
    for name, value in flags.items():
        action = table.actions.get(name)
        if action is None:
            close = difflib.get_close_matches(name, table.actions, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(f"Engine() got an unexpected keyword argument {name!r}{hint}")
        flag = max(action.option_strings, key=len)
        if flag in ENGINE_FLAGS:
            raise TypeError(f"Engine() sets {name!r} itself (a private server on loopback, for the Engine's own client)")
        if action.nargs == 0:  # a switch
            if not isinstance(value, bool):
                raise TypeError(f"Engine() argument {name!r} is a switch: True or False, not {value!r}")
            argv += [flag] if value else []
        elif isinstance(action.default, list):  # repeatable
            for item in [value] if isinstance(value, str) else value:
                argv += [flag, str(item)]
        elif value is not None:
            argv += [flag, str(value)]
    table.parse_args(argv)  # types and choices, before anything starts
    return argv


@dataclass(eq=False)
class Generation:
    """One finished job: its record and its output, decoded on first use."""

    job: pb.Job  # id, the params as run (seed included), create/start/end times, the artifact
    data: bytes  # the artifact as the server stored it: PNG, MP4 or NPY

    @cached_property
    def frames(self) -> numpy.ndarray:
        """uint8 (T, H, W, 3): all frames of a video, the one of an image."""
        import numpy as np

        media = self.job.artifact.media_type
        if media == "image/png":
            return np.asarray(self.image.convert("RGB"))[None]
        if media == "video/mp4":
            import imageio.v3 as iio

            return iio.imread(self.data, extension=".mp4")
        return np.load(io.BytesIO(self.data))

    @cached_property
    def image(self) -> PIL.Image.Image | None:
        """The image (PIL) of a one-frame output; None for a video."""
        from PIL import Image

        if self.job.artifact.media_type == "image/png":
            image = Image.open(io.BytesIO(self.data))
            image.load()
            return image
        return Image.fromarray(self.frames[0]) if len(self.frames) == 1 else None

    def save(self, path: str | os.PathLike) -> Path:
        """Writes the artifact's bytes as they are (.png, .mp4 or .npy)."""
        Path(path).write_bytes(self.data)
        return Path(path)


@dataclass(eq=False)
class JobError(DiffserveError):
    """A job that failed or was cancelled: the code and message of its Job.error, and the job."""

    job: pb.Job | None = None

    def __str__(self) -> str:
        state = pb.JobState.Name(self.job.state).removeprefix("JOB_STATE_").lower() if self.job else "ended"
        return f"job {self.job.id if self.job else ''} {state}: {super().__str__()}"


class JobStream:
    """A job's JobEvents as they happen (iterate it), then `result`. Leaving it early (break, an
    exception, Ctrl-C, close()) cancels the job."""

    def __init__(self, client: Client, params: pb.GenerationParams, timeout_s: float | None, priority: int | None):
        self.job_id = ""
        self._client = client
        self._closed = False
        self._result: Generation | None = None
        self._error: JobError | None = None
        self._events = self._follow(client.generate(params=params, timeout_s=timeout_s, priority=priority))

    def _follow(self, events: Iterator[pb.JobEvent]) -> Iterator[pb.JobEvent]:
        for event in events:
            self.job_id = event.job_id
            kind = event.WhichOneof("event")
            if kind == "completed":  # fetched before the event is handed on: `result` is ready with it
                self._result = Generation(self._client.get(self.job_id), self._client.download(event.completed.artifact.id))
            elif kind in ("failed", "cancelled"):
                job = self._client.get(self.job_id)
                self._error = JobError.from_status(job.error, job=job)
            yield event
            if self._error is not None:
                raise self._error

    def __iter__(self) -> "JobStream":
        return self

    def __next__(self) -> pb.JobEvent:
        try:
            return next(self._events)
        except StopIteration:
            raise
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "JobStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def done(self) -> bool:
        return self._result is not None or self._error is not None

    @property
    def result(self) -> Generation:
        """The output, once the job has completed (reading it waits for the rest of the events);
        raises JobError for a job that failed or was cancelled."""
        for _ in self:
            pass
        if self._error is not None:
            raise self._error
        if self._result is None:
            raise RuntimeError("the job's events stopped before it finished (the stream was closed)")
        return self._result

    def close(self) -> None:
        """Cancels the job if it has not finished, and ends the stream."""
        if self._closed:
            return
        self._closed = True
        if not self.done and self.job_id:
            with contextlib.suppress(DiffserveError, ValueError):  # ValueError: the Engine was closed
                self._client.cancel(self.job_id, timeout_s=5)
        with contextlib.suppress(ValueError):  # ValueError: being iterated by another thread
            self._events.close()  # Client.generate cancels its call


class Engine:
    """A private scheduler and worker group for this process, and a Client on them.

    Engine(model_path, startup_timeout=600, **flags): `flags` are `diffserve serve`'s flags by their
    argparse names (serve_argv); the constructor returns once the model has loaded, or raises
    local.ServerStartError with the end of the server's stderr. The server's stderr is copied to
    sys.stderr (`log_level`, `worker_log_level` set how much). Thread-safe: several threads may
    generate at once (their jobs batch). Create it on a thread that outlives it (the main thread,
    normally): the server's parent-death signal follows the thread that started it."""

    def __init__(self, model_path: str | os.PathLike, *, startup_timeout: float = 600.0, **flags):
        argv = serve_argv(model_path, flags)
        workdir = tempfile.mkdtemp(prefix="diffserve-engine-")
        tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        read_fd, write_fd = os.pipe()
        reader = threading.Thread(target=_copy_stderr, args=(read_fd, tail), name="diffserve-engine-stderr", daemon=True)
        reader.start()
        try:
            proc, self.address = local.start([*local.private_flags(workdir), *argv], workdir, stderr=write_fd,
                                             stderr_tail=lambda: _tail(tail, reader))
        except BaseException:
            os.close(write_fd)
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        os.close(write_fd)  # the server and its workers hold it now: the reader ends when they have gone
        self.client = Client(self.address)
        self._closer = weakref.finalize(self, _shut_down, proc, self.client, reader, workdir)
        try:
            local.wait_serving(self.client, proc, startup_timeout, lambda: _tail(tail, reader))
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stops the server and its workers (running jobs are cancelled); idempotent."""
        self._closer()

    @property
    def closed(self) -> bool:
        return not self._closer.alive

    def stream(self, prompt: str = "", *, images: list = (), timeout_s: float | None = None, priority: int | None = None, **fields) -> JobStream:
        """Starts a job and returns its events (JobStream). `fields` are GenerationParams' (seed,
        num_inference_steps, guidance_scale, height, width, num_frames, fps, negative_prompt,
        output_format, ...); `images`: PIL images, encoded bytes, local files, http(s) URLs."""
        if self.closed:
            raise RuntimeError("this Engine is closed")
        images = [local_image(i) if isinstance(i, (str, os.PathLike)) else i for i in images]
        return JobStream(self.client, make_params(prompt, images=images, **fields), timeout_s, priority)

    def generate(self, prompt: str = "", *, on_progress: Callable[[pb.JobEvent], object] | None = None, **kwargs) -> Generation:
        """Runs a job to the end and returns its Generation; each JobEvent goes to `on_progress`.
        Raises DiffserveError for a refused request (its message names the bad fields), JobError
        for a job that failed or was cancelled. Ctrl-C (or an exception from on_progress) cancels
        the job."""
        with self.stream(prompt, **kwargs) as stream:
            for event in stream:
                if on_progress is not None:
                    on_progress(event)
            return stream.result


def _copy_stderr(fd: int, tail: collections.deque) -> None:
    """The server's stderr (its workers' too): copied to ours, the last lines kept."""
    with open(fd, "rb", closefd=True) as pipe:
        for line in pipe:
            text = line.decode("utf-8", "replace")
            tail.append(text)
            with contextlib.suppress(Exception):
                sys.stderr.write(text)
                sys.stderr.flush()


def _tail(tail: collections.deque, reader: threading.Thread) -> str:
    reader.join(timeout=2)  # the server has exited: let its last lines arrive
    return "".join(tail)


def _shut_down(proc: subprocess.Popen, client: Client, reader: threading.Thread, workdir: str) -> None:
    client.close()
    local.stop(proc)
    reader.join(timeout=5)
    shutil.rmtree(workdir, ignore_errors=True)  # the server removes it too, even when we are SIGKILLed
