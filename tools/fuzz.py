"""Fuzz the command line with mutated models, keys and preprocessing files; report every defect.

A *case* is one mutated input (an ONNX model, a key file or a preprocessing JSON) made from a valid
one of a small base set (tiny models built with ``tests/tinymodels.py`` and friends, stained and
locked with the key-format fixtures' recipes), and the commands that read it:

* a mutated **model** (bit flips, byte runs, truncation, splicing with another model, and protobuf
  edits: element types, dims, raw_data sizes, attributes such as Clip bounds and Conv geometry, node
  inputs and outputs, graph inputs, opsets, external-data entries) goes through ``inspect``,
  ``verify`` with the key of the model it came from, ``evaluate`` (every 3rd case), and every
  ``--heavy-every`` K-th case ``stain`` or ``lock`` with a short time limit;
* a mutated **key** (field removal, wrong types, huge integers, NaN/Infinity, deep nesting,
  out-of-range values, list length changes, corrupted base64/PNG payloads, sections swapped with
  another key, raw byte mutations) goes through ``verify``, ``apply-patch`` (lock keys) and every 3rd
  case ``evaluate``;
* a mutated **preprocessing** JSON goes through ``lock`` (``--preprocessing``) and every K-th case
  ``stain`` of the tiny MLP.

Each command runs in-process in a worker process (``onnxstain.cli.main`` through click's runner,
the C-level stderr captured too) under a per-command time limit enforced by the parent, which kills
and restarts a worker that runs past it. An outcome is **clean** when the exit code is 0, 2, or 1
for ``verify``; exit 2 prints exactly one line ``onnxstain: error: …``; nothing else reaches stderr
(no traceback, no library logging); the inputs are unchanged; a failed run leaves no file behind
and a successful one only its declared outputs (never an ``.onnxstain-tmp-*``). Anything else is a
**DEFECT**: an uncaught exception or internal error (exit 3, with the traceback that
``ONNXSTAIN_DEBUG=1`` prints), a hang, a stray line, a leftover or a changed input.

Cases are numbered per kind and made from ``random.Random(f"{seed}:{kind}:{index}")``, so a case is
replayed from its id alone: ``python tools/fuzz.py --seed S --replay model:123``. The report
(``--out``/report.json) lists the distinct defect signatures (exception type and the deepest
onnxstain frame, or the kind of misbehaviour) with counts and replay ids, and each signature's first
case is copied under ``--out``/defects/.

    python tools/fuzz.py --seed 0 --models 10000 --keys 10000 --pres 1000 --jobs 1 --heavy-every 25
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import copy
import hashlib
import io
import json
import math
import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TMP_MARK = ".onnxstain-tmp-"

# -- the base set ----------------------------------------------------------------------------------------
# name -> (fixture recipe or local recipe); "mlp" is a 10-class MLP stained with two triggers (few-class
# signature), the others are the key-format fixtures' recipes.
LOCAL_RECIPES = {"mlp_stain": dict(size=8, job="stain", options=dict(mode="insert", seed=1, fpr=0.05))}


def build_base(folder: Path) -> dict[str, Any]:
    """Build (once) the tiny models, their stained/locked outputs, keys, sidecars and image folders."""
    manifest_path = folder / "manifest.json"
    if manifest_path.exists():
        return json.loads(manifest_path.read_text())
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "fixtures" / "keys")]
    import onnx
    from PIL import Image
    from recipes import RECIPES, run_job
    from tinymodels import smooth_images, tiny_mlp

    import onnxstain
    from onnxstain import Preprocessing, StainOptions

    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for name in RECIPES:
        src, out, key = folder / f"{name}.source.onnx", folder / f"{name}.onnx", folder / f"{name}.key"
        if not (src.exists() and out.exists() and key.exists()):  # a half-built base set resumes
            src, out, key = run_job(name, folder)
        size = json.loads((folder / f"{name}.source.preprocessing.json").read_text())["height"]
        entries.append(dict(name=name, job=RECIPES[name]["job"], source=src.name, output=out.name, key=key.name,
                            size=size))
    name = "mlp_stain"
    src, out, key = folder / f"{name}.source.onnx", folder / f"{name}.onnx", folder / f"{name}.key"
    onnx.save(tiny_mlp(), src)
    Preprocessing(height=8, width=8, resize=None).save(folder / f"{name}.source.preprocessing.json")
    onnxstain.stain(src, out, key, images=smooth_images(48, size=8, seed=3),
                    options=StainOptions(**LOCAL_RECIPES[name]["options"]))
    entries.append(dict(name=name, job="stain", source=src.name, output=out.name, key=key.name, size=8))
    for e in entries:  # the output models read the same preprocessing as their sources
        side = folder / f"{e['name']}.source.preprocessing.json"
        shutil.copy(side, folder / f"{e['name']}.preprocessing.json")
        e["sidecar"] = side.name
    for size in sorted({e["size"] for e in entries}):
        d = folder / f"imgs{size}"
        d.mkdir(exist_ok=True)
        for i, img in enumerate(smooth_images(6, size=size, seed=5)):
            Image.fromarray(img).save(d / f"{i}.png")
    Image.fromarray(smooth_images(1, size=40, seed=7)[0]).save(folder / "photo.png")
    manifest = dict(entries=entries)
    manifest_path.write_text(json.dumps(manifest, indent=1))
    return manifest


# -- mutations of model bytes ------------------------------------------------------------------------------
_ELEM_TYPES = [*list(range(0, 26)), -1, 99, 2 ** 31 - 1]
_HUGE_DIMS = [0, -1, 1, 2, 3, 7, 1000, 2**31 - 1, 2**32, 2**40, 2**62, -(2**62)]


def _flip_bits(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    b = bytearray(data)
    n = rng.choice([1, 1, 2, 4, 16])
    for _ in range(n):
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
    return bytes(b), f"flip {n} bits"


def _byte_run(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    b = bytearray(data)
    i = rng.randrange(len(b))
    n = rng.choice([1, 2, 4, 8, 64])
    fill = rng.choice([b"\x00", b"\xff", b"\x7f", bytes([rng.randrange(256)])])
    b[i : i + n] = fill * n
    return bytes(b), f"set {n} bytes at {i} to {fill!r}"


def _truncate(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    n = rng.choice([0, 1, rng.randrange(len(data)), len(data) - 1, len(data) // 2])
    return data[:n], f"truncate to {n}"


def _splice(rng: random.Random, data: bytes, other: bytes) -> tuple[bytes, str]:
    i, j = rng.randrange(len(data)), rng.randrange(len(other))
    return data[:i] + other[j:], f"splice at {i} with other[{j}:]"


def _insert_delete(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    i = rng.randrange(len(data))
    n = rng.choice([1, 3, 16, 200])
    if rng.random() < 0.5:
        return data[:i] + data[i + n :], f"delete {n} at {i}"
    j = rng.randrange(len(data))
    return data[:i] + data[j : j + n] + data[i:], f"insert copy of {n} at {i}"


def _proto_edit(rng: random.Random, model: Any, other: Any) -> str:
    import onnx
    from onnx import helper

    g = model.graph
    choice = rng.randrange(22)
    inits = list(g.initializer)
    t = rng.choice(inits) if inits else None
    node = rng.choice(list(g.node)) if len(g.node) else None
    if choice == 0 and t is not None:
        t.data_type = rng.choice(_ELEM_TYPES)
        return f"initializer {t.name} data_type={t.data_type}"
    if choice == 1 and t is not None:
        if t.dims and rng.random() < 0.7:
            k = rng.randrange(len(t.dims))
            t.dims[k] = rng.choice([*_HUGE_DIMS, t.dims[k] + 1, max(t.dims[k] - 1, 0)])
            return f"initializer {t.name} dims[{k}]={t.dims[k]}"
        if t.dims and rng.random() < 0.5:
            del t.dims[rng.randrange(len(t.dims))]
            return f"initializer {t.name} drop a dim"
        t.dims.append(rng.choice([1, 2, 0]))
        return f"initializer {t.name} add a dim"
    if choice == 2 and t is not None:
        raw = t.raw_data
        op = rng.randrange(4)
        if op == 0:
            t.raw_data = raw[: rng.randrange(len(raw) + 1)]
        elif op == 1:
            t.raw_data = raw + bytes(rng.choice([1, 3, 4, 400]))
        elif op == 2:
            t.raw_data = b""
        else:
            t.float_data.extend([rng.choice([1.0, float("nan"), float("inf"), -1e38])] * rng.choice([1, 4]))
        return f"initializer {t.name} raw_data op {op}"
    if choice == 3 and t is not None:
        value = rng.choice([float("nan"), float("inf"), -float("inf"), 1e38, -0.0, 3.4e38])
        raw = bytearray(t.raw_data)
        if len(raw) >= 4:
            import struct

            i = 4 * rng.randrange(len(raw) // 4)
            raw[i : i + 4] = struct.pack("<f", value)
            t.raw_data = bytes(raw)
        return f"initializer {t.name} value {value}"
    if choice == 4 and node is not None:  # Clip bounds and other scalar inputs: make them non-scalar or odd
        clips = [n for n in g.node if n.op_type == "Clip"] or [node]
        n = rng.choice(clips)
        names = {i.name: i for i in g.initializer}
        for inp in n.input[1:]:
            if inp in names:
                import numpy as np
                from onnx import numpy_helper

                arr = rng.choice([np.zeros((2,), np.float32), np.array([[6.0]], np.float32),
                                  np.array(np.nan, np.float32), np.array(-5.0, np.float32),
                                  np.zeros((0,), np.float32), np.array(1, np.int64)])
                names[inp].CopyFrom(numpy_helper.from_array(arr, inp))
                return f"{n.name} input {inp} := {arr.tolist()}"
        n.attribute.extend([helper.make_attribute("min", rng.choice([1.0, float("nan")]))])
        return f"{n.name} attribute min"
    if choice == 5 and node is not None and node.attribute:
        a = rng.choice(list(node.attribute))
        if a.ints:
            k = rng.randrange(len(a.ints))
            a.ints[k] = rng.choice([0, -1, 2, 5, 100, 2**40])
            return f"{node.name}.{a.name}[{k}]={a.ints[k]}"
        if a.type == onnx.AttributeProto.INT:
            a.i = rng.choice([0, -1, 2, 5, 100, 2**40, -(2**40)])
            return f"{node.name}.{a.name}={a.i}"
        if a.type == onnx.AttributeProto.FLOAT:
            a.f = rng.choice([float("nan"), float("inf"), 0.0, -1.0, 1e30])
            return f"{node.name}.{a.name}={a.f}"
        a.type = rng.choice([1, 2, 3, 4, 6, 7])
        return f"{node.name}.{a.name} type={a.type}"
    if choice == 6 and node is not None:
        node.attribute.extend([rng.choice([helper.make_attribute("group", rng.choice([2, 3, 0, -1])),
                                           helper.make_attribute("axis", rng.choice([-5, 3, 7])),
                                           helper.make_attribute("transB", rng.choice([0, 1, 2])),
                                           helper.make_attribute("strides", [rng.choice([0, 3, 64])] * 2),
                                           helper.make_attribute("dilations", [rng.choice([0, 2, 50])] * 2),
                                           helper.make_attribute("pads", [rng.choice([-1, 5, 1000])] * 4),
                                           helper.make_attribute("kernel_shape", [rng.choice([0, 5, 99])] * 2),
                                           helper.make_attribute("bogus", "x")])])
        return f"{node.name} extra attribute {node.attribute[-1].name}"
    if choice == 7 and node is not None and node.input:
        k = rng.randrange(len(node.input))
        names = [x for n in g.node for x in n.output] + [i.name for i in g.initializer] + ["", "nope"]
        node.input[k] = rng.choice(names)
        return f"{node.name}.input[{k}]={node.input[k]!r}"
    if choice == 8 and node is not None:
        if node.input and rng.random() < 0.5:
            del node.input[rng.randrange(len(node.input))]
            return f"{node.name} drop an input"
        node.input.append(rng.choice([node.input[0] if node.input else "x", "nope", ""]))
        return f"{node.name} extra input"
    if choice == 9 and node is not None:
        node.op_type = rng.choice(["Relu", "Conv", "Gemm", "MatMul", "Clip", "Add", "Identity", "Sigmoid",
                                   "Softmax", "Flatten", "Reshape", "NoSuchOp", "Transpose"])
        return f"{node.name} op_type={node.op_type}"
    if choice == 10 and node is not None:
        k = rng.randrange(len(g.node))
        del g.node[k]
        return f"remove node {k}"
    if choice == 11 and node is not None:
        g.node.append(copy.deepcopy(node))
        return f"duplicate node {node.name}"
    if choice == 12 and len(g.node) > 1:
        i, j = rng.randrange(len(g.node)), rng.randrange(len(g.node))
        a, b = copy.deepcopy(g.node[i]), copy.deepcopy(g.node[j])
        g.node[i].CopyFrom(b)
        g.node[j].CopyFrom(a)
        return f"swap nodes {i} {j}"
    if choice == 13 and g.input:
        tt = g.input[0].type.tensor_type
        if rng.random() < 0.4:
            tt.elem_type = rng.choice(_ELEM_TYPES)
            return f"input elem_type={tt.elem_type}"
        dims = tt.shape.dim
        if dims:
            k = rng.randrange(len(dims))
            if rng.random() < 0.3:
                dims[k].dim_param = rng.choice(["h", "", "batch"])
            else:
                dims[k].dim_value = rng.choice([*_HUGE_DIMS, 4, 16, 64])
            return f"input dim[{k}] := {dims[k]}".replace("\n", " ")
        return "input without shape"
    if choice == 14 and g.input:
        if rng.random() < 0.5:
            del g.input[0].type.tensor_type.shape.dim[-1]
            return "input drop a dim"
        g.input.append(copy.deepcopy(g.input[0]))
        g.input[-1].name = rng.choice(["input2", g.input[0].name])
        return "extra graph input"
    if choice == 15 and g.output:
        tt = g.output[0].type.tensor_type
        if rng.random() < 0.5:
            tt.elem_type = rng.choice(_ELEM_TYPES)
        elif tt.shape.dim:
            tt.shape.dim[-1].dim_value = rng.choice([0, 1, 2, 3, 1000])
        else:
            g.output[0].name = "nope"
        return "output type/shape edit"
    if choice == 16:
        if rng.random() < 0.5 and model.opset_import:
            model.opset_import[0].version = rng.choice([1, 6, 7, 9, 11, 13, 21, 22, 99, 0, -1])
            return f"opset {model.opset_import[0].version}"
        model.ir_version = rng.choice([0, 1, 3, 4, 7, 10, 11, 99, -1])
        return f"ir_version {model.ir_version}"
    if choice == 17 and t is not None:  # external data that points nowhere (or somewhere it should not)
        t.data_location = onnx.TensorProto.EXTERNAL
        del t.external_data[:]
        loc = rng.choice(["nope.bin", "../../../../etc/passwd", "/etc/hostname", "", "x\x00y", "."])
        for k, v in [("location", loc), ("offset", rng.choice(["0", "-4", "99999999", "x"])),
                     ("length", rng.choice(["4", "0", "-1", "1e9"]))][: rng.randrange(1, 4)]:
            entry = t.external_data.add()
            entry.key, entry.value = k, v
        if rng.random() < 0.7:
            t.raw_data = b""
        return f"initializer {t.name} external data {loc!r}"
    if choice == 18 and t is not None:
        other_inits = list(other.graph.initializer)
        if other_inits:
            o = rng.choice(other_inits)
            name = t.name
            t.CopyFrom(o)
            t.name = name
            return f"initializer {name} := other's {o.name}"
    if choice == 19 and t is not None:
        t.name = rng.choice([inits[0].name, "", "input", "dup"])
        return f"rename initializer to {t.name!r}"
    if choice == 20:
        g.initializer.append(copy.deepcopy(t) if t is not None else onnx.TensorProto())
        return "duplicate initializer"
    if choice == 21 and node is not None:
        k = rng.randrange(len(node.output)) if node.output else 0
        if node.output:
            node.output[k] = rng.choice([g.input[0].name if g.input else "x", node.input[0] if node.input else "",
                                         "", g.output[0].name if g.output else "y"])
        return f"{node.name}.output[{k}] edit"
    model.doc_string = "\udcff" if False else "x" * rng.choice([0, 10, 100000])
    return "doc_string"


def mutate_model(rng: random.Random, data: bytes, other: bytes) -> tuple[bytes, list[str]]:
    """A mutation of ``data`` (ONNX bytes): 60 % protobuf edits (1-3), the rest byte-level."""
    import onnx

    if rng.random() < 0.6:
        model, oth = onnx.ModelProto(), onnx.ModelProto()
        model.ParseFromString(data)
        oth.ParseFromString(other)
        try:
            steps = [_proto_edit(rng, model, oth) for _ in range(rng.choice([1, 1, 1, 2, 3]))]
            return model.SerializeToString(), steps
        except Exception as exc:
            steps = [f"proto edit refused by protobuf ({type(exc).__name__})"]
    else:
        steps = []
    op = rng.randrange(5)
    if op == 0:
        data, what = _flip_bits(rng, data)
    elif op == 1:
        data, what = _byte_run(rng, data)
    elif op == 2:
        data, what = _truncate(rng, data)
    elif op == 3:
        data, what = _splice(rng, data, other)
    else:
        data, what = _insert_delete(rng, data)
    return data, [*steps, what]


# -- mutations of JSON (keys and preprocessing files) ------------------------------------------------------
def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


def _get(obj: Any, path: tuple) -> Any:
    for p in path:
        obj = obj[p]
    return obj


def _set(obj: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    _get(obj, path[:-1])[path[-1]] = value
    return obj


def _png_variants(rng: random.Random, value: str) -> str:
    import numpy as np
    from PIL import Image

    raw = base64.b64decode(value)
    op = rng.randrange(9)
    if op == 0:
        return value[: rng.randrange(len(value))]
    if op == 1:
        return value + rng.choice(["!", "=", "A", "@@"])
    if op == 2:
        return base64.b64encode(raw[: rng.randrange(len(raw))]).decode()
    if op == 3:
        return base64.b64encode(b"GIF89a" + raw[6:]).decode()
    if op == 4:
        b = bytearray(raw)
        b[rng.randrange(8, len(b))] ^= 0xFF
        return base64.b64encode(bytes(b)).decode()
    if op == 5:  # a decompression bomb header: huge IHDR size
        ihdr = b"IHDR" + (100000).to_bytes(4, "big") + (100000).to_bytes(4, "big") + b"\x08\x02\x00\x00\x00"
        chunk = (13).to_bytes(4, "big") + ihdr + zlib.crc32(ihdr).to_bytes(4, "big")
        return base64.b64encode(raw[:8] + chunk + raw[33:]).decode()
    with Image.open(io.BytesIO(raw)) as img:
        arr = np.asarray(img.convert("RGB"))
    if op == 6:
        arr = arr[: max(1, arr.shape[0] // 2)]
    mode = {6: "RGB", 7: rng.choice(["L", "RGBA", "P", "1", "I;16", "CMYK"]), 8: "RGB"}[op]
    if op == 8:
        arr = np.zeros((rng.choice([0, 1, 3]) or 1, rng.choice([1, 2, 500]), 3), np.uint8)
    buf = io.BytesIO()
    img = Image.fromarray(arr)
    with contextlib.suppress(Exception):
        img = img.convert(mode)
    img.save(buf, format=rng.choice(["PNG", "PNG", "PNG", "BMP", "JPEG"]) if mode in ("RGB", "L") else "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _odd_value(rng: random.Random, value: Any) -> Any:
    r = rng.randrange(16)
    if r == 0:
        return None
    if r == 1:
        return rng.choice([True, False])
    if r == 2:
        return rng.choice(["", "x", "NaN", "1", "-1", "\u00e9\u0000", "a" * 5000])
    if r == 3:
        return rng.choice([10**30, 2**63, -(2**63), 2**53 + 1, 2**31, -(2**31) - 1, 10**400])
    if r == 4:
        return rng.choice([float("nan"), float("inf"), -float("inf")])
    if r == 5:
        return rng.choice([[], {}, [1], [[1]], {"a": 1}, [None], ["x"] * 3])
    if r == 6:
        return rng.choice([-1, 0, 1, 2, 3, 7, 255, 256, 99999, -99999])
    if r == 7:
        return rng.choice([0.0, -0.0, 1e-320, 1e308, -1e308, 0.5, -0.5, 1.5])
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        as_float = float(value) if abs(value) < 2**1023 else math.inf  # an earlier mutation may have grown it
        return rng.choice([value + 1, value - 1, -value, value * 1000, value * 2**40, 0, as_float])
    if isinstance(value, float):
        return rng.choice([value * -1, value * 1e6, value + 1, 0.0, value / 1e6, int(value) if math.isfinite(value)
                           else 0, str(value)])
    if isinstance(value, list):
        if not value:
            return rng.choice([[0], [0.5], [None]])
        op = rng.randrange(5)
        if op == 0:
            return value[: rng.randrange(len(value))]
        if op == 1:
            return value + value[-1:] * rng.choice([1, 5])
        if op == 2:
            return list(reversed(value))
        if op == 3:
            return [value]
        return value[:1] * rng.choice([1, 2, 100000])
    if isinstance(value, dict):
        keys = list(value)
        if keys and rng.random() < 0.5:
            v = dict(value)
            del v[rng.choice(keys)]
            return v
        return {**value, rng.choice(["extra", "f8", "shape", "kind"]): rng.choice([1, "x", None, [1, 2]])}
    if isinstance(value, str):
        if len(value) > 40 and re.fullmatch(r"[A-Za-z0-9+/=]+", value):
            try:
                if base64.b64decode(value).startswith(b"\x89PNG"):
                    return _png_variants(rng, value)
            except Exception:
                pass
            raw = bytearray(base64.b64decode(value))  # an f8 array: change its byte count or a value
            op = rng.randrange(4)
            if op == 0 and raw:
                raw = raw[: rng.randrange(len(raw))]
            elif op == 1:
                raw += bytes(rng.choice([1, 8, 800]))
            elif op == 2 and len(raw) >= 8:
                import struct

                i = 8 * rng.randrange(len(raw) // 8)
                raw[i : i + 8] = struct.pack("<d", rng.choice([float("nan"), float("inf"), 1e308, -1e308, 0.0]))
            else:
                return value[:-1] + "!"
            return base64.b64encode(bytes(raw)).decode()
        return rng.choice([value + "x", value.upper(), value[: len(value) // 2], "", value * 2])
    return value


def _deep(rng: random.Random) -> Any:
    depth = rng.choice([50, 500, 5000, 100000])
    return "[" * depth + "]" * depth  # spliced into the text: the fuzzer's own edits never recurse into it


def mutate_json(rng: random.Random, obj: Any, other: Any | None = None) -> tuple[bytes, list[str]]:
    """A mutated JSON document (1-3 edits of the parsed object, or a byte mutation of its text)."""
    obj = copy.deepcopy(obj)
    steps: list[str] = []
    raw_deep: str | None = None
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        paths = _paths(obj)
        op = rng.randrange(10)
        path = rng.choice(paths[1:] or paths)
        where = ".".join(map(str, path))
        try:
            current = _get(obj, path)
        except (KeyError, IndexError, TypeError):
            continue
        if op <= 5:
            obj = _set(obj, path, _odd_value(rng, current))
            steps.append(f"{where} := odd value")
        elif op == 6 and path:
            parent = _get(obj, path[:-1])
            if isinstance(parent, dict):
                del parent[path[-1]]
            else:
                parent.pop(path[-1])
            steps.append(f"remove {where}")
        elif op == 7:
            raw_deep = "deep"
            d = _deep(rng)
            if isinstance(d, str):
                obj = _set(obj, path, "__DEEP__")
                raw_deep = d
            else:
                obj = _set(obj, path, d)
            steps.append(f"{where} := deep nesting")
        elif op == 8 and other is not None and isinstance(obj, dict) and isinstance(other, dict):
            k = rng.choice(list(other))
            obj[k] = copy.deepcopy(other[k])
            steps.append(f"section {k} from the other document")
        else:
            sections = [p for p in paths if p and isinstance(_get(obj, p), (dict, list))]
            if sections:
                p = rng.choice(sections)
                obj = _set(obj, p, _odd_value(rng, _get(obj, p)))
                steps.append(f"{'.'.join(map(str, p))} := odd container")
    text = json.dumps(obj, indent=rng.choice([None, 1]))
    if raw_deep is not None and raw_deep != "deep":
        text = text.replace('"__DEEP__"', raw_deep, 1)
    data = text.encode()
    if rng.random() < 0.15:
        op = rng.randrange(4)
        data = [_flip_bits, _byte_run, _truncate, _insert_delete][op](rng, data)[0]
        steps.append(["flip bits", "byte run", "truncate", "insert/delete"][op])
    if rng.random() < 0.03:
        data = data.decode(errors="replace").encode("utf-16")
        steps.append("utf-16")
    return data, steps


# -- cases ---------------------------------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    files: dict[str, str | bytes]  # name in the case folder -> bytes, or a base-set file to copy
    commands: list[tuple[list[str], list[str], float]]  # (argv with {d}/{b}, outputs it may write, time limit)
    mutation: list[str] = field(default_factory=list)


def _entry(manifest: dict, rng: random.Random, job: str | None = None) -> dict:
    entries = [e for e in manifest["entries"] if job is None or e["job"] == job]
    return rng.choice(entries)


def make_case(seed: int, kind: str, index: int, manifest: dict, base: Path, heavy_every: int,
              limit: float, heavy_limit: float) -> Case:
    rng = random.Random(f"{seed}:{kind}:{index}")
    cid = f"{kind}:{index}"
    heavy = heavy_every > 0 and index % heavy_every == heavy_every - 1
    if kind == "model":
        e = _entry(manifest, rng)
        which = rng.choice(["source", "output"])
        data = (base / e[which]).read_bytes()
        other = (base / _entry(manifest, rng)[rng.choice(["source", "output"])]).read_bytes()
        mutated, steps = mutate_model(rng, data, other)
        files = {"x.onnx": mutated, "x.preprocessing.json": e["sidecar"], "k.key": e["key"]}
        imgs = f"{{b}}/imgs{e['size']}"
        cmds: list[tuple[list[str], list[str], float]] = [
            (["inspect", "{d}/x.onnx"], [], limit),
            (["verify", "{d}/x.onnx", "--key", "{d}/k.key"], [], limit)]
        if index % 3 == 0:
            pair = ["{b}/" + e["source"], "{d}/x.onnx"] if which == "output" else ["{d}/x.onnx", "{b}/" + e["output"]]
            cmds.append((["evaluate", *pair, "--key", "{d}/k.key", "--images", imgs, "--views", "1", "--quiet"], [],
                         limit))
        if heavy:
            out = ["{d}/o.onnx", "{d}/o.key", "{d}/o.key.public.json"]
            if e["job"] == "stain" or rng.random() < 0.3:
                cmds.append((["stain", "{d}/x.onnx", "-o", "{d}/o.onnx", "--key", "{d}/o.key", "--images", imgs,
                              "--fpr", "0.05", "--chance", "0.2", "--seed", "1", "--mode",
                              rng.choice(["insert", "inplace"]), "--quiet"], out, heavy_limit))
            else:
                cmds.append((["lock", "{d}/x.onnx", "-o", "{d}/o.onnx", "--key", "{d}/o.key", "--images", imgs,
                              "--fpr", "1e-3", "--seed", "1", "--occlusion-steps", "0", "--quiet"], out, heavy_limit))
        return Case(cid, files, cmds, [f"{e[which]}", *steps])
    if kind == "key":
        e = _entry(manifest, rng)
        body = json.loads((base / e["key"]).read_text())
        other = json.loads((base / _entry(manifest, rng)["key"]).read_text())
        if rng.random() < 0.1:
            mutated, steps = _flip_bits(rng, (base / e["key"]).read_bytes())[0], ["raw bit flips"]
        else:
            mutated, steps = mutate_json(rng, body, other)
        files = {"x.key": mutated}
        cmds = [(["verify", "{b}/" + e["output"], "--key", "{d}/x.key"], [], limit)]
        if e["job"] == "lock" or rng.random() < 0.2:
            cmds.append((["apply-patch", "{b}/photo.png", "--key", "{d}/x.key", "-o", "{d}/patched"],
                         ["{d}/patched/", "{d}/patched/photo.png"], limit))
            if rng.random() < 0.3:
                cmds.append((["apply-patch", "{b}/photo.png", "--raw", "--key", "{d}/x.key", "-o", "{d}/raw"],
                             ["{d}/raw/", "{d}/raw/photo.png"], limit))
        if index % 3 == 0:
            cmds.append((["evaluate", "{b}/" + e["source"], "{b}/" + e["output"], "--key", "{d}/x.key", "--images",
                          f"{{b}}/imgs{e['size']}", "--views", "1", "--quiet", "--json", "{d}/r.json"],
                         ["{d}/r.json"], limit))
        return Case(cid, files, cmds, [e["key"], *steps])
    if kind == "pre":
        e = rng.choice([x for x in manifest["entries"] if x["name"] in ("lock_gate", "mlp_stain")])
        body = json.loads((base / e["sidecar"]).read_text())
        mutated, steps = mutate_json(rng, body)
        out = ["{d}/o.onnx", "{d}/o.key", "{d}/o.key.public.json"]
        imgs = f"{{b}}/imgs{e['size']}"
        if e["job"] == "lock":
            cmd = ["lock", "{b}/" + e["source"], "-o", "{d}/o.onnx", "--key", "{d}/o.key", "--images", imgs,
                   "--fpr", "1e-3", "--seed", "1", "--occlusion-steps", "0", "--quiet", "--preprocessing", "{d}/p.json"]
            return Case(cid, {"p.json": mutated}, [(cmd, out, heavy_limit)], [e["sidecar"], *steps])
        # the MLP's stain reads the mutated file as its sidecar; a full stain only every heavy-every-th case
        cmds = [(["verify", "{d}/x.onnx", "--key", "{d}/k.key"], [], limit)]
        if heavy:
            cmds.append((["stain", "{d}/x.onnx", "-o", "{d}/o.onnx", "--key", "{d}/o.key", "--images", imgs, "--fpr",
                          "0.05", "--seed", "1", "--mode", "insert", "--quiet"], out, heavy_limit))
        return Case(cid, {"x.onnx": e["output"], "x.preprocessing.json": mutated, "k.key": e["key"]}, cmds,
                    [e["sidecar"], *steps])
    raise ValueError(kind)


# -- the worker: runs commands in-process ---------------------------------------------------------------
def worker_main() -> None:
    import resource

    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
    os.environ["ONNXSTAIN_DEBUG"] = "1"  # an internal error prints its traceback: the defect's signature
    from click.testing import CliRunner

    from onnxstain.cli import main

    out = sys.stdout
    sys.stdout = sys.stderr  # nothing but replies on the pipe
    for line in sys.stdin:
        req = json.loads(line)
        err_fd = tempfile.TemporaryFile()  # noqa: SIM115 -- fd 2 points at it while the command runs
        saved = os.dup(2)
        os.dup2(err_fd.fileno(), 2)
        t0 = time.time()
        try:
            res = CliRunner().invoke(main, req["argv"], catch_exceptions=True)
            tb = None
            if res.exception is not None and not isinstance(res.exception, SystemExit):
                tb = "".join(traceback.format_exception(*res.exc_info))
            code, stderr = res.exit_code, res.stderr
        except BaseException as exc:
            code, stderr, tb = -1, "", "".join(traceback.format_exception(exc))
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        err_fd.seek(0)
        c_err = err_fd.read().decode(errors="replace")
        err_fd.close()
        out.write(json.dumps(dict(exit=code, stderr=stderr, traceback=tb, c_stderr=c_err[:4000],
                                  secs=time.time() - t0)) + "\n")
        out.flush()


class Worker:
    """A worker process: one command at a time, killed and restarted when it runs past its limit."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    def _start(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=ROOT,
                                     start_new_session=True, text=True, bufsize=1)

    def run(self, argv: list[str], limit: float) -> dict[str, Any]:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        assert self.proc and self.proc.stdin and self.proc.stdout
        t0 = time.time()
        try:
            self.proc.stdin.write(json.dumps(dict(argv=argv)) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            self.stop()
            return dict(exit=None, crashed=True, secs=0.0)
        # A hang is a command that used `limit` seconds of CPU, or that has not answered after 10 × limit
        # (+30 s for a fresh worker's imports): on a machine shared with others, wall time alone is no measure.
        cpu0 = self._cpu()
        while True:
            ready, _, _ = select.select([self.proc.stdout], [], [], 2.0)
            if ready:
                break
            waited, used = time.time() - t0, self._cpu() - cpu0
            if used > limit + 10.0 or waited > 10 * limit + 30.0:
                self.stop()
                return dict(exit=None, hang=True, secs=waited, cpu=used)
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            self.proc = None
            return dict(exit=None, crashed=True, signal=code, secs=time.time() - t0)
        return json.loads(line)

    def _cpu(self) -> float:
        """CPU seconds the worker has used (all its threads), from /proc."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError, AttributeError):
            return 0.0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
        self.proc = None


# -- classification ------------------------------------------------------------------------------------------
def _snapshot(d: Path) -> dict[str, str]:
    out = {}
    for root, dirs, files in os.walk(d):
        for name in dirs:
            out[os.path.relpath(os.path.join(root, name), d) + "/"] = "dir"
        for name in files:
            p = Path(root, name)
            out[os.path.relpath(p, d)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _norm(text: str) -> str:
    text = re.sub(r"/tmp/\S+|/work/\S+|'[^']*'|\"[^\"]*\"", "…", text)
    return re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "N", text)[:160]


def _tb_signature(tb: str) -> str:
    frames = re.findall(r'File "([^"]+)", line \d+, in (\S+)', tb)
    ours = [f"{Path(f).name}:{fn}" for f, fn in frames if "/onnxstain/" in f]
    lines = tb.strip().splitlines()
    named = [m.group(1) for ln in lines for m in [re.match(r"(?:onnxstain: internal error: )?([\w.]+(?:Error|Exception|"
                                                       r"Interrupt|Exit|Warning))\b", ln)] if m]
    exc = named[-1] if named else "?"
    return f"{exc} @ {ours[-1] if ours else (Path(frames[-1][0]).name + ':' + frames[-1][1]) if frames else '?'}"


def classify(cmd: str, res: dict[str, Any], before: dict[str, str], after: dict[str, str],
             outputs: list[str]) -> str | None:
    """None when the outcome is clean, else the defect's signature."""
    if res.get("hang"):
        return f"HANG in {cmd}"
    if res.get("crashed"):
        return f"CRASH of the worker in {cmd} (signal {res.get('signal')})"
    tb = res.get("traceback")
    stderr = res.get("stderr") or ""
    if tb:
        return f"UNCAUGHT {_tb_signature(tb)}"
    code = res["exit"]
    if code == 3 or "Traceback (most recent call last)" in stderr:
        return f"INTERNAL {_tb_signature(stderr)}" if "Traceback" in stderr else f"INTERNAL {_norm(stderr)}"
    if code not in (0, 1, 2) or (code == 1 and cmd != "verify"):
        return f"EXIT {code} from {cmd}"
    if res.get("c_stderr", "").strip():
        return f"STRAY STDERR in {cmd}: {_norm(res['c_stderr'].strip().splitlines()[0])}"
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    if code == 2 and (len(lines) != 1 or not lines[0].startswith("onnxstain: error: ")):
        return f"NOT ONE LINE from {cmd}: {_norm(' | '.join(lines)[:200])}"
    changed = [k for k, v in before.items() if after.get(k) != v]
    if changed:
        return f"INPUT CHANGED by {cmd}"
    new = set(after) - set(before)
    if any(TMP_MARK in k for k in new):
        return f"TEMP LEFT by {cmd}"
    if code != 0 and new:
        return f"LEFTOVER after exit {code} of {cmd}"
    if code == 0 and not new <= set(outputs):
        return f"UNDECLARED OUTPUT of {cmd}"
    return None


# -- the run -------------------------------------------------------------------------------------------------
@dataclass
class Tally:
    cases: dict[str, int] = field(default_factory=dict)
    commands: dict[str, dict[str, int]] = field(default_factory=dict)
    defects: dict[str, dict[str, Any]] = field(default_factory=dict)
    defective_cases: int = 0


def _materialise(case: Case, d: Path, base: Path) -> None:
    d.mkdir(parents=True)
    for name, content in case.files.items():
        if isinstance(content, bytes):
            (d / name).write_bytes(content)
        else:
            shutil.copy(base / content, d / name)


def _fill(arg: str, d: Path, base: Path) -> str:
    return arg.replace("{d}", str(d)).replace("{b}", str(base))


def run_case(case: Case, worker: Worker, base: Path, work: Path) -> list[tuple[str, str, dict]]:
    """Run every command of the case; (command, signature or "", result) for each."""
    d = work / case.id.replace(":", "-")
    shutil.rmtree(d, ignore_errors=True)
    _materialise(case, d, base)
    out = []
    try:
        for argv, outputs, limit in case.commands:
            before = _snapshot(d)
            res = worker.run([_fill(a, d, base) for a in argv], limit)
            after = _snapshot(d)
            declared = [os.path.relpath(_fill(o, d, base), d) + ("/" if o.endswith("/") else "") for o in outputs]
            sig = classify(argv[0], res, before, after, declared) or ""
            out.append((argv[0], sig, res))
            for name in set(after) - set(before):  # the next command starts from the case's own files
                p = d / name.rstrip("/")
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
    finally:
        pass
    return out


def fuzz(args: argparse.Namespace) -> int:
    base = Path(args.base).resolve()
    manifest = build_base(base)
    out_dir = Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fuzz-", dir=args.work))
    plan = [("model", i) for i in range(args.start, args.start + args.models)]
    plan += [("key", i) for i in range(args.start, args.start + args.keys)]
    plan += [("pre", i) for i in range(args.start, args.start + args.pres)]
    random.Random(args.seed).shuffle(plan)
    tally = Tally()
    lock = threading.Lock()
    todo = iter(plan)
    stop = threading.Event()  # SIGTERM / Ctrl-C: finish the cases in flight, write the report, stop
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    t0 = time.time()
    done = [0]

    def report() -> dict[str, Any]:
        el = time.time() - t0
        return dict(format="onnxstain-fuzz-report", version=1, seed=args.seed, start=args.start,
                    planned=dict(models=args.models, keys=args.keys, pres=args.pres), heavy_every=args.heavy_every,
                    jobs=args.jobs, limit_s=args.limit, heavy_limit_s=args.heavy_limit, elapsed_s=round(el, 1),
                    cases=tally.cases, cases_per_s=round(sum(tally.cases.values()) / max(el, 1e-9), 2),
                    commands=tally.commands, defective_cases=tally.defective_cases,
                    distinct_defects=len(tally.defects),
                    defects=sorted(tally.defects.values(), key=lambda x: -x["count"]),
                    replay=f"python tools/fuzz.py --seed {args.seed} --base {args.base} --replay KIND:INDEX")

    def loop() -> None:
        worker = Worker()
        try:
            while True:
                with lock:
                    item = next(todo, None)
                if item is None or stop.is_set() or (args.max_seconds and time.time() - t0 > args.max_seconds):
                    return
                kind, index = item
                try:
                    case = make_case(args.seed, kind, index, manifest, base, args.heavy_every, args.limit,
                                     args.heavy_limit)
                except Exception as exc:  # the fuzzer's own bug: say so, skip the case, go on
                    print(f"FUZZER ERROR making {kind}:{index}: {type(exc).__name__}: {exc}", flush=True)
                    with lock:
                        tally.cases["fuzzer_errors"] = tally.cases.get("fuzzer_errors", 0) + 1
                    continue
                results = run_case(case, worker, base, work)
                with lock:
                    tally.cases[kind] = tally.cases.get(kind, 0) + 1
                    bad = False
                    for cmd, sig, res in results:
                        c = tally.commands.setdefault(cmd, {})
                        key = "defect" if sig else f"exit {res.get('exit')}"
                        c[key] = c.get(key, 0) + 1
                        if sig:
                            bad = True
                            entry = tally.defects.get(sig)
                            if entry is None:
                                entry = tally.defects[sig] = dict(signature=sig, count=0, cases=[],
                                                                  mutation=case.mutation, command=cmd,
                                                                  detail=(res.get("traceback") or res.get("stderr")
                                                                          or res.get("c_stderr") or "")[-3000:])
                                keep = out_dir / "defects" / hashlib.sha1(sig.encode()).hexdigest()[:10]
                                shutil.rmtree(keep, ignore_errors=True)
                                shutil.copytree(work / case.id.replace(":", "-"), keep)
                                (keep / "case.json").write_text(json.dumps(dict(id=case.id, seed=args.seed,
                                                                                signature=sig,
                                                                                mutation=case.mutation,
                                                                                commands=case.commands), indent=1))
                                print(f"DEFECT {case.id} {sig}", flush=True)
                            entry["count"] += 1
                            if len(entry["cases"]) < 10:
                                entry["cases"].append(case.id)
                    tally.defective_cases += bad
                    done[0] += 1
                    if done[0] % args.every == 0:
                        (out_dir / "report.json").write_text(json.dumps(report(), indent=1))
                        el = time.time() - t0
                        print(f"{done[0]}/{len(plan)} cases, {done[0] / el:.1f}/s, "
                              f"{tally.defective_cases} defective, {len(tally.defects)} signatures", flush=True)
                shutil.rmtree(work / case.id.replace(":", "-"), ignore_errors=True)
        finally:
            worker.stop()

    threads = [threading.Thread(target=loop) for _ in range(args.jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rep = report()
    (out_dir / "report.json").write_text(json.dumps(rep, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({k: rep[k] for k in ("cases", "cases_per_s", "defective_cases", "distinct_defects",
                                          "elapsed_s")}))
    for dfx in rep["defects"]:
        print(f"  {dfx['count']:5d}  {dfx['signature']}  (e.g. {dfx['cases'][0]})")
    return 1 if rep["defective_cases"] else 0


def replay(args: argparse.Namespace) -> int:
    """Run one case again, in this process, and print each command's outcome (and traceback)."""
    base = Path(args.base).resolve()
    manifest = build_base(base)
    kind, _, index = args.replay.partition(":")
    case = make_case(args.seed, kind, int(index), manifest, base, args.heavy_every, args.limit, args.heavy_limit)
    print("mutation:", "; ".join(case.mutation))
    work = Path(tempfile.mkdtemp(prefix="fuzz-replay-", dir=args.work))
    worker = Worker()
    try:
        for cmd, sig, res in run_case(case, worker, base, work):
            print(f"{cmd}: exit {res.get('exit')} {'DEFECT ' + sig if sig else 'clean'}")
            for k in ("stderr", "c_stderr", "traceback"):
                if res.get(k):
                    print(f"  {k}: {res[k].rstrip()}")
        if args.keep:
            print("case folder kept:", work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    finally:
        worker.stop()
    return 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models", type=int, default=100, help="mutated models")
    p.add_argument("--keys", type=int, default=100, help="mutated keys")
    p.add_argument("--pres", type=int, default=20, help="mutated preprocessing files")
    p.add_argument("--start", type=int, default=0, help="first case index of each kind (resume a run)")
    p.add_argument("--jobs", type=int, default=1, help="worker processes")
    p.add_argument("--heavy-every", type=int, default=25, help="every K-th case also stains or locks (0: never)")
    p.add_argument("--limit", type=float, default=20.0, help="time limit of a light command, seconds")
    p.add_argument("--heavy-limit", type=float, default=90.0, help="time limit of a stain or lock, seconds")
    p.add_argument("--max-seconds", type=float, default=0.0, help="stop starting new cases after this long")
    p.add_argument("--base", default=str(ROOT / "out" / "fuzz" / "base"), help="the base set (built once)")
    p.add_argument("--out", default=str(ROOT / "out" / "fuzz"), help="report.json and defects/ go here")
    p.add_argument("--work", default=None, help="parent of the case folders (default: the temp folder)")
    p.add_argument("--every", type=int, default=200, help="progress line and report every N cases")
    p.add_argument("--replay", help="KIND:INDEX: run that case again and print its outcomes")
    p.add_argument("--keep", action="store_true", help="with --replay: keep the case folder")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.worker:
        worker_main()
        return 0
    if args.replay:
        return replay(args)
    return fuzz(args)


if __name__ == "__main__":
    sys.exit(main())
