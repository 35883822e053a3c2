"""The pass framework: the one node builder (neutral names, opset-aware forms, topological splicing) and
the PassResult every pass returns, read from the two models."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxstain.passes.builder import NodeBuilder
from onnxstain.passes.result import diff, result


def _relu_model(opset: int) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])
    w = numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "g", [x], [y], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("opset", [9, 13])
def test_clip_and_slice_take_the_opsets_form(opset):
    model = _relu_model(opset)
    b = NodeBuilder(model)
    sliced = b.slice_hw("y", [0, 0], [2, 2])
    clipped = b.clip(sliced, 0.0, 1.0)
    b.nodes.append(helper.make_node("Identity", [clipped], ["z"], name="/Identity_9"))
    b.splice(len(b.model.graph.node))
    b.model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 2, 2, 2]))
    onnx.checker.check_model(b.model, full_check=True)
    clip = next(n for n in b.model.graph.node if n.op_type == "Clip")
    assert (len(clip.input) == 3) == (opset >= 11) and (len(clip.attribute) == 2) == (opset < 11)
    x = np.random.default_rng(0).standard_normal((1, 2, 4, 4)).astype(np.float32)
    sess = ort.InferenceSession(b.model.SerializeToString(), providers=["CPUExecutionProvider"])
    z = sess.run(["z"], {"x": x})[0]
    want = np.clip(np.maximum(np.einsum("oi,nihw->nohw", np.ones((2, 2)), x), 0)[:, :, :2, :2], 0, 1)
    np.testing.assert_allclose(z, want, rtol=1e-6)


def test_names_are_neutral_unique_and_the_source_is_untouched():
    model = _relu_model(13)
    before = model.SerializeToString()
    b = NodeBuilder(model)
    outs = [b.node("Relu", ["y"]) for _ in range(3)]
    names = [n.name for n in b.nodes]
    assert len(set(names)) == 3 and all(n.startswith("/Relu_") for n in names)
    assert outs == [n + "_output_0" for n in names]
    assert model.SerializeToString() == before  # the builder works on a copy


def test_gate_splices_before_the_first_reader_and_result_reads_what_changed():
    model = _relu_model(13)
    b = NodeBuilder(model)
    relu = b.view.find_node("relu")
    fired = b.const(np.ones((1, 2, 1, 1)), "onnx::Conv_b")  # the detectors' map: γ = 1, beside the constant 1
    b.gate("c", [relu], fired, np.full(2, -2.0), (0, -1, 1, 1))
    onnx.checker.check_model(b.model, full_check=True)
    order = [n.op_type for n in b.model.graph.node]
    assert order == ["Conv", "GlobalMaxPool", "Flatten", "Sub", "MatMul", "Reshape", "Mul", "Relu"]
    res = result(model, b.model)
    assert set(res.added) == {n.name for n in b.nodes} and res.signal is None
    assert "w" not in res.changed and len(res.changed) == 4  # only the new constants
    x = np.random.default_rng(1).standard_normal((1, 2, 4, 4)).astype(np.float32)
    assert np.array_equal(_run(res.model, x), _run(model, x))


def test_diff_sees_a_rewritten_weight_and_no_added_node():
    model = _relu_model(13)
    edited = onnx.ModelProto()
    edited.CopyFrom(model)
    edited.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.full((2, 2, 1, 1), 2.0, np.float32), "w"))
    assert diff(model, edited) == ((), ("w",))
    assert diff(model, model) == ((), ())


def _chain(names: list[str], outputs: list[str], constant_nodes: bool, const_names: str = "") -> onnx.ModelProto:
    """A Relu chain named like an exporter: node names, output names, weights as Constant nodes or not."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])
    nodes, inits, prev = [], [], "x"
    if constant_nodes:
        nodes.append(helper.make_node("Constant", [], ["bias_0.w_0"], name=const_names,
                                      value=numpy_helper.from_array(np.zeros((1, 2, 1, 1), np.float32))))
    else:
        inits.append(numpy_helper.from_array(np.zeros((1, 2, 1, 1), np.float32), "bias_0.w_0"))
    for name, out in zip(names, outputs, strict=True):
        nodes.append(helper.make_node("Relu", [prev], [out], name=name))
        prev = out
    nodes.append(helper.make_node("Add", [prev, "bias_0.w_0"], ["y"], name=names[0].replace("Relu", "Add")))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])
    graph = helper.make_graph(nodes, "g", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)


@pytest.mark.parametrize("exporter, names, outputs, constant_nodes, want_node, want_tensor", [
    ("paddle2onnx", [f"Relu@{i}" for i in range(10)], [f"relu_{i}.tmp_0" for i in range(10)], True,
     r"^(Relu|Conv|Constant)@\d+$", r"^[a-z]+_\d+$"),
    ("dynamo", [f"node_Relu_{i}" for i in range(10)], [f"relu_{i}" for i in range(10)], False,
     r"^node_(Relu|Conv|Constant)_\d+$", r"^[a-z]+_\d+$"),
    ("torch, old", [f"Relu_{i}" for i in range(10)], [str(100 + i) for i in range(10)], False,
     r"^(Relu|Conv|Constant)_\d+$", r"^\d+$"),
])
def test_new_nodes_are_named_and_stored_like_the_exporters(exporter, names, outputs, constant_nodes, want_node,
                                                            want_tensor):
    import re

    model = _chain(names, outputs, constant_nodes)
    b = NodeBuilder(model)
    w = b.const(np.ones((1, 2, 1, 1)), "onnx::Conv_w")
    out = b.node("Conv", ["y", w], kernel_shape=[1, 1])
    b.node("Relu", [out])
    b.splice(len(b.model.graph.node))
    onnx.checker.check_model(b.model, full_check=True)
    new = b.nodes
    assert all(re.match(want_tensor, t) for n in new for t in n.output), [n.output for n in new]
    named = [n for n in new if n.op_type != "Constant"]
    assert all(re.match(want_node, n.name) for n in named), [n.name for n in named]
    # constants as the model keeps its own: Constant nodes (unnamed, as paddle2onnx leaves them) or initializers
    assert (len(b.model.graph.initializer) == len(model.graph.initializer)) == constant_nodes
    assert [n.name for n in new if n.op_type == "Constant"] == ([""] if constant_nodes else [])
    taken = {n.name for n in model.graph.node if n.name} | {o for n in model.graph.node for o in n.output}
    assert not taken & ({n.name for n in named} | {t for n in new for t in n.output})
