"""Principals and bearer tokens, independent of the transport (gRPC now, HTTP next).

A *principal* is a caller's name. Every job belongs to the principal that submitted it; another
principal cannot see it (the front doors answer NOT_FOUND, never PERMISSION_DENIED, so a job's
existence does not leak). The principal named `admin` sees and cancels every job. Without a
tokens file everything is open and every call is the one principal `anonymous`.

The tokens file (`--auth-tokens FILE`) maps tokens to principals, one `principal token` pair per
line; blank lines and lines starting with `#` are ignored. A principal may have several tokens
(rotation: add the new one, move the clients, remove the old one). Tokens are at least 16
visible ASCII characters and unique. The file must not be readable or writable by others
(mode 0600 or 0640). It is re-read when it changes (checked at each authentication, by
inode, size and mtime); a file that no longer parses keeps the previous tokens and logs why.

Only SHA-256 digests of the tokens are kept, and every lookup compares the caller's digest with
all of them in constant time (hmac.compare_digest, no early exit).

Priorities (`PriorityRule`): a principal's default priority is set with `--principal-priority
NAME=N` (0 when not listed; `anonymous` may be listed for a server without tokens). The default is
also the highest priority the principal may ask for, so a user cannot move ahead of the others by
asking; `admin` may ask for any priority in the valid range.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

ADMIN = "admin"
ANONYMOUS_NAME = "anonymous"
MIN_TOKEN_CHARS = 16
MAX_TOKEN_CHARS = 512
PRINCIPAL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
TOKEN_RE = re.compile(r"[\x21-\x7e]+")  # visible ASCII: valid in gRPC metadata and HTTP headers


@dataclass(frozen=True)
class Principal:
    """A caller. `can_access(owner)` is the one isolation rule: your own jobs, or all as admin."""

    name: str

    @property
    def is_admin(self) -> bool:
        return self.name == ADMIN

    def can_access(self, owner: str) -> bool:
        return self.is_admin or self.name == owner


ANONYMOUS = Principal(ANONYMOUS_NAME)


class TokensFileError(ValueError):
    """The tokens file cannot be used; the message names the file and the line."""


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def parse_tokens(text: str, source: str = "tokens file") -> list[tuple[bytes, str]]:
    """(sha256(token), principal) per entry of a tokens file's text. Raises TokensFileError."""
    entries: list[tuple[bytes, str]] = []
    seen: set[bytes] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        where = f"{source}:{number}"
        if len(parts) != 2:
            raise TokensFileError(f"{where}: expected 'principal token', got {len(parts)} field(s)")
        principal, token = parts
        if not PRINCIPAL_RE.fullmatch(principal):
            raise TokensFileError(f"{where}: principal must be 1-64 of A-Z a-z 0-9 _ . @ - (starting with a letter or digit)")
        if principal == ANONYMOUS_NAME:
            raise TokensFileError(f"{where}: {ANONYMOUS_NAME!r} is reserved for servers without tokens")
        if not TOKEN_RE.fullmatch(token) or not MIN_TOKEN_CHARS <= len(token) <= MAX_TOKEN_CHARS:
            raise TokensFileError(f"{where}: the token must be {MIN_TOKEN_CHARS}-{MAX_TOKEN_CHARS} visible ASCII characters")
        digest = _digest(token)
        if digest in seen:
            raise TokensFileError(f"{where}: this token is already listed (each token names one principal)")
        seen.add(digest)
        entries.append((digest, principal))
    return entries


def check_mode(path: Path, mode: int) -> None:
    """Refuses a tokens file that others may read or write; warns when its group may read it."""
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        raise TokensFileError(f"{path}: others may read or write it (mode {stat.S_IMODE(mode):o}); chmod 600 it")
    if mode & stat.S_IWGRP:
        raise TokensFileError(f"{path}: its group may write it (mode {stat.S_IMODE(mode):o}); chmod 600 it")
    if mode & stat.S_IRGRP:
        log.warning("%s: its group may read it (mode %o)", path, stat.S_IMODE(mode))


def bearer_token(value: str | None) -> str | None:
    """The token of an `authorization: Bearer <token>` value (the scheme case-insensitive)."""
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class Tokens:
    """The tokens file, loaded at start and re-read whenever it changes.

    `authenticate(token)` → the token's Principal, or None for a missing or unknown token."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._entries: list[tuple[bytes, str]] = []
        self._version: tuple[int, int, int] | None = None
        self._load(initial=True)

    def _load(self, initial: bool = False) -> None:
        try:
            st = os.stat(self.path)
        except OSError as exc:
            if initial:
                raise TokensFileError(f"{self.path}: {exc.strerror}") from None
            log.error("%s: %s; keeping the %d token(s) loaded before", self.path, exc.strerror, len(self._entries))
            return
        version = (st.st_ino, st.st_size, st.st_mtime_ns)
        if version == self._version:
            return
        try:
            check_mode(self.path, st.st_mode)
            entries = parse_tokens(self.path.read_text(encoding="utf-8"), str(self.path))
        except (TokensFileError, OSError, UnicodeDecodeError) as exc:
            if initial:
                raise TokensFileError(str(exc)) from None
            log.error("%s; keeping the %d token(s) loaded before", exc, len(self._entries))
            self._version = version  # do not re-parse (and re-log) until it changes again
            return
        if not entries:
            log.warning("%s lists no tokens: every call that needs one is refused", self.path)
        self._entries = entries
        self._version = version
        if not initial:
            log.info("%s reloaded: %d token(s), %d principal(s)", self.path, len(entries), len({p for _, p in entries}))

    def principals(self) -> set[str]:
        return {principal for _, principal in self._entries}

    def authenticate(self, token: str | None) -> Principal | None:
        self._load()
        if not token:
            return None
        digest = _digest(token)
        found: str | None = None
        for known, principal in self._entries:  # no early exit: time does not depend on the match
            if hmac.compare_digest(known, digest):
                found = principal
        return Principal(found) if found is not None else None


class PriorityRefused(ValueError):
    """A principal asked for a priority above its own default (the message says which)."""


def parse_principal_priority(text: str) -> tuple[str, int]:
    """`NAME=N` (a --principal-priority value) → (name, N). Raises ValueError naming the problem;
    the range of N is checked by the caller (validation.check_priority)."""
    name, sep, value = text.partition("=")
    name = name.strip()
    if not sep or not PRINCIPAL_RE.fullmatch(name):
        raise ValueError(f"expected NAME=N with a principal name, got {text!r}")
    try:
        return name, int(value.strip())
    except ValueError:
        raise ValueError(f"expected NAME=N with an integer N, got {text!r}") from None


@dataclass(frozen=True)
class PriorityRule:
    """Per-principal default priorities; the default is also the principal's cap (admin: none)."""

    defaults: Mapping[str, int] = field(default_factory=dict)

    def default(self, principal: str) -> int:
        return self.defaults.get(principal, 0)

    def resolve(self, principal: str, requested: int | None) -> int:
        """The priority a job of `principal` gets: `requested`, else the default. Raises
        PriorityRefused when a principal other than admin asks for more than its default."""
        default = self.default(principal)
        if requested is None:
            return default
        if requested > default and principal != ADMIN:
            raise PriorityRefused(f"{requested} is above the highest priority principal {principal!r} may ask for ({default}, its default)")
        return requested
