"""Regenerate the Python code of the v1 API from proto/switchboard/v1/*.proto.

Usage: python scripts/protogen.py [--out DIR]

Writes *_pb2.py, *_pb2_grpc.py and mypy stubs (*.pyi) next to the .proto files, or into DIR
(laid out as DIR/switchboard/v1/...) so a test can compare a fresh generation with the
checked-in code. Needs the `dev` extras (grpcio-tools, mypy-protobuf).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
API_DIR = PROTO_ROOT / "switchboard" / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def generate(out_root: Path) -> list[Path]:
    """Run protoc over every .proto of the API; return the files written."""
    from grpc_tools import protoc  # dev dependency, imported only here

    bindir = Path(sys.executable).parent
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in API_DIR.glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    out_dir = out_root / "switchboard" / "v1"
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.iterdir():
        if stale.name.endswith(GENERATED_SUFFIXES):
            stale.unlink()
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(p for p in out_dir.iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTO_ROOT, help="output root")
    args = parser.parse_args()
    written = generate(args.out)
    if args.out.resolve() != PROTO_ROOT.resolve():
        for name in ("__init__.py",):
            for pkg in (args.out / "switchboard", args.out / "switchboard" / "v1"):
                src = PROTO_ROOT / pkg.relative_to(args.out) / name
                if src.exists():
                    shutil.copy(src, pkg / name)
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
