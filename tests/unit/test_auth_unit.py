"""The tokens file, the principal rules and idempotency keys per principal (scheduler/auth.py, jobs.py).

No sockets: the gRPC side is tests/service/test_attack_api.py.
"""

from __future__ import annotations

import os

import pytest

from diffserve.scheduler.auth import ANONYMOUS, Principal, Tokens, TokensFileError, bearer_token, parse_tokens
from diffserve.scheduler.jobs import Job, JobTable
from diffserve.v1 import generation_pb2 as pb

ALICE = "alice-" + "a" * 26
BOB = "bob-" + "b" * 28


def write(path, text: str, mode: int = 0o600):
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    tmp.chmod(mode)
    os.replace(tmp, path)
    return path


def test_parse_lines_comments_and_several_tokens_per_principal():
    entries = parse_tokens(f"# who token\n\nalice {ALICE}\n  bob   {BOB}  \nbob {BOB}-2\n")
    assert [p for _, p in entries] == ["alice", "bob", "bob"]
    assert all(len(digest) == 32 and ALICE.encode() not in digest for digest, _ in entries)  # digests, not tokens


@pytest.mark.parametrize("text, message", [
    ("alice\n", "expected 'principal token'"),
    (f"alice {ALICE} extra\n", "expected 'principal token'"),
    (f"-alice {ALICE}\n", "principal must be"),
    (f"{'a' * 65} {ALICE}\n", "principal must be"),
    (f"anonymous {ALICE}\n", "reserved"),
    ("alice short\n", "the token must be"),
    (f"alice {'x' * 513}\n", "the token must be"),
    (f"alice {ALICE}\nbob {ALICE}\n", "already listed"),
    ("alice tokén-with-non-ascii-123\n", "the token must be"),
])
def test_parse_refuses_with_the_line(text, message):
    with pytest.raises(TokensFileError, match=message) as info:
        parse_tokens(text, "tokens")
    assert str(info.value).startswith("tokens:")
    assert ALICE not in str(info.value)  # a refusal never echoes a token


def test_authenticate_maps_tokens_to_principals(tmp_path):
    tokens = Tokens(write(tmp_path / "tokens", f"alice {ALICE}\nadmin {BOB}\n"))
    assert tokens.authenticate(ALICE) == Principal("alice")
    assert tokens.authenticate(BOB).is_admin
    for wrong in (None, "", ALICE[:-1], ALICE + "x", ALICE.upper()):
        assert tokens.authenticate(wrong) is None
    assert tokens.principals() == {"alice", "admin"}


def test_a_file_others_may_read_or_write_is_refused(tmp_path):
    for mode in (0o644, 0o606, 0o620):
        with pytest.raises(TokensFileError, match="chmod 600"):
            Tokens(write(tmp_path / "tokens", f"alice {ALICE}\n", mode))
    Tokens(write(tmp_path / "tokens", f"alice {ALICE}\n", 0o640))  # group-readable: a warning only
    with pytest.raises(TokensFileError, match="No such file"):
        Tokens(tmp_path / "missing")


def test_changes_are_picked_up_and_a_broken_file_keeps_the_old_tokens(tmp_path):
    path = write(tmp_path / "tokens", f"alice {ALICE}\n")
    tokens = Tokens(path)
    write(path, f"bob {BOB}\n")  # rotation: alice's token revoked, bob's added
    assert tokens.authenticate(ALICE) is None and tokens.authenticate(BOB) == Principal("bob")
    write(path, "bob\n")  # broken: bob keeps working
    assert tokens.authenticate(BOB) == Principal("bob")
    write(path, f"bob {BOB}\n", 0o644)  # unsafe mode: refused as a reload too
    assert tokens.authenticate(BOB) == Principal("bob")
    path.unlink()
    assert tokens.authenticate(BOB) == Principal("bob")
    write(path, "")  # an empty file is valid: nobody gets in
    assert tokens.authenticate(BOB) is None


def test_bearer_header():
    assert bearer_token(f"Bearer {ALICE}") == ALICE
    assert bearer_token(f"bearer   {ALICE} ") == ALICE
    for value in (None, "", "Bearer", "Bearer ", f"Basic {ALICE}", ALICE):
        assert bearer_token(value) is None


def test_principal_rules():
    assert Principal("alice").can_access("alice")
    assert not Principal("alice").can_access("bob")
    assert Principal("admin").can_access("bob") and Principal("admin").is_admin
    assert ANONYMOUS.can_access(ANONYMOUS.name) and not ANONYMOUS.is_admin


def test_idempotency_keys_are_per_principal():
    table = JobTable(max_finished=1)
    params = pb.GenerationParams(prompt="x")
    a = Job(params=params, client_request_id="job-1", principal="alice")
    b = Job(params=params, client_request_id="job-1", principal="bob")
    table.add(a)
    table.add(b)
    assert table.by_client_id("alice", "job-1") is a
    assert table.by_client_id("bob", "job-1") is b
    assert table.by_client_id("carol", "job-1") is None
    assert Job(params=params).principal == ANONYMOUS.name
