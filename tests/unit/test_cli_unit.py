"""The CLI's own logic without a server: --version, the one-line error for a server that cannot be
reached, streamed downloads (a fake stub, no socket), and the default output folders."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import grpc
import pytest

from diffserve.client import cli
from diffserve.client.client import Client, DiffserveError
from diffserve.v1 import generation_pb2 as pb

REFUSED = ("failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:39431: "
           "Failed to connect to remote host: Connection refused")


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out == f"diffserve {cli.package_version()}"
    assert out.split()[1][0].isdigit() or "unknown" in out


def test_unreachable_is_one_line_for_transport_failures_only():
    line = cli.unreachable(DiffserveError(grpc.StatusCode.UNAVAILABLE, REFUSED), "127.0.0.1:50051")
    assert line == "error: no diffserve server at 127.0.0.1:50051 (connection refused); start one with `diffserve serve`"
    dns = DiffserveError(grpc.StatusCode.UNAVAILABLE, "errors resolving nosuchhost.invalid:1: [...Domain name not found]")
    assert "(the host name does not resolve)" in cli.unreachable(dns, "nosuchhost.invalid:1")
    # The server's own refusals carry a reason and are printed as they are, not as "no server".
    draining = DiffserveError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down", reason="SHUTTING_DOWN")
    assert cli.unreachable(draining, "h:1") is None
    assert cli.unreachable(DiffserveError(grpc.StatusCode.INVALID_ARGUMENT, "bad"), "h:1") is None


class _Unreachable:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def list_models(self):
        raise DiffserveError(grpc.StatusCode.UNAVAILABLE, REFUSED)


def test_models_without_a_server_prints_one_line_and_fails(monkeypatch, capsys):
    monkeypatch.setattr(cli, "connect", lambda args, target: _Unreachable())
    assert cli.main(["models", "--server", "127.0.0.1:9"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        "error: no diffserve server at 127.0.0.1:9 (connection refused); start one with `diffserve serve`"]


class _Call:
    """A DownloadArtifact stream: yields chunks, optionally fails after some; records cancel()."""

    def __init__(self, chunks, fail_after=None):
        self.chunks, self.fail_after, self.cancelled, self.sent = chunks, fail_after, False, 0

    def __iter__(self):
        for i, chunk in enumerate(self.chunks):
            if self.fail_after is not None and i == self.fail_after:
                raise _RpcError()
            self.sent += 1
            yield pb.DownloadArtifactResponse(data=chunk)

    def cancel(self):
        self.cancelled = True


class _RpcError(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return "the artifact store cannot be read now"

    def trailing_metadata(self):
        return ()


class _Stub:
    def __init__(self, call):
        self.call = call

    def DownloadArtifact(self, request, metadata=()):
        assert request.artifact_id == "job-1"
        return self.call


def _client(call) -> Client:
    client = Client.__new__(Client)  # no channel: the stub is all download_to uses
    client._metadata = ()
    client.stub = _Stub(call)
    return client


def test_download_to_streams_chunks_to_a_temporary_file_and_renames(tmp_path):
    target = tmp_path / "fox.png"
    size = 1 << 16  # over the write buffer: each chunk goes to the file as it is written
    chunks = [bytes([i]) * size for i in range(5)]
    seen = []

    class Watching(_Call):
        def __iter__(self):
            for reply in super().__iter__():
                yield reply
                # When the next chunk is asked for, the previous one is in the .part file already
                # (on disk, not collected in memory) and the target does not exist yet.
                parts = list(tmp_path.glob(".fox.png.*.part"))
                seen.append((target.exists(), [p.stat().st_size for p in parts]))

    call = Watching(chunks)
    assert _client(call).download_to("job-1", target) == target
    assert target.read_bytes() == b"".join(chunks)
    assert list(tmp_path.iterdir()) == [target]
    assert all(not exists for exists, _ in seen)
    assert [sizes for _, sizes in seen] == [[size * (i + 1)] for i in range(5)]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


def test_download_to_failure_leaves_the_target_as_it_was(tmp_path):
    target = tmp_path / "fox.png"
    target.write_bytes(b"old")
    call = _Call([b"a" * 10, b"b" * 10, b"c"], fail_after=2)
    with pytest.raises(DiffserveError) as err:
        _client(call).download_to("job-1", target)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert call.cancelled
    assert target.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [target]


def test_default_output_folders_do_not_collide():
    """`generate` writes to ./outputs; `serve`'s local artifact store (<job id>.<ext> + .json)
    defaults to ./artifacts, so a server and a client started in one folder do not mix files."""
    import argparse

    from diffserve.scheduler.app import add_serve_flags
    from diffserve.scheduler.server import ServerConfig

    generate = cli.build_parser().parse_args(["generate", "--prompt", "x"])
    serve = argparse.ArgumentParser()
    add_serve_flags(serve)
    server_dir = serve.parse_args([]).output_dir
    assert Path(generate.output_path).resolve() != Path(server_dir).resolve()
    assert (generate.output_path, server_dir, ServerConfig.output_dir) == ("outputs", "artifacts", "artifacts")


def test_a_deadline_spent_waiting_for_the_connection_is_no_server():
    # wait_for_ready: a closed port ends DEADLINE_EXCEEDED; the client's probe says why
    waited = DiffserveError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", unreachable=REFUSED)
    assert cli.unreachable(waited, "127.0.0.1:9") == (
        "error: no diffserve server at 127.0.0.1:9 (connection refused); start one with `diffserve serve`")
    # a server that answered but was slow is not "no server"
    assert cli.unreachable(DiffserveError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"), "h:1") is None
