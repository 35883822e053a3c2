"""The package's shape, checked: import circles, private names across folders, long functions.

Rules (issue 14's "done when"):

- no import circle among the package's modules, counting imports inside functions (they run too) but not
  those under ``if TYPE_CHECKING:`` (they never run);
- no name that starts with an underscore imported from a module of another folder (each folder's private
  helpers stay its own);
- no function or method longer than ``--max-lines`` lines (80), from ``def`` to its last line.

    python tools/architecture.py            # report; exit 1 on a violation (tests/test_architecture.py)
    python tools/architecture.py --json     # the same as JSON
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "onnxstain"
MAX_LINES = 80


@dataclass
class Module:
    name: str  # dotted, e.g. onnxstain._stain.job ("onnxstain._stain" for its __init__)
    path: Path
    is_package: bool

    @property
    def folder(self) -> str:
        return self.name if self.is_package else self.name.rpartition(".")[0]


@dataclass
class Report:
    cycles: list[list[str]] = field(default_factory=list)
    private_imports: list[str] = field(default_factory=list)
    long_functions: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.cycles or self.private_imports or self.long_functions)


def modules(root: Path = ROOT) -> dict[str, Module]:
    found = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        found[".".join(parts)] = Module(".".join(parts), path, is_package)
    return found


def _type_checking_lines(tree: ast.Module) -> set[int]:
    """Line numbers inside ``if TYPE_CHECKING:`` blocks."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _resolve(mod: Module, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = mod.name.split(".") if mod.is_package else mod.name.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(mod: Module, known: dict[str, Module]) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every run-time import of ``mod`` inside the package."""
    tree = ast.parse(mod.path.read_text(), str(mod.path))
    skip = _type_checking_lines(tree)
    out: list[tuple[str, list[str]]] = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name in known]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(mod, node)
            if target not in known:
                continue
            names = [a.name for a in node.names]
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
            out += [(s, []) for s in subs]
            out.append((target, [n for n in names if f"{target}.{n}" not in known]))
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def _is_ancestor(package: str, module: str) -> bool:
    return module.startswith(package + ".")


def check(root: Path = ROOT, max_lines: int = MAX_LINES) -> Report:
    known = modules(root)
    report = Report()
    graph: dict[str, set[str]] = {name: set() for name in known}
    for mod in known.values():
        for target, names in imports(mod, known):
            # a package's __init__ importing its own submodules is how packages re-export, not a circle
            if not (mod.is_package and _is_ancestor(mod.name, target)):
                graph[mod.name].add(target)
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and known[target].folder != mod.folder:
                report.private_imports.append(f"{mod.name} imports {', '.join(private)} from {target}")
        tree = ast.parse(mod.path.read_text(), str(mod.path))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > max_lines:
                    report.long_functions.append(f"{mod.name}:{node.lineno} {node.name} ({length} lines)")
    # a submodule depends on its package's __init__ only through Python's import machinery
    report.cycles = _cycles(graph)
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-lines", type=int, default=MAX_LINES)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    report = check(max_lines=args.max_lines)
    if args.json:
        print(json.dumps(report.__dict__, indent=2))
    else:
        for cycle in report.cycles:
            print("import circle: " + " → ".join(cycle))
        for line in report.private_imports:
            print("private name across folders: " + line)
        for line in report.long_functions:
            print(f"function over {args.max_lines} lines: " + line)
        print("clean" if report.clean else "not clean")
    return 0 if report.clean else 1


if __name__ == "__main__":
    sys.exit(main())
