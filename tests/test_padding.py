"""``auto_pad`` SAME arithmetic (``onnxstain._onnx.padding``) against onnxruntime's own SAME convolutions."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxstain._onnx.padding import same_onnx_pads, same_pads
from onnxstain.runtime import session


def _conv(size: tuple[int, int], k: int, s: int, d: int, **attrs) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((2, 1, k, k)).astype(np.float32), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[k, k], strides=[s, s], dilations=[d, d], **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, *size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("size, k, s, d", [((7, 10), 3, 2, 1), ((8, 8), 4, 2, 1), ((9, 5), 3, 1, 1),
                                            ((6, 11), 5, 3, 1), ((1, 4), 2, 2, 1)])
@pytest.mark.parametrize("mode", ["SAME_UPPER", "SAME_LOWER"])
def test_explicit_pads_reproduce_auto_pad(size, k, s, d, mode):
    """(onnxruntime refuses SAME with dilation, so the cases are undilated.)"""
    x = np.random.default_rng(1).standard_normal((1, 1, *size)).astype(np.float32)
    want = session(_conv(size, k, s, d, auto_pad=mode)).run(None, {"x": x})[0]
    pads = same_onnx_pads(size, (k, k), (s, s), (d, d), mode == "SAME_UPPER")
    got = session(_conv(size, k, s, d, pads=pads)).run(None, {"x": x})[0]
    assert got.shape == want.shape and got.shape[2:] == tuple(-(-n // s) for n in size)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_odd_pixel_goes_to_the_end_for_upper_and_the_beginning_for_lower():
    for n, k in itertools.product(range(1, 9), range(1, 6)):
        up, low = same_pads([n], [k], [1], [1], True), same_pads([n], [k], [1], [1], False)
        assert up[0][0] + up[1][0] == low[0][0] + low[1][0] == k - 1
        assert up[1][0] - up[0][0] in (0, 1) and low[0][0] - low[1][0] in (0, 1)
