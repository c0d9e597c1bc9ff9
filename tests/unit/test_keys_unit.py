"""The worker-key store (scheduler/keys.py) and the plain-TCP rule: files and names, no sockets."""

from __future__ import annotations

import pytest
import zmq

from diffserve.scheduler.keys import KeyStore, KeyStoreError, load_keypair, main, write_keypair
from diffserve.scheduler.workers import WorkerAuth, WorkerAuthError, WorkerLink, is_loopback_endpoint


def mode(path) -> int:
    return path.stat().st_mode & 0o777


def test_open_creates_private_folders_and_keypairs(tmp_path):
    store = KeyStore.open(tmp_path / "state")
    assert mode(store.root) == mode(store.keys) == mode(store.workers) == 0o700
    for name in ("scheduler", "local"):
        assert mode(store.keys / f"{name}.key_secret") == 0o600
    assert load_keypair(store.scheduler_key_file).secret is None  # the file handed out is public only
    again = KeyStore.open(tmp_path / "state")  # a second start keeps the keys
    assert again.scheduler() == store.scheduler() and again.local() == store.local()
    assert list(store.allowed().values()) == ["local"]


def test_add_list_remove(tmp_path):
    store = KeyStore.open(tmp_path / "state")
    pair = write_keypair(tmp_path / "w", "gpu-a")
    assert store.add("gpu-a", str(tmp_path / "w" / "gpu-a.key")) == pair.public
    other, _ = zmq.curve_keypair()
    store.add("gpu-b", other.decode())  # the 40-character text works too
    assert store.listed() == sorted([("gpu-a", pair.public), ("gpu-b", other)])
    assert store.allowed()[pair.public] == "gpu-a"
    with pytest.raises(KeyStoreError, match="already listed"):
        store.add("gpu-c", other.decode())
    store.remove("gpu-a")
    assert pair.public not in store.allowed()
    with pytest.raises(KeyStoreError, match="no worker key"):
        store.remove("gpu-a")


@pytest.mark.parametrize("name", ["local", "scheduler", "../x", "a/b", "", "-x", "x" * 65])
def test_bad_names_refused(tmp_path, name):
    store = KeyStore.open(tmp_path / "state")
    with pytest.raises(KeyStoreError):
        store.add(name, zmq.curve_keypair()[0].decode())


def test_bad_keys_refused(tmp_path):
    store = KeyStore.open(tmp_path / "state")
    for key in ("not-a-key", str(tmp_path / "missing.key")):
        with pytest.raises(KeyStoreError):
            store.add("w", key)


def test_new_writes_a_private_secret(tmp_path, capsys):
    assert main(["new", "w1", "--out", str(tmp_path)]) == 0
    assert mode(tmp_path / "w1.key_secret") == 0o600
    assert capsys.readouterr().out.strip() == load_keypair(tmp_path / "w1.key").public.decode()
    assert main(["new", "w1", "--out", str(tmp_path)]) == 2  # never overwrites a secret


@pytest.mark.parametrize("endpoint, loopback", [
    ("tcp://127.0.0.1:5555", True), ("tcp://127.1.2.3:0", True), ("tcp://[::1]:5555", True), ("tcp://localhost:1", True),
    ("ipc:///tmp/x", True), ("tcp://0.0.0.0:5555", False), ("tcp://*:5555", False), ("tcp://10.0.0.1:5555", False),
    ("tcp://[::]:5555", False), ("tcp://eth0:5555", False),
])
def test_loopback_endpoints(endpoint, loopback):
    assert is_loopback_endpoint(endpoint) is loopback


def test_plaintext_refused_off_loopback(tmp_path):
    with pytest.raises(WorkerAuthError, match="loopback"):
        WorkerLink("tcp://0.0.0.0:0", WorkerAuth(state_dir=str(tmp_path / "s"), plaintext=True))
    assert not (tmp_path / "s").exists()


def _dash_key() -> str:
    """A real public key whose z85 text starts with '-' (about one in 85 does)."""
    for _ in range(20_000):
        public, _secret = zmq.curve_keypair()
        if public.startswith(b"-"):
            return public.decode()
    raise AssertionError("no key starting with '-' in 20,000 tries")


def test_a_key_starting_with_a_dash_is_a_value_not_an_option(tmp_path):
    """argparse reads '-...' as an option: a scheduler key that starts with '-' once made a remote
    worker exit with "--scheduler-key: expected one argument" (CI, stop 25)."""
    from diffserve.worker.__main__ import parse_args

    key = _dash_key()
    args = parse_args(["--scheduler", "tcp://127.0.0.1:5555", "--model-path", "m", "--key-file", "w.key_secret",
                       "--scheduler-key", key])
    assert args.scheduler_key == key
    assert main(["--state-dir", str(tmp_path / "state"), "add", "gpu-a", key]) == 0
    assert dict(KeyStore.open(tmp_path / "state").listed())["gpu-a"] == key.encode()
