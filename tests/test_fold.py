"""The analysis copy's graph rewrites (``onnxstain._onnx.fold``): zero Pads fused into the Conv they feed."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxstain._onnx.fold import fuse_pads
from onnxstain.runtime import session


def _pad_conv(pads: list[int], value: float = 0.0, conv_pads: list[int] | None = None, opset: int = 17,
              mode: str = "constant") -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array(pads, np.int64), "pads"),
             numpy_helper.from_array(np.array(value, np.float32), "value")]
    conv_attrs = {"kernel_shape": [3, 3], "strides": [2, 2]}
    if conv_pads is not None:
        conv_attrs["pads"] = conv_pads
    nodes = [helper.make_node("Pad", ["x", "pads", "value"], ["xp"], mode=mode),
             helper.make_node("Conv", ["xp", "w"], ["y"], **conv_attrs),
             helper.make_node("Relu", ["y"], ["z"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 9, 10])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 4, None, None])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _outputs(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = session(model)
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("pads, conv_pads", [
    ([0, 0, 0, 1, 0, 0, 1, 2], None),  # TF "same", asymmetric
    ([0, 0, 1, 1, 0, 0, 1, 1], [1, 0, 0, 1]),  # added to the Conv's own
])
def test_zero_pad_is_fused_and_outputs_are_unchanged(pads, conv_pads):
    model = _pad_conv(pads, conv_pads=conv_pads)
    fused = fuse_pads(model)
    assert [n.op_type for n in fused.graph.node] == ["Conv", "Relu"]
    assert [n.op_type for n in model.graph.node] == ["Pad", "Conv", "Relu"]  # the input is not touched
    x = np.random.default_rng(1).normal(size=(2, 3, 9, 10)).astype(np.float32)
    np.testing.assert_allclose(_outputs(fused, x), _outputs(model, x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("why, model", [
    ("a non-zero fill", _pad_conv([0, 0, 1, 1, 0, 0, 1, 1], value=1.0)),
    ("reflect mode", _pad_conv([0, 0, 1, 1, 0, 0, 1, 1], mode="reflect")),
    ("a channel pad", _pad_conv([0, 1, 1, 1, 0, 0, 1, 1])),
    ("a negative pad (a crop)", _pad_conv([0, 0, -1, 0, 0, 0, 1, 1])),
])
def test_other_pads_stay(why, model):
    assert fuse_pads(model) is model, why


def test_a_kept_pad_stays():
    model = _pad_conv([0, 0, 1, 1, 0, 0, 1, 1])
    assert fuse_pads(model, keep={"xp"}) is model
