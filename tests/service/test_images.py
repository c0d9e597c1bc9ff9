"""Input image resolution: bytes, allowed paths, URLs with limits and the private-address guard."""

from __future__ import annotations

import io
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest
from PIL import Image

from diffserve.client import DiffserveError
from diffserve.scheduler.errors import RequestError
from diffserve.scheduler.images import ImagePolicy, ImageRefused, check_address, fetch_url, resolve_images
from diffserve.v1 import generation_pb2 as pb


def png_bytes(size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


PNG = png_bytes()


class Handler(BaseHTTPRequestHandler):
    routes = {
        "/ok.png": (200, "image/png", PNG),
        "/page": (200, "text/html", b"<html></html>"),
        "/big.png": (200, "image/png", PNG + b"\0" * 5000),
        "/missing": (404, "text/plain", b"no"),
        "/bad.png": (200, "image/png", b"not an image"),
    }

    def do_GET(self):
        if self.path.startswith("/drip"):  # one byte every 0.2 s, at most 40 bytes (8 s): headers or body
            self._drip(head=self.path == "/drip-head")
            return
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/ok.png")
            self.end_headers()
            return
        if self.path == "/slow.png":
            time.sleep(2)
        status, ctype, body = self.routes.get(self.path, (200, "image/png", PNG))
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _drip(self, head: bool) -> None:
        reply = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
        if not head:
            self.wfile.write(reply)
        for byte in (reply if head else PNG)[:40]:
            try:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
            except OSError:
                return
            time.sleep(0.2)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def http_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


OPEN = ImagePolicy(allow_private_urls=True, max_bytes=2000, timeout_s=0.5)
SLOW = ImagePolicy(allow_private_urls=True, max_bytes=200_000, timeout_s=1.0)


def params_with(**source) -> pb.GenerationParams:
    params = pb.GenerationParams(prompt="x")
    params.images.add(**source)
    return params


def test_bytes_checked():
    assert resolve_images(params_with(data=PNG), ImagePolicy()).images[0].data == PNG
    with pytest.raises(RequestError) as info:
        resolve_images(params_with(data=b"garbage"), ImagePolicy())
    assert "params.images[0].data" in info.value.status.message and "not a readable image" in info.value.status.message


def test_url_fetched_with_limits(http_server):
    assert fetch_url(f"{http_server}/ok.png", OPEN) == PNG
    assert fetch_url(f"{http_server}/redirect", OPEN) == PNG
    for path, why in [("/page", "text/html"), ("/big.png", "limit"), ("/missing", "HTTP 404"), ("/slow.png", "failed")]:
        with pytest.raises(ImageRefused, match=why):
            fetch_url(http_server + path, OPEN)
    with pytest.raises(RequestError) as info:
        resolve_images(params_with(url=f"{http_server}/bad.png"), OPEN)
    assert "params.images[0].url" in info.value.status.message


@pytest.mark.parametrize("path", ["/drip", "/drip-head"])
def test_a_dripping_url_fails_within_its_total_deadline(http_server, path):
    """Each byte arrives well within the per-read timeout; the fetch as a whole still ends on time."""
    start = time.monotonic()
    with pytest.raises(ImageRefused, match="timed out"):
        fetch_url(http_server + path, SLOW)
    assert 0.9 < time.monotonic() - start < 1.6


def test_a_fetch_is_cancelled_at_once(http_server):
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    start = time.monotonic()
    with pytest.raises(RequestError) as info:
        resolve_images(params_with(url=f"{http_server}/drip"), ImagePolicy(allow_private_urls=True, timeout_s=30.0), cancel)
    assert "cancelled" in info.value.status.message
    assert time.monotonic() - start < 1.0


def test_nul_in_a_path_is_refused(tmp_path):
    with pytest.raises(RequestError) as info:
        resolve_images(params_with(path="in\0.png"), ImagePolicy(allowed_dir=tmp_path))
    assert "params.images[0].path" in info.value.status.message and "NUL" in info.value.status.message


def test_private_addresses_refused_by_default(http_server):
    with pytest.raises(ImageRefused, match="loopback"):
        fetch_url(f"{http_server}/ok.png", ImagePolicy())
    for host in ("169.254.169.254", "10.0.0.1", "192.168.1.1", "::1", "0.0.0.0", "::127.0.0.1", "::ffff:127.0.0.1", "64:ff9b::7f00:1", "2002:7f00:1::"):
        with pytest.raises(ImageRefused):
            check_address(host, 80, allow_private=False)
    with pytest.raises(ImageRefused, match="http"):
        fetch_url("file:///etc/passwd", OPEN)


def test_paths_only_under_the_allowed_folder(tmp_path):
    allowed = tmp_path / "images"
    allowed.mkdir()
    (allowed / "in.png").write_bytes(PNG)
    (tmp_path / "secret.png").write_bytes(PNG)
    os.symlink(tmp_path / "secret.png", allowed / "link.png")
    policy = ImagePolicy(allowed_dir=allowed)
    assert resolve_images(params_with(path="in.png"), policy).images[0].data == PNG
    for bad in ("../secret.png", "link.png", str(tmp_path / "secret.png"), "missing.png"):
        with pytest.raises(RequestError) as info:
            resolve_images(params_with(path=bad), policy)
        assert "params.images[0].path" in info.value.status.message
    with pytest.raises(RequestError, match="--image-dir"):
        resolve_images(params_with(path="in.png"), ImagePolicy())


@pytest.fixture(scope="module")
def i2v_server(tmp_path_factory):
    """A model that takes an image (the T2V model refuses any image before fetching it), with the
    default URL guard."""
    from conftest import ServerProcess
    from tests.fixtures.tiny import build

    server = ServerProcess(build("wan21-i2v", tmp_path_factory.mktemp("ckpt") / "tiny-wan-i2v"), tmp_path_factory.mktemp("server"))
    yield server
    server.stop()


def test_service_refuses_loopback_url(i2v_server, http_server):
    for url in (f"{http_server}/ok.png", "http://[::ffff:127.0.0.1]/ok.png", "http://[::127.0.0.1]/ok.png", "http://[64:ff9b::7f00:1]/ok.png"):
        with pytest.raises(DiffserveError) as info:
            i2v_server.client.submit(prompt="x", height=32, width=32, num_frames=1, images=[url])
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.field_violations[0][0] == "params.images[0].url"
        assert "loopback" in info.value.field_violations[0][1]


def test_service_refuses_images_for_a_model_that_takes_none_before_fetching(wan_server, http_server):
    with pytest.raises(DiffserveError) as info:
        wan_server.client.submit(prompt="x", height=32, width=32, num_frames=1, images=[f"{http_server}/ok.png"])
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.field_violations[0] == ("params.images", "model tiny-wan takes at most 0 input images")
