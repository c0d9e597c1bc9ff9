"""The committed generated code matches the .proto files (regenerate with `python protos/generate.py`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_generator():
    spec = importlib.util.spec_from_file_location("proto_generate", ROOT / "protos" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_fresh(tmp_path):
    generated = load_generator().generate(tmp_path)
    assert generated, "the generator produced nothing"
    stale = []
    for path in generated:
        committed = ROOT / "protos" / path.relative_to(tmp_path)
        if not committed.exists() or committed.read_bytes() != path.read_bytes():
            stale.append(str(committed.relative_to(ROOT)))
    assert not stale, f"generated code is stale, run `python protos/generate.py`: {stale}"
    expected = {p.relative_to(tmp_path) for p in generated}
    committed = {p.relative_to(ROOT / "protos") for p in (ROOT / "protos").rglob("*_pb2*.py*")}
    assert committed == expected, f"generated files without a .proto: {committed - expected}"


def test_enums_start_unspecified():
    from diffserve.v1 import generation_pb2
    from diffserve.worker.v1 import worker_pb2

    for module in (generation_pb2, worker_pb2):
        for enum in module.DESCRIPTOR.enum_types_by_name.values():
            assert enum.values[0].number == 0 and enum.values[0].name.endswith("_UNSPECIFIED"), enum.name
