"""Input images: turns every `ImageInput` of a request into checked, encoded bytes.

Sources: bytes in the request; a path on the server, only under the directory the operator
allowed (no traversal, symlinks resolved); an http(s) URL, fetched with a size limit, a total
deadline and a content-type check, refusing private / loopback / link-local / reserved addresses
unless the operator allows them. An IPv6 address that embeds an IPv4 one (IPv4-mapped
::ffff:a.b.c.d, IPv4-compatible ::a.b.c.d, NAT64 64:ff9b::/96, 6to4 2002::/16, Teredo) is judged
by that IPv4 address too. The address is checked after DNS resolution and the connection goes
to that checked address (no DNS-rebinding window); redirects are followed a few times, each
target checked again. Every image must decode (Pillow) within a pixel limit.

One fetch (connect, redirects, headers and every read) ends by `ImagePolicy.timeout_s` after it
started, whatever the server's pace: a watchdog shuts the socket down at the deadline, or as
soon as the caller sets the fetch's cancel event. Fetches run on their own bounded thread pool
(`FETCH_POOL`), never on the pool that saves artifacts, so slow URLs cannot delay other jobs.

Workers only ever see bytes.
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import math
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

from diffserve.v1 import generation_pb2 as pb

from diffserve.scheduler.errors import invalid_argument

CONTENT_TYPES = ("image/png", "image/jpeg", "image/webp", "image/bmp", "image/gif")
MAX_REDIRECTS = 3
READ_CHUNK = 64 << 10
FETCH_THREADS = 8
# Image fetches and path reads, apart from the default executor (artifact saves, downloads).
FETCH_POOL = ThreadPoolExecutor(max_workers=FETCH_THREADS, thread_name_prefix="image-fetch")
NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052 well-known prefix: the last 32 bits are IPv4
NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215 local-use: never global


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


def embedded_ipv4(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries (IPv4-mapped, IPv4-compatible, NAT64 64:ff9b::/96,
    6to4, Teredo's server and client), or None."""
    if ip.version != 6:
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        server, client = ip.teredo
        return client if server.is_global else server
    if ip in NAT64 or int(ip) >> 32 == 0:  # NAT64, or ::a.b.c.d (IPv4-compatible; :: and ::1 too)
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether `ip` is a global address, judged for an IPv6 address that embeds an IPv4 one by
    the embedded address too (so ::ffff:127.0.0.1, ::127.0.0.1, 64:ff9b::7f00:1 and
    2002:7f00:1:: are loopback). Pure: no sockets."""
    if not ip.is_global or (ip.version == 6 and ip in NAT64_LOCAL):
        return False
    inner = embedded_ipv4(ip)
    return inner is None or inner.is_global


def check_address(host: str, port: int, allow_private: bool) -> str:
    """Resolves `host` and returns an address that may be contacted; raises ImageRefused."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError) as exc:
        raise ImageRefused(f"cannot resolve {host[:100]!r}: {exc}") from None
    addresses = [info[4][0] for info in infos]
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%")[0])
        if not allow_private and not is_public(ip):
            raise ImageRefused(f"{host[:100]} resolves to {ip}, a private, loopback, link-local or reserved address")
    return addresses[0]


def _connect(address: str, port: int, watchdog: "_Watchdog") -> socket.socket:
    """A TCP connection to the checked address, the watchdog attached before connect()."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    watchdog.attach(sock)
    try:
        sock.settimeout(watchdog.remaining())
        sock.connect((address, port))
    except BaseException:
        sock.close()
        raise
    return sock


class _PinnedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, host: str, address: str, port: int, watchdog: "_Watchdog"):
        super().__init__(host, port, timeout=watchdog.remaining())
        self._address = address
        self._watchdog = watchdog

    def connect(self) -> None:
        self.sock = _connect(self._address, self.port, self._watchdog)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host: str, address: str, port: int, watchdog: "_Watchdog"):
        super().__init__(host, port, timeout=watchdog.remaining(), context=ssl.create_default_context())
        self._address = address
        self._watchdog = watchdog

    def connect(self) -> None:
        sock = _connect(self._address, self.port, self._watchdog)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)
        self._watchdog.attach(self.sock)


class _Watchdog:
    """Shuts down the fetch's current socket at its deadline or when `cancel` is set, so that a
    blocked connect / recv returns at once whatever the server's pace."""

    def __init__(self, deadline: float, cancel: threading.Event | None):
        self.deadline = deadline
        self.cancel = cancel or threading.Event()
        self.sock: socket.socket | None = None
        self.fired = ""
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="image-fetch-watchdog", daemon=True)
        self._thread.start()

    def remaining(self) -> float:
        if self.cancel.is_set():
            raise ImageRefused("cancelled")
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise ImageRefused("timed out")
        return left

    def attach(self, sock: socket.socket) -> None:
        with self._lock:
            self.sock = sock
        if self.fired:
            self._shutdown()

    def _shutdown(self) -> None:
        with self._lock:
            if self.sock is not None:
                try:
                    self.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _run(self) -> None:
        while not self._done.is_set():
            if self.cancel.is_set() or time.monotonic() >= self.deadline:
                self.fired = "cancelled" if self.cancel.is_set() else "timed out"
                self._shutdown()
                return
            self._done.wait(min(0.05, max(0.0, self.deadline - time.monotonic())))

    def close(self) -> None:
        self._done.set()


def fetch_url(url: str, policy: ImagePolicy, cancel: threading.Event | None = None, not_after: float | None = None) -> bytes:
    """GETs an image URL under the policy's limits, all of it (connect, redirects, every read)
    within policy.timeout_s, and by `not_after` (time.monotonic()) if given; `cancel` set ends it
    early. Blocking: call from a thread."""
    deadline = time.monotonic() + policy.timeout_s
    watchdog = _Watchdog(deadline if not_after is None else min(deadline, not_after), cancel)
    try:
        return _fetch(url, policy, watchdog)
    finally:
        watchdog.close()


def _fetch(url: str, policy: ImagePolicy, watchdog: _Watchdog) -> bytes:
    for _ in range(MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ImageRefused(f"only http(s) URLs are fetched, not {url[:100]!r}")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as exc:
            raise ImageRefused(f"bad URL {url[:100]!r}: {exc}") from None
        address = check_address(parts.hostname, port, policy.allow_private_urls)
        conn_cls = _PinnedHTTPSConnection if parts.scheme == "https" else _PinnedHTTPConnection
        conn = conn_cls(parts.hostname, address, port, watchdog)
        try:
            path = parts.path or "/"
            conn.request("GET", path + (f"?{parts.query}" if parts.query else ""), headers={"User-Agent": "diffserve", "Accept": "image/*"})
            sock = conn.sock  # the reply keeps using it after the connection lets go (Connection: close)
            sock.settimeout(watchdog.remaining())
            reply = conn.getresponse()
            if reply.status in (301, 302, 303, 307, 308) and reply.getheader("Location"):
                url = urljoin(url, reply.getheader("Location"))
                continue
            if reply.status != 200:
                raise ImageRefused(f"fetching {url[:100]} answered HTTP {reply.status}")
            content_type = (reply.getheader("Content-Type") or "").split(";")[0].strip().lower()
            if content_type not in CONTENT_TYPES:
                raise ImageRefused(f"{url[:100]} is {content_type[:100] or 'of no content type'}, not one of {', '.join(CONTENT_TYPES)}")
            length = reply.getheader("Content-Length")
            if length and length.isdigit() and int(length) > policy.max_bytes:
                raise ImageRefused(f"{url[:100]} is {length[:30]} bytes, over the {policy.max_bytes}-byte limit")
            data = bytearray()
            while len(data) <= policy.max_bytes:
                sock.settimeout(watchdog.remaining())
                chunk = reply.read1(min(READ_CHUNK, policy.max_bytes + 1 - len(data)))
                if not chunk:
                    break
                data += chunk
            if watchdog.fired:
                raise ImageRefused(watchdog.fired)
            if len(data) > policy.max_bytes:
                raise ImageRefused(f"{url[:100]} is over the {policy.max_bytes}-byte limit")
            return bytes(data)
        except ImageRefused as exc:
            if watchdog.fired and str(exc) == watchdog.fired:
                raise ImageRefused(f"fetching {url[:100]} failed: {exc} (the limit is {policy.timeout_s:g} s for the whole fetch)") from None
            raise
        except (OSError, http.client.HTTPException, ValueError) as exc:
            why = watchdog.fired or exc or type(exc).__name__
            raise ImageRefused(f"fetching {url[:100]} failed: {why}" + (f" (the limit is {policy.timeout_s:g} s for the whole fetch)" if watchdog.fired else "")) from None
        finally:
            conn.close()
    raise ImageRefused(f"more than {MAX_REDIRECTS} redirects")


def read_path(path: str, policy: ImagePolicy) -> bytes:
    if policy.allowed_dir is None:
        raise ImageRefused("this server does not read image paths (the operator sets --image-dir to allow a folder)")
    if "\0" in path:
        raise ImageRefused("must not contain NUL bytes")
    root = policy.allowed_dir.resolve()
    try:
        target = (root / path).resolve()
    except (OSError, ValueError) as exc:
        raise ImageRefused(f"{path[:100]!r} cannot be read: {exc}") from None
    if not target.is_relative_to(root):
        raise ImageRefused(f"{path[:100]!r} is outside the allowed image folder")
    if not target.is_file():
        raise ImageRefused(f"{path[:100]!r} is not a file in the allowed image folder")
    if target.stat().st_size > policy.max_bytes:
        raise ImageRefused(f"{path[:100]!r} is over the {policy.max_bytes}-byte limit")
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


def resolve_images(params: pb.GenerationParams, policy: ImagePolicy, cancel: threading.Event | None = None,
                   not_after: float | None = None) -> pb.GenerationParams:
    """Returns params whose images are all checked bytes; raises RequestError naming the field.
    `cancel` set (the call ended) stops a fetch under way and skips the rest; no fetch goes on
    past `not_after` (time.monotonic(); the service counts the wait for a pool thread in it).
    Blocking (file and network I/O): call from a thread, FETCH_POOL in the service."""
    if not params.images:
        return params
    out = pb.GenerationParams()
    out.CopyFrom(params)
    bad = []
    for i, image in enumerate(out.images):
        source = image.WhichOneof("source")
        field = f"params.images[{i}].{source or 'source'}"
        try:
            if cancel is not None and cancel.is_set():
                raise ImageRefused("cancelled")
            if source == "data":
                data = image.data
            elif source == "path":
                data = read_path(image.path, policy)
            elif source == "url":
                data = fetch_url(image.url, policy, cancel, not_after)
            else:
                raise ImageRefused("set one of data, path or url")
            check_image(data, policy)
            image.data = data
        except ImageRefused as exc:
            bad.append((field, str(exc)))
    if bad:
        raise invalid_argument(bad)
    return out
