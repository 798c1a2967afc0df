"""Generate common/pb/ from proto/ (the single source of truth); --check fails on drift."""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
OUT = ROOT / "common" / "pb"
PROTOS = ["schoolfed/v1/federation.proto"]


def generate(out_dir: Path) -> list[Path]:
    from grpc_tools import protoc  # dev dependency
    import grpc_tools

    include = str(Path(grpc_tools.__file__).parent / "_proto")
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"--plugin=protoc-gen-mypy={Path(sys.executable).parent / 'protoc-gen-mypy'}",
            f"--mypy_out={tmp}",
            *[str(PROTO_ROOT / p) for p in PROTOS],
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        written = []
        for src in sorted(Path(tmp).rglob("*.py*")):
            text = src.read_text()
            # protoc writes imports relative to proto/; the code lives in common.pb.
            text = re.sub(r"from schoolfed\.v1 import", "from common.pb import", text)
            text = re.sub(r"import schoolfed\.v1\.(\w+)", r"import common.pb.\1", text)
            text = text.replace("schoolfed.v1.federation_pb2", "common.pb.federation_pb2")
            dst = out_dir / src.name
            dst.write_text(text)
            written.append(dst)
        return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="regenerate to a temp dir and diff")
    args = parser.parse_args()
    if not args.check:
        for p in generate(OUT):
            print(f"wrote {p.relative_to(ROOT)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        drift = []
        for p in generate(Path(tmp)):
            committed = OUT / p.name
            if not committed.exists() or committed.read_text() != p.read_text():
                drift.append(p.name)
        if drift:
            print(f"generated code is stale: {drift}; run `python scripts/gen_protos.py`")
            return 1
    print("generated code matches proto/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
