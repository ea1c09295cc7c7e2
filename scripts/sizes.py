"""The largest rooms of the source tree: modules by lines, classes and functions by the lines they span.

    python3 scripts/sizes.py [--top N] [DIR ...]      (default: operator/)

The house keeps modules near 300 lines and functions near 60 (README, Development); this prints
where it stands, so a change that grows a room past that shows in review.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def rooms(paths: list[Path]) -> tuple[list[tuple[int, str]], list[tuple[int, str]], list[tuple[int, str]]]:
    modules, classes, functions = [], [], []
    for path in sorted(p for d in paths for p in d.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        modules.append((len(text.splitlines()), str(rel)))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                span = (node.end_lineno or node.lineno) - node.lineno + 1
                (classes if isinstance(node, ast.ClassDef) else functions).append((span, f"{rel}:{node.name}"))
    return modules, classes, functions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="*", type=Path, default=[ROOT / "operator"])
    parser.add_argument("--top", type=int, default=5)
    args = parser.parse_args()
    for title, found in zip(("modules", "classes", "functions"), rooms(args.dirs), strict=True):
        print(f"largest {title} (lines):")
        for lines, name in sorted(found, reverse=True)[: args.top]:
            print(f"  {lines:5d}  {name}")


if __name__ == "__main__":
    main()
