"""Regenerates agent/_proto from protos/ (python -m agent.protogen [--check])."""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
OUT_DIR = ROOT / "agent" / "_proto"
_IMPORT = re.compile(r"^(from|import) spire(\.| )", re.MULTILINE)


def _generate(into: Path) -> None:
    import grpc_tools  # dev dependency: only needed to regenerate

    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    cmd = [
        sys.executable, "-m", "grpc_tools.protoc",
        f"-I{PROTO_DIR}", f"-I{include}",
        f"--python_out={into}", f"--grpc_python_out={into}",
        f"--mypy_out={into}", f"--mypy_grpc_out={into}",
        *protos,
    ]
    subprocess.run(cmd, check=True, cwd=PROTO_DIR)
    for path in into.rglob("*.py*"):
        text = path.read_text()
        # protoc writes imports relative to the proto root; the code lives in agent._proto.
        text = _IMPORT.sub(lambda m: f"{m.group(1)} agent._proto.spire{m.group(2)}", text)
        path.write_text(text)
    for directory in [into, *[d for d in into.rglob("*") if d.is_dir()]]:
        (directory / "__init__.py").touch()
    (into / "__init__.py").write_text('"""Generated from protos/ by python -m agent.protogen."""\n')


def _files(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}


def _same_tree(a: Path, b: Path) -> bool:
    files_a, files_b = _files(a), _files(b)
    if files_a != files_b:
        return False
    return all(filecmp.cmp(a / f, b / f, shallow=False) for f in files_a)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if agent/_proto is stale")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "_proto"
        fresh.mkdir()
        _generate(fresh)
        if args.check:
            if not _same_tree(fresh, OUT_DIR):
                print("agent/_proto is stale: run python -m agent.protogen", file=sys.stderr)
                return 1
            return 0
        shutil.rmtree(OUT_DIR, ignore_errors=True)
        shutil.copytree(fresh, OUT_DIR)
    return 0


if __name__ == "__main__":
    sys.exit(main())
