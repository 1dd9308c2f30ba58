"""Regenerate ``dcmdp_pb2*.py`` from ``dcmdp.proto`` (needs grpcio-tools).

Usage: ``python -m dcmdp.proto.generate [OUT_DIR]`` (default: this folder).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def generate(out_dir: Path = HERE) -> list[Path]:
    # a build tool (the test extra), only to regenerate the stubs
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    rc = protoc.main(
        ["protoc", f"-I{HERE}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
         f"--grpc_python_out={out_dir}", str(HERE / "dcmdp.proto")]
    )
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}")
    grpc_mod = out_dir / "dcmdp_pb2_grpc.py"
    # protoc writes a top-level import; make it package-relative so the module works installed.
    text = re.sub(r"^import dcmdp_pb2 as", "from dcmdp.proto import dcmdp_pb2 as", grpc_mod.read_text(), flags=re.M)
    grpc_mod.write_text(text)
    return sorted(out_dir.glob("dcmdp_pb2*"))


if __name__ == "__main__":
    for p in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE):
        print(p)
