"""Input images: turns every `ImageInput` of a request into checked, encoded bytes.

Sources: bytes in the request; a path on the server, only under the directory the operator
allowed (no traversal, symlinks resolved); an http(s) URL, fetched with a size limit, a timeout
and a content-type check, refusing private / loopback / link-local / reserved addresses unless
the operator allows them. The address is checked after DNS resolution and the connection goes
to that checked address (no DNS-rebinding window); redirects are followed a few times, each
target checked again. Every image must decode (Pillow) within a pixel limit.

Workers only ever see bytes.
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import math
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

from diffserve.v1 import generation_pb2 as pb

from diffserve.scheduler.errors import invalid_argument

CONTENT_TYPES = ("image/png", "image/jpeg", "image/webp", "image/bmp", "image/gif")
MAX_REDIRECTS = 3


@dataclass
class ImagePolicy:
    """What the operator allows (flags of `diffserve serve`)."""

    allowed_dir: Path | None = None  # where path inputs may point; None refuses paths
    allow_private_urls: bool = False
    max_bytes: int = 20 << 20
    timeout_s: float = 10.0
    max_pixels: int = 64 << 20


class ImageRefused(ValueError):
    """An input image that cannot be used; the message says why."""


def check_address(host: str, port: int, allow_private: bool) -> str:
    """Resolves `host` and returns an address that may be contacted; raises ImageRefused."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ImageRefused(f"cannot resolve {host!r}: {exc}") from None
    addresses = [info[4][0] for info in infos]
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%")[0])
        if not allow_private and not ip.is_global:
            raise ImageRefused(f"{host} resolves to {ip}, a private, loopback, link-local or reserved address")
    return addresses[0]


class _PinnedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, host: str, address: str, port: int, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host: str, address: str, port: int, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def fetch_url(url: str, policy: ImagePolicy) -> bytes:
    """GETs an image URL under the policy's limits. Blocking: call from a thread."""
    for _ in range(MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ImageRefused(f"only http(s) URLs are fetched, not {url[:100]!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        address = check_address(parts.hostname, port, policy.allow_private_urls)
        conn_cls = _PinnedHTTPSConnection if parts.scheme == "https" else _PinnedHTTPConnection
        conn = conn_cls(parts.hostname, address, port, policy.timeout_s)
        try:
            path = parts.path or "/"
            conn.request("GET", path + (f"?{parts.query}" if parts.query else ""), headers={"User-Agent": "diffserve", "Accept": "image/*"})
            reply = conn.getresponse()
            if reply.status in (301, 302, 303, 307, 308) and reply.getheader("Location"):
                url = urljoin(url, reply.getheader("Location"))
                continue
            if reply.status != 200:
                raise ImageRefused(f"fetching {url[:100]} answered HTTP {reply.status}")
            content_type = (reply.getheader("Content-Type") or "").split(";")[0].strip().lower()
            if content_type not in CONTENT_TYPES:
                raise ImageRefused(f"{url[:100]} is {content_type or 'of no content type'}, not one of {', '.join(CONTENT_TYPES)}")
            length = reply.getheader("Content-Length")
            if length and length.isdigit() and int(length) > policy.max_bytes:
                raise ImageRefused(f"{url[:100]} is {length} bytes, over the {policy.max_bytes}-byte limit")
            data = reply.read(policy.max_bytes + 1)
            if len(data) > policy.max_bytes:
                raise ImageRefused(f"{url[:100]} is over the {policy.max_bytes}-byte limit")
            return data
        except (OSError, http.client.HTTPException) as exc:
            raise ImageRefused(f"fetching {url[:100]} failed: {exc or type(exc).__name__}") from None
        finally:
            conn.close()
    raise ImageRefused(f"more than {MAX_REDIRECTS} redirects")


def read_path(path: str, policy: ImagePolicy) -> bytes:
    if policy.allowed_dir is None:
        raise ImageRefused("this server does not read image paths (the operator sets --image-dir to allow a folder)")
    root = policy.allowed_dir.resolve()
    target = (root / path).resolve()
    if not target.is_relative_to(root):
        raise ImageRefused(f"{path!r} is outside the allowed image folder")
    if not target.is_file():
        raise ImageRefused(f"{path!r} is not a file in the allowed image folder")
    if target.stat().st_size > policy.max_bytes:
        raise ImageRefused(f"{path!r} is over the {policy.max_bytes}-byte limit")
    return target.read_bytes()


def check_image(data: bytes, policy: ImagePolicy) -> None:
    from PIL import Image

    if len(data) > policy.max_bytes:
        raise ImageRefused(f"the image is over the {policy.max_bytes}-byte limit")
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > policy.max_pixels:
                raise ImageRefused(f"the image has {image.width}x{image.height} pixels, over the limit of {policy.max_pixels}")
            image.verify()
    except ImageRefused:
        raise
    except Exception as exc:
        raise ImageRefused(f"not a readable image: {exc}") from None


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) of encoded image bytes, from the header alone; raises ImageRefused."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except Exception as exc:
        raise ImageRefused(f"not a readable image: {exc}") from None


# Image editing (Qwen-Image-Edit): an unset output size is derived from the input image.
EDIT_TARGET_AREA = 1024 * 1024


def edit_output_size(width: int, height: int, multiple: int) -> tuple[int, int]:
    """(width, height) of an edit's output for an input of width x height: about EDIT_TARGET_AREA
    pixels at the input's aspect ratio in multiples of 32 (the reference's calculate_dimensions),
    then rounded down to `multiple`. The same arithmetic as the worker's
    worker/pipelines/qwen_image.edit_image_size (copied: the scheduler imports no worker code);
    tests/test_request_unit.py checks that they agree."""
    ratio = width / height
    w = math.sqrt(EDIT_TARGET_AREA * ratio)
    h = w / ratio
    w, h = round(w / 32) * 32, round(h / 32) * 32
    multiple = max(1, multiple)
    return w // multiple * multiple, h // multiple * multiple


def resolve_images(params: pb.GenerationParams, policy: ImagePolicy) -> pb.GenerationParams:
    """Returns params whose images are all checked bytes; raises RequestError naming the field.
    Blocking (file and network I/O): call from a thread."""
    if not params.images:
        return params
    out = pb.GenerationParams()
    out.CopyFrom(params)
    bad = []
    for i, image in enumerate(out.images):
        source = image.WhichOneof("source")
        field = f"params.images[{i}].{source or 'source'}"
        try:
            if source == "data":
                data = image.data
            elif source == "path":
                data = read_path(image.path, policy)
            elif source == "url":
                data = fetch_url(image.url, policy)
            else:
                raise ImageRefused("set one of data, path or url")
            check_image(data, policy)
            image.data = data
        except ImageRefused as exc:
            bad.append((field, str(exc)))
    if bad:
        raise invalid_argument(bad)
    return out
