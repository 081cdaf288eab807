"""The shape of the batchlab package: module and class sizes, and private names used across modules.

    python benchmarks/package_shape.py

A newcomer should find each idea in the module named for it and read any function on one screen.
This prints every module's length, every class over 150 lines and every function over 60 lines,
and each private name (a leading underscore) that one module imports from another. The bounds the
course keeps: modules of at most ~600 lines, classes of at most ~250, and no private names imported
across modules (the private torch APIs live behind batchlab/torch_internals.py instead). Exit status
1 if a bound is broken.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "batchlab"
MAX_MODULE, MAX_CLASS, LONG_FUNCTION = 600, 250, 60


def lines(node: ast.AST) -> int:
    return node.end_lineno - node.lineno + 1


def main() -> int:
    ok = True
    print(f"{'module':42} {'lines':>6}")
    private_imports, classes, functions = [], [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = path.relative_to(PACKAGE.parent).as_posix()
        source = path.read_text(encoding="utf-8")
        n = len(source.splitlines())
        flag = "  OVER" if n > MAX_MODULE else ""
        ok &= not flag
        print(f"{name:42} {n:6d}{flag}")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                private_imports += [
                    f"{name}: from {'.' * node.level}{node.module or ''} import {a.name}"
                    for a in node.names
                    if a.name.startswith("_")
                ]
            elif isinstance(node, ast.ClassDef):
                classes.append((lines(node), f"{name}::{node.name}"))
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((lines(node), f"{name}::{node.name}"))
    print(f"\nclasses over 150 lines (bound {MAX_CLASS}):")
    for n, where in sorted(classes, reverse=True):
        if n > 150:
            ok &= n <= MAX_CLASS
            print(f"  {where:60} {n:4d}{'  OVER' if n > MAX_CLASS else ''}")
    print(f"\nfunctions over {LONG_FUNCTION} lines (docstrings included):")
    for n, where in sorted(functions, reverse=True):
        if n > LONG_FUNCTION:
            print(f"  {where:60} {n:4d}")
    print(f"\nprivate names imported across modules: {len(private_imports)}")
    for line in private_imports:
        print(f"  {line}")
    ok &= not private_imports
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
