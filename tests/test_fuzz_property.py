"""Property: no mutated model, key or preprocessing file gives a traceback.

Hypothesis (derandomized, no example database: the same few hundred cases on every run) mutates

* the bytes of a tiny model and of its stained output (bit flips, byte runs, truncation, splicing) and
  their protobuf fields (element types, dims, raw_data sizes, Clip bounds, attributes, node inputs),
  which then go through ``inspect`` and ``verify``;
* a valid two-trigger stain key (field removal, wrong types, huge integers, NaN/Infinity, deep nesting,
  out-of-range values, corrupted base64/PNG payloads), which goes through ``verify``;
* a preprocessing file, read as ``--preprocessing`` would be; what loads must convert images.

Every outcome must be clean: exit 0 (or 1 for ``verify``) or exit 2 with exactly one line
``onnxstain: error: …``; never an uncaught exception or an internal error (exit 3).
``tools/fuzz.py`` runs the same idea for long runs, with time limits and more commands.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper
from tinymodels import smooth_images, tiny_cnn, tiny_mlp

import onnxstain
from onnxstain import Preprocessing, StainOptions
from onnxstain.cli import main
from onnxstain.errors import OnnxStainError

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SETTINGS = dict(derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fuzz-base")
    onnx.save(tiny_mlp(), d / "m.onnx")
    Preprocessing(height=8, width=8, resize=None).save(d / "m.preprocessing.json")
    onnxstain.stain(d / "m.onnx", d / "s.onnx", d / "s.key", images=smooth_images(48, size=8, seed=3),
                    options=StainOptions(mode="insert", seed=1, fpr=0.05))  # a multi-class (two-trigger) key
    onnx.save(tiny_cnn(), d / "c.onnx")
    return d


def _clean(argv: list[str], allowed: tuple[int, ...] = (0, 2)) -> None:
    res = CliRunner().invoke(main, argv, catch_exceptions=True)
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert res.exit_code in allowed, f"exit {res.exit_code}: {res.stderr}"
    if res.exit_code == 2:
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("onnxstain: error: "), res.stderr
    assert "Traceback" not in res.stderr


# -- model bytes ------------------------------------------------------------------------------------------------
_ODD_INTS = [0, -1, 1, 2, 3, 99, 2**31 - 1, 2**40, -(2**40)]


@st.composite
def proto_edit(draw, data: bytes) -> bytes:
    model = onnx.ModelProto()
    model.ParseFromString(data)
    g = model.graph
    t = g.initializer[draw(st.integers(0, len(g.initializer) - 1))]
    node = g.node[draw(st.integers(0, len(g.node) - 1))]
    what = draw(st.sampled_from(["dtype", "dims", "raw", "clip", "attr", "input", "op", "graph_input"]))
    if what == "dtype":
        t.data_type = draw(st.integers(-1, 40))
    elif what == "dims":
        if t.dims:
            t.dims[draw(st.integers(0, len(t.dims) - 1))] = draw(st.sampled_from(_ODD_INTS))
        else:
            t.dims.append(draw(st.sampled_from([0, 2, 3])))
    elif what == "raw":
        cut = draw(st.integers(0, len(t.raw_data) + 8))
        t.raw_data = t.raw_data[:cut] + bytes(max(0, cut - len(t.raw_data)))
    elif what == "clip":
        value = draw(st.sampled_from([np.zeros(2, np.float32), np.array([[6.0]], np.float32),
                                      np.array(np.nan, np.float32), np.zeros(0, np.float32)]))
        t.CopyFrom(numpy_helper.from_array(value, t.name))
    elif what == "attr" and node.attribute:
        a = node.attribute[draw(st.integers(0, len(node.attribute) - 1))]
        if a.ints:
            a.ints[draw(st.integers(0, len(a.ints) - 1))] = draw(st.sampled_from(_ODD_INTS))
        elif a.type == onnx.AttributeProto.INT:
            a.i = draw(st.sampled_from(_ODD_INTS))
        elif a.type == onnx.AttributeProto.FLOAT:
            a.f = draw(st.sampled_from([float("nan"), float("inf"), -1.0, 1e30]))
    elif what == "input" and node.input:
        names = [o for n in g.node for o in n.output] + [i.name for i in g.initializer] + ["", "nope"]
        node.input[draw(st.integers(0, len(node.input) - 1))] = draw(st.sampled_from(names))
    elif what == "op":
        node.op_type = draw(st.sampled_from(["Relu", "Conv", "Gemm", "Clip", "Identity", "Softmax", "Nope"]))
    else:
        tt = g.input[0].type.tensor_type
        if draw(st.booleans()):
            tt.elem_type = draw(st.sampled_from([0, 2, 7, 10, 16, 2**31 - 1]))
        else:
            tt.shape.dim[draw(st.integers(0, 3))].dim_value = draw(st.sampled_from(_ODD_INTS))
    return model.SerializeToString()


@st.composite
def byte_edit(draw, data: bytes, other: bytes) -> bytes:
    what = draw(st.sampled_from(["flip", "run", "truncate", "splice"]))
    b = bytearray(data)
    if what == "flip":
        for pos, bit in draw(st.lists(st.tuples(st.integers(0, len(b) - 1), st.integers(0, 7)), min_size=1,
                                      max_size=8)):
            b[pos] ^= 1 << bit
    elif what == "run":
        pos, n = draw(st.integers(0, len(b) - 1)), draw(st.integers(1, 64))
        b[pos : pos + n] = bytes([draw(st.integers(0, 255))]) * n
    elif what == "truncate":
        del b[draw(st.integers(0, len(b))):]
    else:
        b = b[: draw(st.integers(0, len(b)))] + other[draw(st.integers(0, len(other))):]
    return bytes(b)


def test_mutated_models(base, tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    sources = {name: (base / name).read_bytes() for name in ("m.onnx", "s.onnx", "c.onnx")}
    sidecar = (base / "m.preprocessing.json").read_text()

    @settings(max_examples=120, **SETTINGS)
    @given(st.data())
    def check(data):
        name = data.draw(st.sampled_from(sorted(sources)))
        src = sources[name]
        other = sources[data.draw(st.sampled_from(sorted(sources)))]
        mutated = data.draw(st.one_of(proto_edit(src), byte_edit(src, other)))
        p = d / "x.onnx"
        p.write_bytes(mutated)
        (d / "x.preprocessing.json").write_text(sidecar if name != "c.onnx" else
                                                json.dumps({"height": 16, "width": 16, "resize": None}))
        _clean(["inspect", str(p)])
        if name != "c.onnx":
            _clean(["verify", str(p), "--key", str(base / "s.key")], (0, 1, 2))

    check()


# -- JSON documents (keys, preprocessing files) ------------------------------------------------------------------
def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list) and len(obj) < 50:
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


def _nested(depth: int) -> str:
    return f"__DEEP__{depth}"  # replaced by the nested text after json.dumps (the edits stay shallow)


ODD = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.sampled_from([10**400, -(10**400), 2**53 + 1]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.lists(st.one_of(st.integers(-3, 300), st.floats(-1e3, 1e3)), max_size=4),
    st.dictionaries(st.sampled_from(["f8", "shape", "x"]), st.one_of(st.integers(-2, 5), st.text(max_size=4)),
                    max_size=2),
    st.integers(1, 3000).map(_nested),
    st.sampled_from(["", "!!!", "iVBORw0KGgo=", "AAAA", "-inf", "inf", "nan"]),
)


@st.composite
def json_edit(draw, doc: Any) -> bytes:
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(doc)[1:]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = doc
        for p in path[:-1]:
            parent = parent[p]
        current = parent[path[-1]]
        what = draw(st.sampled_from(["odd", "odd", "remove", "number", "string"]))
        if what == "remove":
            del parent[path[-1]]
        elif what == "number" and isinstance(current, int | float) and not isinstance(current, bool):
            parent[path[-1]] = current * draw(st.sampled_from([-1, 0, 2, 1000, 2**40])) + draw(st.integers(-2, 2))
        elif what == "string" and isinstance(current, str) and current:
            cut = draw(st.integers(0, len(current)))
            parent[path[-1]] = current[:cut] + draw(st.sampled_from(["", "A", "=", "!", current[cut:][:8]]))
        else:
            parent[path[-1]] = draw(ODD)
    text = re.sub(r'"__DEEP__(\d+)"', lambda m: "[" * int(m.group(1)) + "]" * int(m.group(1)), json.dumps(doc))
    if draw(st.integers(0, 9)) == 0:  # and now and then the text itself
        cut = draw(st.integers(0, len(text)))
        text = text[:cut]
    return text.encode()


def test_mutated_keys(base, tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    key = json.loads((base / "s.key").read_text())

    @settings(max_examples=150, **SETTINGS)
    @given(json_edit(key))
    def check(mutated):
        (d / "x.key").write_bytes(mutated)
        _clean(["verify", str(base / "s.onnx"), "--key", str(d / "x.key")], (0, 1, 2))

    check()


def test_mutated_preprocessing(tmp_path_factory):
    d = tmp_path_factory.mktemp("pre")
    good = Preprocessing(height=8, width=8, resize=12).to_dict()

    @settings(max_examples=150, **SETTINGS)
    @given(json_edit(good))
    def check(mutated):
        (d / "p.json").write_bytes(mutated)
        try:
            pre = Preprocessing.load(d / "p.json")
        except OnnxStainError:
            return
        if pre.height * pre.width > 4096 or (pre.resize or 0) > 256:
            return  # valid, but too large an image to convert in a unit test
        x = pre.to_input(np.full((1, pre.height, pre.width, 3), 128, np.uint8))
        assert x.shape == pre.input_shape(1) and np.isfinite(x.astype(np.float64)).all()
        from PIL import Image

        assert pre.fit_photo(Image.new("RGB", (13, 10))).shape == (pre.height, pre.width, 3)

    check()
