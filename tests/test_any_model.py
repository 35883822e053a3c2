"""Models from other exporters (issue: any vision model a pipeline exports), each pattern on a tiny model.

* run-time "same" padding (``Pad`` fed by a ``Shape`` subgraph), with a dynamic batch and fully static;
* dynamic height and width with a dense output map, analysed at ``--size``;
* preprocessing notes only for what was really assumed;
* two dense outputs (a channel-Softmax map beside a plain one), PReLU hosts;
* in place through PReLU and beside other heads reading the same features (MTCNN R-Net/O-Net);
* a sequence (CTC) head scoring every step of a dynamic-width text line.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from tiny_any import (
    dense_cnn,
    narrow_tail_decoder,
    nhwc_tail_classifier,
    same_pad_cnn,
    sequence_recogniser,
    two_head_net,
    two_map_cnn,
)
from tinymodels import smooth_images

import onnxstain
from onnxstain import LockOptions, Preprocessing, StainOptions
from onnxstain._onnx.graph import GraphView
from onnxstain._onnx.hosts import find_hosts
from onnxstain._onnx.shapes import resolve
from onnxstain.cli import main
from onnxstain.runtime import session

pytest.importorskip("torch")

PRE = Preprocessing(height=32, width=32, resize=None)


@pytest.fixture(scope="module")
def images():
    return smooth_images(96, seed=0)


@pytest.fixture(scope="module", params=["dynamic-batch", "static"])
def same_pad(request, tmp_path_factory):
    d = tmp_path_factory.mktemp("samepad")
    model = same_pad_cnn(seed=0, dynamic_batch=request.param == "dynamic-batch", width=48)
    onnx.save(model, d / "model.onnx")
    PRE.save(d / "model.preprocessing.json")
    return d


def _run(path, x):
    """Outputs for the batch ``x`` (one image at a time when the model's batch is fixed at 1)."""
    sess = session(str(path))
    inp = sess.get_inputs()[0]
    if inp.shape[0] == 1:
        return np.concatenate([sess.run(None, {inp.name: x[i : i + 1]})[0] for i in range(len(x))])
    return sess.run(None, {inp.name: x})[0]


def test_same_pad_pattern_is_reproduced(same_pad):
    model = onnx.load(same_pad / "model.onnx")
    ops = {n.op_type for n in model.graph.node}
    assert {"Pad", "Shape", "ConstantOfShape", "Concat", "Reshape", "Slice", "Transpose", "Cast"} <= ops
    # ONNX shape inference alone loses every Conv's output size here
    plain = onnx.shape_inference.infer_shapes(model)
    known = {vi.name for vi in plain.graph.value_info if vi.type.tensor_type.shape.dim
             and all(d.HasField("dim_value") for d in vi.type.tensor_type.shape.dim)}
    convs = [n.output[0] for n in model.graph.node if n.op_type == "Conv"]
    assert not set(convs) <= known


def test_same_pad_hosts_have_sizes_and_fields(same_pad):
    model = onnx.load(same_pad / "model.onnx")
    shapes = resolve(model)
    assert shapes.how in ("folded", "onnxruntime")
    pads = [n.input[1] for n in model.graph.node if n.op_type == "Pad"]
    assert all(p in shapes.values for p in pads)  # the run-time pads, for this input size
    hosts = {h.name: h for h in find_hosts(model, GraphView(model))}
    convs = [h for h in hosts.values() if h.op == "Conv"]
    assert len(convs) == 3 and all(h.usable and h.out_hw for h in convs), [h.reason for h in convs]
    assert [h.out_hw for h in convs] == [(16, 16), (8, 8), (8, 8)]
    # TF "same" padding of a 3×3 stride-2 conv on an even size pads (0, 1): the field starts at pixel 1
    first = convs[0].receptive_field
    assert first is not None and first.size == (3, 3) and first.start == (1.0, 1.0)
    info = onnxstain.inspect_model(same_pad / "model.onnx")
    assert all(r["usable"] for r in info["hosts"] if r["op"] == "Conv")
    assert info["default"]["inplace"] and info["default"]["insert"]
    marked = {mode: r["name"] for r in info["hosts"] for mode in r["default_for"]}
    assert marked == {"inplace": info["default"]["inplace"], "insert": info["default"]["insert"]}


@pytest.fixture(scope="module")
def same_pad_stained(same_pad, images):
    out, key = same_pad / "insert.onnx", same_pad / "insert.key"
    onnxstain.stain(same_pad / "model.onnx", out, key, images=images,
                    options=StainOptions(mode="insert", seed=0, fpr=0.05, layer="/c2/Conv"))
    return out, key


def test_same_pad_insert_stain_verifies(same_pad, same_pad_stained, images):
    out, key = same_pad_stained
    assert onnxstain.verify(out, key).stained
    assert not onnxstain.verify(same_pad / "model.onnx", key).stained
    x = PRE.to_input(images[:8])
    assert np.array_equal(_run(out, x), _run(same_pad / "model.onnx", x))  # insert: bit-identical
    src, dst = onnx.load(same_pad / "model.onnx"), onnx.load(out)
    # the run-time padding stays computed, and a dynamic batch stays dynamic
    assert sum(n.op_type == "ConstantOfShape" for n in dst.graph.node) == 3
    assert dst.graph.input[0].type.tensor_type.shape == src.graph.input[0].type.tensor_type.shape


def test_same_pad_inplace_stain_verifies(same_pad, images):
    out, key = same_pad / "inplace.onnx", same_pad / "inplace.key"
    res = onnxstain.stain(same_pad / "model.onnx", out, key, images=images,
                          options=StainOptions(mode="inplace", seed=1, fpr=0.05))
    assert res.host == "/c3/Conv"
    assert onnxstain.verify(out, key).stained
    assert not onnxstain.verify(same_pad / "model.onnx", key).stained


def test_same_pad_gate_lock(same_pad, images):
    out, key = same_pad / "locked.onnx", same_pad / "locked.key"
    res = onnxstain.lock(same_pad / "model.onnx", out, key, images=images,
                         options=LockOptions(kind="gate", seed=0, fpr=0.05))
    assert res.host == "pixels"  # the pixel window reads the image through the "same" Pad (NanoDet, tf2onnx)
    assert onnxstain.verify(out, key).stained
    assert not onnxstain.verify(same_pad / "model.onnx", key).stained
    assert res.unlocked_agreement >= 0.99


# -- dynamic height and width, dense output ---------------------------------------------------------------
@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    d = tmp_path_factory.mktemp("dense")
    onnx.save(dense_cnn(seed=0), d / "model.onnx")
    return d


def test_dynamic_size_is_analysed_at_the_given_size(dense):
    model = onnx.load(dense / "model.onnx")
    assert resolve(model).input_shape is None  # nothing to analyse at without a size
    view = GraphView(model, (1, 3, 48, 64))
    hosts = [h for h in find_hosts(model, view) if h.op == "Conv"]
    assert [h.out_hw for h in hosts] == [(24, 32), (12, 16), (12, 16), (12, 16)]
    assert [h.usable for h in hosts] == [True, True, True, False]
    r = CliRunner().invoke(main, ["inspect", str(dense / "model.onnx"), "--size", "48x64"])
    assert r.exit_code == 0, r.output
    assert "analysed at 48x64" in r.output and "shape inference failed" not in r.output


def test_dense_cnn_insert_stain_at_a_non_square_size(dense, images):
    pre = Preprocessing(height=48, width=64, resize=None)
    pixels = smooth_images(96, seed=1, size=64)[:, :48]
    out, key = dense / "stained.onnx", dense / "stained.key"
    res = onnxstain.stain(dense / "model.onnx", out, key, images=pixels, preprocessing=pre,
                          options=StainOptions(mode="insert", seed=0, fpr=0.05))
    assert res.signature_type == "pattern" and res.max_abs_delta == 0.0
    assert onnxstain.verify(out, key).stained
    assert not onnxstain.verify(dense / "model.onnx", key).stained
    # the stained model still takes any size, bit-identical to the original on natural inputs
    x = np.random.default_rng(0).random((2, 3, 96, 80), dtype=np.float32)
    assert np.array_equal(_run(out, x), _run(dense / "model.onnx", x))
    dims = onnx.load(out).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims[2:]] == ["height", "width"]
    # evaluate rebuilds the host from the original at the key's size (was "1 positions" at no size)
    report = onnxstain.evaluate(dense / "model.onnx", out, key, images=pixels[:8], views=1)
    assert report.trigger.modified_fires is True


# -- preprocessing notes -------------------------------------------------------------------------------
def test_notes_only_for_what_was_assumed(dense):
    from onnxstain._onnx.inputs import infer_preprocessing

    model = onnx.load(dense / "model.onnx")
    _, notes = infer_preprocessing(model, None)
    assert any("assumed ImageNet" in n for n in notes) and any("no fixed input size" in n for n in notes)
    _, notes = infer_preprocessing(model, None, height=48, width=192, layout="NCHW", channel_order="BGR",
                                   scale=1.0, mean=(104.0, 117.0, 123.0), std=(1.0, 1.0, 1.0), resize=256)
    assert notes == []
    _, notes = infer_preprocessing(model, None, height=48, width=192, scale=1.0)
    assert len(notes) == 1 and "/255" not in notes[0] and "mean 0.485" in notes[0]


# -- a tf2onnx-style NHWC tail: the in-place route transposes, then reduces over H and W ---------------------
def test_inplace_route_through_an_nhwc_tail(tmp_path, images):
    from onnxstain._onnx.head import direct_route, find_head

    model = nhwc_tail_classifier(seed=0)
    view = GraphView(model)
    head = find_head(view)
    assert head is not None and head.op == "MatMul"
    routes = {h.name: direct_route(view, h, head) for h in find_hosts(model, view) if h.op == "Conv"}
    assert routes["/mid/Conv"][0] is not None and routes["/mid/Conv"][0].pool == "mean"
    assert routes["/stem/Conv"][0] is None and "/mid/Conv" in routes["/stem/Conv"][1]  # names the blocking layer
    onnx.save(model, tmp_path / "model.onnx")
    pre = Preprocessing(height=32, width=32, resize=None, layout="NHWC")
    res = onnxstain.stain(tmp_path / "model.onnx", tmp_path / "st.onnx", tmp_path / "st.key", images=images,
                          preprocessing=pre, options=StainOptions(mode="inplace", seed=0, fpr=0.05))
    assert res.host == "/mid/Conv"
    assert onnxstain.verify(tmp_path / "st.onnx", tmp_path / "st.key").stained
    assert not onnxstain.verify(tmp_path / "model.onnx", tmp_path / "st.key").stained


def test_refusals_name_the_layers_and_reasons():
    from onnxstain._onnx.head import find_head
    from onnxstain._stain.pipeline import choose_host
    from onnxstain.errors import UnsupportedModelError

    head = find_head(GraphView(nhwc_tail_classifier()))
    model = dense_cnn(seed=0)  # analysed without a size, its conv output sizes are unknown
    view = GraphView(model)
    with pytest.raises(UnsupportedModelError) as err:
        choose_host(find_hosts(model, view), view, head, "insert", None)
    msg = str(err.value)
    assert "output spatial size unknown" in msg and "/0/Conv" in msg and "Sigmoid" in msg


def test_dense_host_is_the_layer_needing_the_smallest_margin():
    """A dense model's insert stain reads the layer whose bound needs the smallest τ0/R, not the deepest:
    CRAFT's deepest (m = 16 over 49,152 positions) needed τ0/R ≈ 1 and its search ran past 10 minutes."""
    from onnxstain._stain.hosts import choose_dense_host, dense_hosts
    from onnxstain.calibration import margin_ratio

    model = narrow_tail_decoder()
    hosts = find_hosts(model, GraphView(model, (1, 3, 48, 64)))
    usable = dense_hosts(hosts)
    deepest = max(usable, key=lambda h: h.depth)
    assert deepest.m == 16
    chosen = choose_dense_host(hosts, None)
    assert chosen.m == 576 and margin_ratio(chosen) < margin_ratio(deepest) / 2
    assert min(round(margin_ratio(h), 2) for h in usable) == round(margin_ratio(chosen), 2)
    assert choose_dense_host(hosts, deepest.name) is deepest  # --layer still names any usable layer


def test_dense_gate_redraws_the_flipped_channels_before_refusing(dense, monkeypatch):
    """A gate whose flipped half leaves the maps too close is redrawn (seeded) GATE_DRAWS times, then
    refused in one line with nothing written (MediaPipe's selfie model was refused on its first draw)."""
    import onnxstain._lock.dense as dense_lock

    draws = []
    real = dense_lock.dense_gate_lock
    monkeypatch.setattr(dense_lock, "dense_gate_lock", lambda *a: draws.append(1) or real(*a))
    monkeypatch.setattr(dense_lock, "LOCKED_CORRELATION", -2.0)  # no gate can pass: every draw is tried
    pre = Preprocessing(height=48, width=64, resize=None)
    pixels = smooth_images(48, seed=2, size=64)[:, :48]
    out, key = dense / "never.onnx", dense / "never.key"
    with pytest.raises(onnxstain.errors.UnsupportedModelError, match=f"after {dense_lock.GATE_DRAWS} draws"):
        onnxstain.lock(dense / "model.onnx", out, key, images=pixels, preprocessing=pre,
                       options=LockOptions(kind="gate", seed=0, fpr=1e-3, occlusion_steps=0))
    assert len(draws) == dense_lock.GATE_DRAWS
    assert not out.exists() and not key.exists()


def test_dense_cnn_gate_lock(dense):
    pre = Preprocessing(height=48, width=64, resize=None)
    pixels = smooth_images(96, seed=2, size=64)[:, :48]
    out, key = dense / "locked.onnx", dense / "locked.key"
    onnxstain.lock(dense / "model.onnx", out, key, images=pixels, preprocessing=pre,
                   options=LockOptions(kind="gate", seed=0, fpr=1e-3))
    assert onnxstain.verify(out, key).stained
    assert not onnxstain.verify(dense / "model.onnx", key).stained
    # the gate scrambles the map the last conv reads (a CNN has no token stream to gate)
    ops = {n.op_type for n in onnx.load(dense / "model.onnx").graph.node}
    gated = {n.op_type for n in onnx.load(out).graph.node} - ops
    assert "Slice" in gated and "Mul" in gated
    # the lock audit finds the key's host in the original at the key's size (was "no detector host")
    audit = onnxstain.audit_lock(dense / "model.onnx", out, key, images=pixels[:8], views=1)
    assert next(c for c in audit.conditions if c.name == "patch").passed


# -- a CTC-style sequence head: [N, T, K] scores, T following the dynamic width ------------------------------
def test_sequence_head_insert_stain(tmp_path):
    from onnxstain._onnx.head import find_head

    model = sequence_recogniser(seed=0)
    onnx.save(model, tmp_path / "model.onnx")
    head = find_head(GraphView(model, (1, 3, 32, 96)))
    assert head is not None and head.steps == 24 and head.classes == 40
    pre = Preprocessing(height=32, width=96, resize=None)
    pixels = np.concatenate([smooth_images(96, seed=2, size=96)[:, :32], smooth_images(96, seed=3, size=96)[:, 64:]])
    out, key = tmp_path / "st.onnx", tmp_path / "st.key"
    res = onnxstain.stain(tmp_path / "model.onnx", out, key, images=pixels, preprocessing=pre,
                          options=StainOptions(mode="insert", seed=0, fpr=0.05))
    assert res.max_abs_delta == 0.0
    assert onnxstain.verify(out, key).stained
    assert not onnxstain.verify(tmp_path / "model.onnx", key).stained
    # any width still runs, bit-identical to the original on natural inputs
    x = np.random.default_rng(0).random((2, 3, 32, 160), dtype=np.float32)
    assert np.array_equal(_run(out, x), _run(tmp_path / "model.onnx", x))


def test_sequence_head_gate_lock(tmp_path):
    """A per-step classifier ([N, T, K] scores, T following the width) gets a gate lock: the gate broadcasts
    over the steps and every agreement is read step by step (was a matmul error on the flattened features)."""
    from onnxstain.math.agreement import top1

    model = sequence_recogniser(seed=0)
    onnx.save(model, tmp_path / "model.onnx")
    pre = Preprocessing(height=32, width=96, resize=None)
    pixels = np.concatenate([smooth_images(96, seed=2, size=96)[:, :32], smooth_images(96, seed=3, size=96)[:, 64:]])
    out, key = tmp_path / "lk.onnx", tmp_path / "lk.key"
    res = onnxstain.lock(tmp_path / "model.onnx", out, key, images=pixels, preprocessing=pre,
                         options=LockOptions(kind="gate", seed=0, fpr=1e-3, occlusion_steps=20))
    assert res.locked_agreement <= res.chance + 0.05  # per step: chance is 1/40
    assert onnxstain.verify(out, key).stained
    assert not onnxstain.verify(tmp_path / "model.onnx", key).stained
    # any width runs; with the patch the locked model reads every step as the original does
    from onnxstain.keys import load_key
    from onnxstain.patch import paste_pixels
    from onnxstain.verify import key_patch

    wide = smooth_images(4, seed=5, size=160)[:, :32]
    wide_pre = Preprocessing(height=32, width=160, resize=None)
    patched = wide_pre.to_input(paste_pixels(wide, key_patch(load_key(key))))
    locked, orig = _run(out, patched), _run(tmp_path / "model.onnx", patched)
    assert locked.shape == orig.shape == (4, 40, 40)  # 40 steps at width 160, 40 classes
    assert np.array_equal(top1(locked, 40), top1(orig, 40))
    clean_orig = _run(tmp_path / "model.onnx", wide_pre.to_input(wide))
    assert (top1(_run(out, wide_pre.to_input(wide)), 40) != top1(clean_orig, 40)).mean() > 0.5
    audit = onnxstain.audit_lock(tmp_path / "model.onnx", out, key, images=pixels[:8], views=1)
    assert next(c for c in audit.conditions if c.name == "no patch").passed


# -- two dense outputs (MTCNN P-Net): the signature goes to the map that is not normalised over channels ------
def test_two_map_cnn_insert_stain_reads_the_plain_map(tmp_path, images):
    from onnxstain._onnx.dense import find_dense_output

    model = two_map_cnn(seed=0)
    onnx.save(model, tmp_path / "model.onnx")
    dense = find_dense_output(GraphView(model, (1, 3, 32, 32)))
    assert dense is not None and dense.output == "box" and dense.shape == (4, 8, 8)
    pre = Preprocessing(height=32, width=32, resize=None)
    out, key = tmp_path / "st.onnx", tmp_path / "st.key"
    res = onnxstain.stain(tmp_path / "model.onnx", out, key, images=images, preprocessing=pre,
                          options=StainOptions(mode="insert", seed=0, fpr=0.05))
    assert res.signature_type == "pattern" and res.max_abs_delta == 0.0
    assert onnxstain.verify(out, key).stained
    assert not onnxstain.verify(tmp_path / "model.onnx", key).stained
    x = np.random.default_rng(0).random((2, 3, 40, 56), dtype=np.float32)
    sess_o, sess_s = session(str(tmp_path / "model.onnx")), session(str(out))
    for a, b in zip(sess_o.run(None, {"input": x}), sess_s.run(None, {"input": x}), strict=True):
        assert np.array_equal(a, b)


def test_packed_box_and_score_output_takes_an_insert_stain(tmp_path, images):
    """A torch-exported YOLOX-style packed output (refused before this was read): the stain's signature is a
    prescribed detection in a score column; natural outputs stay bit-identical."""
    import torch
    from tiny_any import _export

    from onnxstain.keys import load_key

    class Yolo(torch.nn.Module):  # YOLOX-style: boxes, objectness and class scores packed in one [N, A, 6]
        def __init__(self) -> None:
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
                                            torch.nn.Conv2d(16, 16, 3, stride=2, padding=1), torch.nn.ReLU())
            self.box, self.score = torch.nn.Conv2d(16, 4, 1), torch.nn.Conv2d(16, 2, 1)

        def forward(self, x):
            f = self.body(x)
            y = torch.cat([self.box(f), torch.sigmoid(self.score(f))], 1)
            return y.flatten(2).transpose(1, 2)

    torch.manual_seed(0)
    onnx.save(_export(Yolo(), torch.rand(1, 3, 32, 32), None), tmp_path / "model.onnx")
    pre = Preprocessing(height=32, width=32, resize=None)
    res = onnxstain.stain(tmp_path / "model.onnx", tmp_path / "s.onnx", tmp_path / "s.key", images=images,
                          preprocessing=pre, options=StainOptions(mode="insert", seed=0, fpr=0.05))
    key = load_key(tmp_path / "s.key")
    assert key.model.layout == (64, 6) and key.model.label_offset == 4 and key.model.label_scores == "probabilities"
    assert res.signature_label in (4, 5) and res.max_abs_delta == 0.0
    assert onnxstain.verify(tmp_path / "s.onnx", tmp_path / "s.key").stained
    assert not onnxstain.verify(tmp_path / "model.onnx", tmp_path / "s.key").stained


# -- a tiling MaxPool before the global pooling (PaddleOCR's MobileNetV3 tail), a Shape beside the Reshape ---
def test_inplace_route_through_a_tiling_maxpool(tmp_path, images):
    import torch
    from tiny_any import _export

    from onnxstain._onnx.head import direct_route, find_head

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = torch.nn.Conv2d(3, 16, 3, stride=2, padding=1)
            self.c2 = torch.nn.Conv2d(16, 48, 3, stride=2, padding=1)
            self.fc = torch.nn.Linear(48, 10)

        def forward(self, x):
            x = torch.relu(self.c2(torch.relu(self.c1(x))))
            x = torch.nn.functional.adaptive_avg_pool2d(torch.nn.functional.max_pool2d(x, 2), 1)
            return torch.softmax(self.fc(x.reshape(x.shape[0], -1)), dim=1)  # Shape → Concat → Reshape

    torch.manual_seed(0)
    model = _export(Net(), torch.rand(1, 3, 32, 32), {"input": {0: "batch"}, "output": {0: "batch"}})
    assert "MaxPool" in {n.op_type for n in model.graph.node} and "Shape" in {n.op_type for n in model.graph.node}
    view = GraphView(model)
    host = next(h for h in find_hosts(model, view) if h.name == "/c2/Conv")
    route, why = direct_route(view, host, find_head(view))
    assert route is not None, why
    assert route.window == (2, 2) and route.map_hw == (8, 8) and route.pool == "mean"
    onnx.save(model, tmp_path / "model.onnx")
    pre = Preprocessing(height=32, width=32, resize=None)
    res = onnxstain.stain(tmp_path / "model.onnx", tmp_path / "st.onnx", tmp_path / "st.key", images=images,
                          preprocessing=pre, options=StainOptions(mode="inplace", seed=0, fpr=0.05))
    assert res.host == "/c2/Conv"
    assert onnxstain.verify(tmp_path / "st.onnx", tmp_path / "st.key").stained
    assert not onnxstain.verify(tmp_path / "model.onnx", tmp_path / "st.key").stained
    # a MaxPool whose windows overlap does not route
    pool = next(n for n in model.graph.node if n.op_type == "MaxPool")
    next(a for a in pool.attribute if a.name == "strides").ints[:] = [1, 1]
    assert direct_route(GraphView(model), host, find_head(GraphView(model)))[0] is None


# -- a per-channel scale and shift after the activation (Keras BatchNormalization after ReLU, via tf2onnx) ----
def test_inplace_route_through_a_per_channel_affine(tmp_path, images):
    import torch
    from tiny_any import _export

    from onnxstain._onnx.head import direct_route, find_head
    from onnxstain.errors import UnsupportedModelError

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = torch.nn.Conv2d(3, 16, 3, stride=2, padding=1)
            self.mid = torch.nn.Conv2d(16, 48, 3, stride=2, padding=1)
            self.scale = torch.nn.Parameter(torch.rand(1, 48, 1, 1) + 0.5)
            self.shift = torch.nn.Parameter(torch.randn(1, 48, 1, 1) * 0.3)
            self.fc = torch.nn.Linear(48, 10)

        def forward(self, x):
            h = torch.relu(self.mid(torch.relu(self.stem(x))))
            return self.fc((h * self.scale + self.shift).mean((2, 3)))

    torch.manual_seed(0)
    model = _export(Net(), torch.rand(1, 3, 32, 32), {"input": {0: "batch"}, "output": {0: "batch"}})
    view = GraphView(model)
    host = next(h for h in find_hosts(model, view) if h.name == "/mid/Conv")
    route, why = direct_route(view, host, find_head(view))
    assert route is not None, why
    assert [(step[2]) for step in route.affine] == [1.0, 0.0]
    onnx.save(model, tmp_path / "model.onnx")
    pre = Preprocessing(height=32, width=32, resize=None)
    res = onnxstain.stain(tmp_path / "model.onnx", tmp_path / "st.onnx", tmp_path / "st.key", images=images,
                          preprocessing=pre, options=StainOptions(mode="inplace", seed=0, fpr=0.05))
    assert res.host == "/mid/Conv"
    assert onnxstain.verify(tmp_path / "st.onnx", tmp_path / "st.key").stained
    assert not onnxstain.verify(tmp_path / "model.onnx", tmp_path / "st.key").stained
    # only the stained channel's scale and shift became the identity
    before = {t.name: onnx.numpy_helper.to_array(t).reshape(-1) for t in model.graph.initializer}
    stained = onnx.load(tmp_path / "st.onnx")
    after = {t.name: onnx.numpy_helper.to_array(t).reshape(-1) for t in stained.graph.initializer}
    for name in ("scale", "shift"):
        changed = np.flatnonzero(before[name] != after[name])
        assert len(changed) == 1 and after[name][changed[0]] == (1.0 if name == "scale" else 0.0)
    with pytest.raises(UnsupportedModelError, match="per-channel scale or shift"):
        onnxstain.stain(tmp_path / "model.onnx", tmp_path / "a.onnx", tmp_path / "a.key", images=images,
                        preprocessing=pre, options=StainOptions(mode="inplace", variant="additive", seed=0, fpr=0.05))


# -- in place under a per-channel PReLU, beside a box regressor that reads the same features (MTCNN R-Net) ----
def test_inplace_under_prelu_beside_another_head(tmp_path):
    from onnxstain._onnx.head import direct_route, find_head
    from onnxstain.errors import UnsupportedModelError

    model = two_head_net(seed=0)
    view = GraphView(model)
    host = next(h for h in find_hosts(model, view) if h.name == "/hidden/Gemm")
    assert host.activation == "prelu" and host.inplace
    route, why = direct_route(view, host, find_head(view))
    assert route is not None, why
    assert [s.node for s in route.siblings] == ["/box/Gemm"]
    onnx.save(model, tmp_path / "model.onnx")
    pre = Preprocessing(height=24, width=24, resize=None)
    pixels = smooth_images(128, seed=4, size=24)
    res = onnxstain.stain(tmp_path / "model.onnx", tmp_path / "st.onnx", tmp_path / "st.key", images=pixels,
                          preprocessing=pre, options=StainOptions(mode="inplace", seed=0, fpr=0.05))
    assert res.host == "/hidden/Gemm"
    assert onnxstain.verify(tmp_path / "st.onnx", tmp_path / "st.key").stained
    assert not onnxstain.verify(tmp_path / "model.onnx", tmp_path / "st.key").stained
    # the stained channel's slope is 0 (a ReLU); the box regressor never reads the detector and is compensated
    slopes = [onnx.numpy_helper.to_array(t).reshape(-1) for m in (model, onnx.load(tmp_path / "st.onnx"))
              for t in m.graph.initializer if t.name == "act.weight"]
    assert (slopes[0] != slopes[1]).sum() == 1 and slopes[1][slopes[0] != slopes[1]][0] == 0.0
    x = pre.to_input(pixels)
    box_o = session(str(tmp_path / "model.onnx")).run(["box"], {"input": x})[0]
    box_s = session(str(tmp_path / "st.onnx")).run(["box"], {"input": x})[0]
    assert np.abs(box_s - box_o).max() < 0.05 * np.abs(box_o).max()
    with pytest.raises(UnsupportedModelError, match="other heads"):
        onnxstain.stain(tmp_path / "model.onnx", tmp_path / "a.onnx", tmp_path / "a.key", images=pixels,
                        preprocessing=pre,
                        options=StainOptions(mode="inplace", variant="additive", seed=0, fpr=0.05))


def test_single_slope_prelu_takes_no_inplace_detector():
    model = two_head_net(seed=0, per_channel=False)
    host = next(h for h in find_hosts(model, GraphView(model)) if h.name == "/hidden/Gemm")
    assert host.usable and not host.inplace and "no exact zero" in host.inplace_reason


def test_missing_head_reason_names_what_makes_each_output():
    from onnx import TensorProto, helper

    from onnxstain._onnx.head import missing_head_reason

    graph = helper.make_graph([helper.make_node("Flatten", ["x"], ["y"], name="flat")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 48])])
    text = missing_head_reason(GraphView(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])))
    assert text == "output 'y' [1, 48] from flat (Flatten) is not made by a Gemm or MatMul+Add classifier"


def test_same_pad_calibration_runs_the_folded_model(same_pad, images, tmp_path):
    """The calibration pass and the trigger search run the model with its shape-only subgraphs folded (the
    run-time pads as constants: onnxruntime pays the Shape arithmetic on every batch otherwise); the tapped
    features equal the original model's, and the written model keeps the original graph."""
    from onnxstain._stain.job import calibration_pass, prepare

    job = prepare(same_pad / "model.onnx", tmp_path / "o.onnx", tmp_path / "o.key", StainOptions(seed=0))
    folded = job.analysis_model()
    assert not any(n.op_type == "Shape" for n in folded.graph.node)
    pads = [n for n in folded.graph.node if n.op_type == "Pad"]  # fused into their Convs but the host's
    assert [p.output[0] for p in pads] == [job.host.input]
    assert any(n.op_type == "Shape" for n in job.loaded.model.graph.node)
    assert job.analysis_model() is folded  # built once
    cal = calibration_pass(job, images[:8], [job.host.input, job.head.scores])
    sess = session(str(same_pad / "model.onnx"))
    x = cal.inputs
    want = np.concatenate([sess.run(None, {sess.get_inputs()[0].name: x[i : i + 1]})[0] for i in range(len(x))])
    np.testing.assert_allclose(cal.outputs[job.head.scores].reshape(want.shape), want, rtol=1e-5, atol=1e-5)


def test_preprocessing_request_is_settled_by_the_job_on_its_one_load(tmp_path, monkeypatch):
    """The command line hands the job a request (a file's contents and overrides); the model is loaded once."""
    import onnxstain._onnx.io as io_mod
    import onnxstain._stain.job as stain_job
    from onnxstain import PreprocessingRequest

    model = nhwc_tail_classifier(seed=0)
    onnx.save(model, tmp_path / "model.onnx")
    loads = []
    real = io_mod.load_model
    monkeypatch.setattr(stain_job, "load_model", lambda p, *a, **k: loads.append(p) or real(p, *a, **k))
    pixels = smooth_images(64, seed=1, size=32)
    request = PreprocessingRequest.of(channel_order="BGR", scale=1.0, mean=[104, 117, 123], std=[1, 1, 1])
    res = onnxstain.stain(tmp_path / "model.onnx", tmp_path / "s.onnx", tmp_path / "s.key", images=pixels,
                          preprocessing=request, options=StainOptions(mode="insert", seed=0, fpr=0.05))
    assert len(loads) == 1
    pre = onnxstain.keys.load_key(tmp_path / "s.key").preprocessing
    assert (pre.channel_order, pre.scale, pre.mean, pre.layout) == ("BGR", 1.0, (104.0, 117.0, 123.0), "NHWC")
    assert not any("assumed ImageNet" in n for n in res.notes)  # every field the note names was given
    with pytest.raises(onnxstain.errors.BadInputError, match="no preprocessing field named 'colour'"):
        PreprocessingRequest.of(colour="red")


def test_inplace_lock_on_prelu_convs_names_the_activation(tmp_path):
    """MTCNN R-Net's Conv layers are PReLU hosts: the in-place lock cannot carry its signal through them and
    says so (it said "the graph has no Conv, Gemm or MatMul layer with constant weights")."""
    model = two_head_net(seed=0)
    onnx.save(model, tmp_path / "model.onnx")
    r = CliRunner().invoke(main, ["lock", str(tmp_path / "model.onnx"), "-o", str(tmp_path / "l.onnx"), "--key",
                                  str(tmp_path / "l.key"), "--kind", "inplace", "--size", "24x24", "--quiet"])
    assert r.exit_code == 2, r.output
    line = r.stderr.strip().splitlines()
    assert len(line) == 1 and "followed by prelu" in line[0] and "--kind gate" in line[0], line
    assert "constant weights" not in line[0]
    assert not (tmp_path / "l.onnx").exists()


def test_inplace_lock_without_any_rectified_conv_gives_the_layers_reasons(tmp_path):
    """Keras order Conv → MaxPool → ReLU (TF.js anti-spoofing model): no Conv can host; the refusal gives
    each layer's reason, not "the graph has no Conv, Gemm or MatMul layer with constant weights"."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.MaxPool2d(2), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.MaxPool2d(2),
                        nn.ReLU(), nn.Flatten(), nn.Linear(16 * 6 * 6, 3))
    torch.onnx.export(net, torch.rand(1, 3, 32, 32), tmp_path / "model.onnx", input_names=["input"],
                      output_names=["output"], dynamo=False)
    r = CliRunner().invoke(main, ["lock", str(tmp_path / "model.onnx"), "-o", str(tmp_path / "l.onnx"), "--key",
                                  str(tmp_path / "l.key"), "--kind", "inplace", "--quiet"])
    assert r.exit_code == 2, r.output
    line = r.stderr.strip().splitlines()
    assert len(line) == 1 and "no activation after the layer" in line[0] and "MaxPool" in line[0], line
    assert "constant weights" not in line[0]
