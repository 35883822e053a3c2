"""The non-finite weight check (``sanity.nonfinite_tensor``) on graphs built with onnx.helper."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxstain.sanity import nonfinite_tensor


def _model(pad_value: float, weight: np.ndarray, pad_value_elems: int = 1) -> onnx.ModelProto:
    """x → Pad(constant = pad_value) → MaxPool → Mul(weight): the TF max-pool padding pattern."""
    nodes = [
        helper.make_node("Pad", ["x", "pads", "fill"], ["p"], mode="constant"),
        helper.make_node("MaxPool", ["p"], ["m"], kernel_shape=[3, 3]),
        helper.make_node("Mul", ["m", "w"], ["y"]),
    ]
    inits = [numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads"),
             numpy_helper.from_array(np.full(pad_value_elems, pad_value, np.float32).reshape(
                 () if pad_value_elems == 1 else (pad_value_elems,)), "fill"),
             numpy_helper.from_array(weight.astype(np.float32), "w")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_a_single_infinite_fill_value_is_accepted():
    assert nonfinite_tensor(_model(-np.inf, np.ones((1, 2, 1, 1)))) is None


@pytest.mark.parametrize(("pad", "weight", "elems", "bad"), [
    (np.nan, np.ones((1, 2, 1, 1)), 1, "fill"),            # NaN is never a fill value
    (-np.inf, np.ones((1, 2, 1, 1)), 2, "fill"),           # more than one value: not a fill scalar
    (0.0, np.array([1.0, np.inf]).reshape(1, 2, 1, 1), 1, "w"),  # an infinite weight read by a Mul
])
def test_other_non_finite_values_are_refused(pad, weight, elems, bad):
    assert nonfinite_tensor(_model(pad, weight, elems)) == bad


def test_an_infinite_scalar_read_as_a_weight_is_refused():
    m = _model(0.0, np.ones((1, 2, 1, 1)))
    w = next(t for t in m.graph.initializer if t.name == "w")
    w.CopyFrom(numpy_helper.from_array(np.array(np.inf, np.float32), "w"))
    assert nonfinite_tensor(m) == "w"
