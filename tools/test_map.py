"""Which tests cover each module of the package: ``tests/README.md``'s table, kept true by a test.

A module is covered by the test files that import it by name; a module no test imports by name (it runs
only inside a job) is listed in ``INTEGRATION`` with the tests that exercise it end to end and why.

    python tools/test_map.py            # rewrite tests/README.md
    python tools/test_map.py --check    # exit 1 if it is stale or a module has no test (tests/test_test_map.py)
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "onnxstain"
TESTS = ROOT / "tests"
README = TESTS / "README.md"

# Modules that run only inside a job: the integration tests that exercise them, and how.
INTEGRATION: dict[str, tuple[tuple[str, ...], str]] = {
    "_onnx.quant": (("test_formats.py",), "QDQ and dynamic int8 models: the graph view dequantizes their weights"),
    "_onnx.tensors": (("test_formats.py", "test_io.py"), "external-data and fp16 models read through the graph view"),
    "_version": (("test_key_schema.py",), "every key records the tool_version it reads"),
    "model_keys": (("test_fleet.py", "test_fleet_lock.py"), "the Stainer and the Locker share it; issue reads it"),
    "_lock.dense": (("test_vit_tiny.py",), "the dense gate lock of the tiny ViT encoder"),
    "_lock.shuffle": (("test_shuffle_lock.py", "test_attack_suite.py"), "every shuffle lock job runs its stages"),
    "_lock.calibration": (("test_lock_tiny.py", "test_lock_stages.py"), "every lock job calibrates through it"),
    "_lock.keys": (("test_lock_tiny.py", "test_key_schema.py"), "lock keys written and read back"),
    "math.trigger": (("test_stain_tiny.py", "test_lock_tiny.py"), "trigger ascent and the occlusion refinement"),
    "passes.dense": (("test_vit_tiny.py", "test_dense_signature.py"), "dense stains and locks insert their branch"),
    "passes.stain": (("test_stain_tiny.py",), "insert stains add their side branch"),
    "_report.html": (("test_evaluate.py", "test_evaluation_records.py"), "evaluate --html"),
    "scoring": (("test_lock_tiny.py",), "the lock's patch search scores detectors and logits with it"),
    "_stain.result": (("test_stain_tiny.py",), "StainOptions and StainResult through the public API"),
    "fleet._sealing": (("test_registry.py",), "registries opened with a passphrase: keys sealed, wrong ones refused"),
    "fleet.commands": (("test_fleet.py",), "onnxstain keygen, issue and identify through the CLI"),
    "fleet.writer": (("test_registry.py", "test_fleet.py"), "every copy placed through a registry writer"),
    "fleet.queries": (("test_fleet.py",), "identify's black box through a model file and an HTTP endpoint"),
    "fleet._checks": (("test_registry.py",), "customer names, hashes, kinds and states refused in one line"),
    "fleet._files": (("test_registry.py",), "temp files, writer locks and the recovery of dead writers"),
    "fleet._schema": (("test_registry.py",), "schema v1, migrations, foreign and newer files refused"),
    "_onnx.layer_rows": (("test_fleet.py", "test_verify_drift.py"), "identify and verify's weight check read host rows "
                         "by name, renamed, fp16 and int8"),
    "_fs": (("test_kill_steps.py", "test_registry.py"), "every committed output and registry copy syncs its folder"),
    "cli_support": (("test_bad_input.py", "test_fleet.py"), "every command's errors, printing and option groups"),
}


def modules() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "__init__.py":
            continue
        found.append(".".join(path.relative_to(PACKAGE).with_suffix("").parts))
    return found


def importers(module: str, tests: dict[str, str]) -> list[str]:
    """Test files that import ``module`` by name (``onnxstain.a.b``, or ``from onnxstain.a import b``)."""
    parent, _, leaf = module.rpartition(".")
    full = re.compile(rf"\bonnxstain\.{re.escape(module)}\b")
    via_parent = re.compile(rf"from onnxstain{re.escape('.' + parent) if parent else ''} import [^\n]*\b{leaf}\b")
    return sorted(name for name, text in tests.items() if full.search(text) or via_parent.search(text))


def table() -> tuple[str, list[str]]:
    tests = {p.name: p.read_text() for p in sorted(TESTS.glob("test_*.py"))}
    rows, missing = [], []
    for module in modules():
        own = f"test_{module.rsplit('.', 1)[-1]}.py"
        direct = importers(module, tests)
        if module in INTEGRATION:
            files, how = INTEGRATION[module]
            absent = [f for f in files if f not in tests]
            if absent:
                missing.append(f"{module}: listed test(s) {', '.join(absent)} do not exist")
            rows.append(f"| `{module}` | {', '.join(files)} (integration: {how}) |")
        elif direct:
            mark = [f"**{f}**" if f == own else f for f in direct]
            rows.append(f"| `{module}` | {', '.join(mark)} |")
        else:
            missing.append(f"{module}: no test imports it and INTEGRATION does not list it")
    text = ("# What tests what\n\nGenerated by `python tools/test_map.py` (checked by `tests/test_test_map.py`). "
            "For each module of `onnxstain/`, the test files that import it by name (its own test in bold), or, "
            "for a module that runs only inside a job, the integration tests that exercise it.\n\n"
            "| module | tests |\n|---|---|\n" + "\n".join(rows) + "\n")
    return text, missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if tests/README.md is stale or a module "
                        "has no test")
    args = parser.parse_args(argv)
    text, missing = table()
    for line in missing:
        print(f"uncovered: {line}", file=sys.stderr)
    if args.check:
        stale = not README.is_file() or README.read_text() != text
        if stale:
            print("tests/README.md is stale: run python tools/test_map.py", file=sys.stderr)
        return 1 if stale or missing else 0
    README.write_text(text)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
