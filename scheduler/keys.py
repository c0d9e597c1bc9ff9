"""The scheduler's key store: ZeroMQ CURVE keys for the worker protocol, in the state folder.

    STATE/                       0700, created at first start (`--state-dir`, default ./.diffserve)
      keys/scheduler.key         the scheduler's public key (give it to remote workers)
      keys/scheduler.key_secret  its keypair (0600)
      keys/local.key_secret      the keypair of the workers `diffserve serve` starts itself (0600)
      keys/workers/NAME.key      public keys of the remote workers allowed to connect

Key files use ZeroMQ's certificate format (zmq.auth.load_certificate reads them). The allowed list
is read at every CURVE handshake, so `diffserve keys add` / `remove` take effect for the next
connection without a restart (a connection already made stays until it drops).

Also the `diffserve keys` command (run by exec from the client's CLI):

    diffserve keys new NAME [--out DIR]          a worker keypair: DIR/NAME.key, DIR/NAME.key_secret (0600)
    diffserve keys add NAME PUBKEY|FILE          allow a remote worker's public key
    diffserve keys list                          the scheduler's public key and the allowed workers
    diffserve keys remove NAME                   forbid it again (new connections)
    diffserve keys scheduler                     print the scheduler's public key (creating the store)

Imports only zmq and the worker command line's module (the scheduler never imports torch).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import re
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85

from diffserve.worker.v1.launch import Z85_KEY_RE, shield_dash_keys

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = ".diffserve"
LOCAL = "local"  # the key of the workers the scheduler starts itself; they register as local-N
RESERVED = frozenset({LOCAL, "scheduler"})
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class KeyStoreError(ValueError):
    """A key, a key name or the key store is not usable (the message says why)."""


@dataclass(frozen=True)
class Keypair:
    public: bytes  # z85, 40 bytes
    secret: bytes | None = None  # z85; None for a public key only


def _write_private(path: Path, text: str, mode: int) -> None:
    """Writes `text` to `path` with `mode` from the first byte (never briefly readable by others)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _certificate(name: str, public: bytes, secret: bytes | None) -> str:
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    lines = [f"#   ****  diffserve CURVE key '{name}', created {when}  ****",
             "#   ZeroMQ CURVE certificate; keep the .key_secret file private.", "",
             "metadata", f'    name = "{name}"', "curve", f'    public-key = "{public.decode()}"']
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode()}"')
    return "\n".join(lines) + "\n"


def write_keypair(folder: Path, name: str) -> Keypair:
    """A new keypair: folder/NAME.key (public, 0644) and folder/NAME.key_secret (0600)."""
    public, secret = zmq.curve_keypair()
    folder.mkdir(parents=True, exist_ok=True)
    _write_private(folder / f"{name}.key_secret", _certificate(name, public, secret), 0o600)
    _write_private(folder / f"{name}.key", _certificate(name, public, None), 0o644)
    return Keypair(public, secret)


def load_keypair(path: str | Path) -> Keypair:
    """A keypair (a .key_secret file) or a public key (a .key file)."""
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise KeyStoreError(f"cannot read the key file {path}: {exc}") from None
    if not public:
        raise KeyStoreError(f"{path} holds no CURVE public key")
    return Keypair(public, secret)


def public_key(value: str) -> bytes:
    """A public key given as its 40-character z85 text or as a key file (either kind)."""
    if Z85_KEY_RE.fullmatch(value) and not Path(value).exists():
        try:
            z85.decode(value)
        except Exception:
            raise KeyStoreError(f"{value!r} is not a z85 CURVE public key") from None
        return value.encode()
    return load_keypair(value).public


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise KeyStoreError(f"key name {name!r}: use 1-64 letters, digits, '_', '.', '-' (starting with a letter or digit)")
    if name in RESERVED:
        raise KeyStoreError(f"key name {name!r} is reserved")
    return name


class KeyStore:
    """The key files in one state folder; `open()` creates what is missing (0700 folders)."""

    def __init__(self, state_dir: str | Path):
        self.root = Path(state_dir).absolute()  # local workers get paths under it, whatever their cwd
        self.keys = self.root / "keys"
        self.workers = self.keys / "workers"

    @classmethod
    def open(cls, state_dir: str | Path) -> KeyStore:
        """The store, created at first use: folders 0700, the scheduler's and the local workers' keypairs."""
        store = cls(state_dir)
        for folder in (store.root, store.keys, store.workers):
            if not folder.exists():
                folder.mkdir(mode=0o700, parents=True)
                os.chmod(folder, 0o700)  # mkdir's mode is masked by the umask
            elif folder.stat().st_mode & 0o077:
                log.warning("%s can be read by other users (mode %o); chmod 700 it", folder, stat.S_IMODE(folder.stat().st_mode))
        for name in ("scheduler", LOCAL):
            if not (store.keys / f"{name}.key_secret").exists():
                write_keypair(store.keys, name)
                log.info("created the %s CURVE keypair in %s", name, store.keys)
        return store

    @property
    def scheduler_key_file(self) -> Path:
        return self.keys / "scheduler.key"

    @property
    def local_key_file(self) -> Path:
        return self.keys / f"{LOCAL}.key_secret"

    def scheduler(self) -> Keypair:
        return load_keypair(self.keys / "scheduler.key_secret")

    def local(self) -> Keypair:
        return load_keypair(self.local_key_file)

    def allowed(self) -> dict[bytes, str]:
        """z85 public key -> name, for every key that may connect (the local key included)."""
        out = {}
        for path in sorted(self.workers.glob("*.key")):
            try:
                out[load_keypair(path).public] = path.stem
            except KeyStoreError as exc:
                log.warning("ignoring %s", exc)
        out[self.local().public] = LOCAL
        return out

    def add(self, name: str, key: str) -> bytes:
        check_name(name)
        public = public_key(key)
        for other, other_name in self.allowed().items():
            if other == public and other_name != name:
                raise KeyStoreError(f"this key is already listed as {other_name!r}")
        _write_private(self.workers / f"{name}.key", _certificate(name, public, None), 0o644)
        return public

    def remove(self, name: str) -> None:
        path = self.workers / f"{check_name(name)}.key"
        if not path.exists():
            raise KeyStoreError(f"no worker key named {name!r}")
        path.unlink()

    def listed(self) -> list[tuple[str, bytes]]:
        return sorted((name, key) for key, name in self.allowed().items() if name != LOCAL)


# ---- `diffserve keys` ----


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Manage the CURVE keys of the worker protocol (see docs/cli.md).")
    p.add_argument("--state-dir", default=DEFAULT_STATE_DIR, help="the scheduler's state folder (default ./.diffserve)")
    sub = p.add_subparsers(dest="action", required=True, help="what to do")
    new = sub.add_parser("new", help="create a keypair for a remote worker: OUT/NAME.key and OUT/NAME.key_secret")
    new.add_argument("name", help="the worker's name (letters, digits, '.', '_', '-')")
    new.add_argument("--out", default=".", help="folder for the two files (default: the current one)")
    add = sub.add_parser("add", help="allow a remote worker's public key")
    add.add_argument("name", help="the worker's name in the allowed list")
    add.add_argument("key", help="the 40-character public key, or a .key / .key_secret file")
    sub.add_parser("list", help="the scheduler's public key and the allowed workers")
    rm = sub.add_parser("remove", help="forbid a worker key again (new connections)")
    rm.add_argument("name", help="the worker's name in the allowed list")
    sub.add_parser("scheduler", help="print the scheduler's public key (for remote workers' --scheduler-key)")
    return p


def main(argv=None, prog: str = "") -> int:
    prog = prog or os.environ.get("DIFFSERVE_PROG") or "python -m diffserve.scheduler.keys"
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(prog).parse_args(shield_dash_keys(argv))
    logging.basicConfig(level="WARNING", format="%(levelname)s: %(message)s")
    try:
        if args.action == "new":
            out = Path(args.out)
            name = check_name(args.name)
            if (out / f"{name}.key_secret").exists():
                raise KeyStoreError(f"{out / (name + '.key_secret')} exists; pick another name or folder")
            pair = write_keypair(out, name)
            print(pair.public.decode())
            print(f"wrote {out / (name + '.key')} (public) and {out / (name + '.key_secret')} (secret, 0600)", file=sys.stderr)
            return 0
        store = KeyStore.open(args.state_dir)
        if args.action == "add":
            public = store.add(args.name, args.key)
            print(f"{args.name} {public.decode()}")
        elif args.action == "remove":
            store.remove(args.name)
            print(f"removed {args.name} (connections already made stay until they drop)", file=sys.stderr)
        elif args.action == "list":
            print(f"scheduler {store.scheduler().public.decode()}  ({store.scheduler_key_file})")
            for name, key in store.listed():
                print(f"{name} {key.decode()}")
        elif args.action == "scheduler":
            print(store.scheduler().public.decode())
            print(f"file: {store.scheduler_key_file}", file=sys.stderr)
    except KeyStoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
