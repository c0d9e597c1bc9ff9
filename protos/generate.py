"""Regenerates the Python code for protos/**/*.proto next to the .proto files.

Run from anywhere: ``python protos/generate.py``. tests/test_protos_fresh.py fails when the
committed generated code differs from what this script produces.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
# Files with a gRPC service get a *_pb2_grpc.py module as well.
SERVICE_FILES = {"diffserve/v1/generation.proto"}


def proto_files() -> list[str]:
    return sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Writes *_pb2.py, *_pb2.pyi and *_pb2_grpc.py for every proto under out_dir."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    import google.rpc  # googleapis-common-protos ships google/rpc/*.proto

    googleapis_root = Path(next(iter(google.rpc.__path__))).parent.parent
    includes = [f"-I{PROTO_ROOT}", f"-I{well_known}", f"-I{googleapis_root}"]
    for outputs, files in (
        ([f"--python_out={out_dir}", f"--pyi_out={out_dir}"], proto_files()),
        ([f"--grpc_python_out={out_dir}"], sorted(SERVICE_FILES)),
    ):
        args = ["protoc", *includes, *outputs, *files]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return sorted(p for p in out_dir.rglob("*.py*") if p.is_file())


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        for path in generate(Path(tmp)):
            rel = path.relative_to(tmp)
            target = PROTO_ROOT / rel
            target.write_bytes(path.read_bytes())
            print(f"wrote protos/{rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
