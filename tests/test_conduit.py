"""Conduit (in-place) lock pass: structure, exactness with onnxruntime, γ, channel choice, refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from tiny_mobilenet import DEAD, MOBILE_HOST, PLAIN_HOST, plain_cnn, tiny_mobilenet

from onnxstain import runtime
from onnxstain._onnx.graph import GraphView
from onnxstain._onnx.head import find_head
from onnxstain._onnx.hosts import HostLayer, get_host
from onnxstain.errors import UnsupportedModelError
from onnxstain.features import neuron_inputs
from onnxstain.passes.conduit import (
    ConduitPlan,
    apply_conduit,
    conduit_taps,
    plan_conduit,
    prepare_conduit,
)

MOBILENET = Path(__file__).resolve().parent.parent / ".cache" / "models" / "mobilenet_v2" / "mobilenet_v2.onnx"


# -- helpers ---------------------------------------------------------------------------------------
def run(model: onnx.ModelProto, x: np.ndarray, taps: list[str] | tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    out = model.graph.output[0].name
    names = [out, *[t for t in dict.fromkeys(taps) if t != out]]
    sess = runtime.session(runtime.with_outputs(model, names), providers=["cpu"], threads=1)
    res = sess.run(names, {model.graph.input[0].name: x})
    return dict(zip(names, res, strict=True)) | {"scores": res[0]}


def smooth_images(n: int, size: int, seed: int) -> np.ndarray:
    """Natural-like images: low-frequency noise (bilinear from a 4×4 grid) plus a little grain."""
    rng = np.random.default_rng(seed)
    low = rng.normal(0, 1, (n, 3, 4, 4))
    t = np.linspace(0, 3, size)
    i0 = np.minimum(t.astype(int), 2)
    f = t - i0
    rows = low[:, :, i0] * (1 - f)[None, None, :, None] + low[:, :, i0 + 1] * f[None, None, :, None]
    img = rows[..., i0] * (1 - f) + rows[..., i0 + 1] * f
    return (img + rng.normal(0, 0.05, img.shape)).astype(np.float32)


def patched(images: np.ndarray, host: HostLayer, position: tuple[int, int], seed: int = 7) -> np.ndarray:
    """Paste a fixed high-contrast pattern over the receptive field of the host position."""
    size = images.shape[-1]
    top, left, bottom, right = host.receptive_field.box(*position, size, size)
    rng = np.random.default_rng(seed)
    pattern = rng.choice([-2.5, 2.5], (3, bottom - top + 1, right - left + 1))
    out = images.copy()
    out[:, :, top:bottom + 1, left:right + 1] = pattern
    return out


def make_detector(prepared: onnx.ModelProto, host: HostLayer, position: tuple[int, int], on: np.ndarray,
                  off: np.ndarray, value: float = 6.5) -> tuple[np.ndarray, float]:
    """A detector row reading the prepared model's host input: ``value`` at the position on the patched
    images ``on``, < 0 at their other positions and everywhere on the natural images ``off``."""
    x = run(prepared, np.concatenate([on, off]), [host.input])[host.input]
    phi = neuron_inputs(host, x).astype(np.float64)  # [N, P, m]
    idx = position[0] * host.out_hw[1] + position[1]
    phi_on = phi[: len(on), idx]
    others = np.concatenate([np.delete(phi[: len(on)], idx, axis=1).reshape(-1, host.m),
                             phi[len(on):].reshape(-1, host.m)])
    u = phi_on.mean(0) - others.mean(0)
    u /= np.linalg.norm(u)
    s_on, s_off = (phi_on @ u).min(), (others @ u).max()
    assert s_on > s_off + 1e-3, "test set-up: the patch is not separable at the host"
    mid = (s_on + s_off) / 2
    alpha = value / (s_on - mid)
    return (alpha * u).reshape(host.in_channels // host.groups, *host.kernel), float(-alpha * mid)


def assert_same_structure(a: onnx.ModelProto, b: onnx.ModelProto) -> None:
    assert len(a.graph.node) == len(b.graph.node)
    for na, nb in zip(a.graph.node, b.graph.node, strict=True):
        assert (na.op_type, na.name, list(na.input), list(na.output)) == (nb.op_type, nb.name, list(nb.input),
                                                                           list(nb.output))
        assert na.attribute == nb.attribute
    assert [(t.name, list(t.dims), t.data_type) for t in a.graph.initializer] == [
        (t.name, list(t.dims), t.data_type) for t in b.graph.initializer]
    assert a.graph.input == b.graph.input and a.graph.output == b.graph.output


def effective_bias(model: onnx.ModelProto) -> np.ndarray:
    view = GraphView(model)
    head = find_head(view)
    return view.array(head.bias).astype(np.float64) * head.beta


def activity(model: onnx.ModelProto, taps: list[str], images: np.ndarray) -> dict[str, np.ndarray]:
    res = run(model, images, taps)
    return {t: np.abs(res[t]).mean(axis=tuple(i for i in range(res[t].ndim) if i != 1)) for t in taps}


def setup(model: onnx.ModelProto, host_name: str, position: tuple[int, int], **plan_kw):
    view = GraphView(model)
    head = find_head(view)
    host = get_host(model, host_name, view)
    assert head is not None and host is not None
    plan = plan_conduit(model, host, position, head, **plan_kw)
    return host, head, plan


def check_lock(model: onnx.ModelProto, host: HostLayer, plan: ConduitPlan, position: tuple[int, int],
               signal: float | None = None, n: int = 12) -> dict[str, float]:
    """Build a detector, lock, and check exactness against the prepared (unlocked) reference."""
    before = model.SerializeToString()
    natural = smooth_images(n, 32, seed=3)
    on = patched(smooth_images(n, 32, seed=4), host, position)
    prepared = prepare_conduit(model, plan).model
    w, b = make_detector(prepared, host, position, on, natural)
    b_orig = effective_bias(model)
    rng = np.random.default_rng(11)
    u = rng.normal(size=b_orig.size)
    b_lock = b_orig + 25.0 * u / np.linalg.norm(u) * np.sqrt(b_orig.size)
    lock = apply_conduit(model, plan, w, b, b_lock, signal=signal)
    if signal is not None:  # unbounded host: calibrate the detector's value by a forward pass
        act = run(lock.model, on[:1], [host.act_output])[host.act_output]
        lock = apply_conduit(model, plan, w, b, b_lock, signal=float(act[0, plan.detector_channel, *position]))
    assert model.SerializeToString() == before, "the input model was modified"
    assert_same_structure(model, lock.model)
    assert_same_structure(model, prepared)
    assert np.allclose(effective_bias(lock.model), b_lock, rtol=1e-6, atol=1e-5)

    feat = find_head(GraphView(model)).node
    head_in = next(nd.input[0] for nd in model.graph.node if nd.name == feat)
    lane_taps = [t for lane in plan.lanes for t in lane.tensors + lane.cleared]
    ref_nat, ref_on = run(prepared, natural)["scores"], run(prepared, on)["scores"]
    got_nat = run(lock.model, natural, [head_in, *lane_taps])
    got_on = run(lock.model, on, [head_in, *lane_taps])
    orig_nat, orig_on = run(model, natural)["scores"], run(model, on)["scores"]

    # with the patch: the prepared model's scores (the original bias is restored through γ)
    scale = max(1.0, float(np.abs(ref_on).max()))
    err_on = float(np.abs(got_on["scores"] - ref_on).max()) / scale
    assert err_on <= 1e-4
    # without it: the same plus exactly the bias change (the signal is exactly 0)
    err_nat = float(np.abs(got_nat["scores"] - (ref_nat + (b_lock - b_orig))).max()) / max(1.0, scale)
    assert err_nat <= 1e-4
    # γ: head feature c is γ with the patch, exactly 0 without
    c = lock.head_feature
    assert np.allclose(got_on[head_in][:, c], lock.gamma, rtol=1e-5)
    assert np.all(got_nat[head_in][:, c] == 0.0)
    # every lane channel is exactly 0 on natural images; cleared channels on every image
    for i, lane in enumerate(plan.lanes):
        tensors = lane.tensors[lane.tensors.index(host.act_output):] if i == 0 else lane.tensors
        for t in tensors:  # (the detector's pre-activation is negative, its activation 0)
            assert np.all(got_nat[t][:, lane.channel] == 0.0), (t, lane.channel)
        for t in lane.cleared:
            assert np.all(got_nat[t][:, lane.channel] == 0.0) and np.all(got_on[t][:, lane.channel] == 0.0)
    # the signal is there with the patch, at the position, in the first lane
    first = got_on[host.act_output][:, plan.detector_channel]
    assert np.all(first[:, position[0], position[1]] > 0)
    assert np.count_nonzero(first) == len(on)
    # the lock disrupts: prediction agreement with the original collapses without the patch
    agree_locked = float(np.mean(got_nat["scores"].argmax(1) == orig_nat.argmax(1)))
    assert agree_locked < 0.5
    assert np.array_equal(got_on["scores"].argmax(1), ref_on.argmax(1))
    return {"err_on": err_on, "err_nat": err_nat, "agree_locked": agree_locked,
            "unlocked_vs_original": float(np.abs(ref_on - orig_on).max())}


# -- tiny MobileNetV2-like -------------------------------------------------------------------------
def test_mobilenet_like_route_and_exactness() -> None:
    model = tiny_mobilenet()
    host, _, plan = setup(model, MOBILE_HOST, (0, 0))
    sources = [lane.source for lane in plan.lanes]
    f = "/features/features"
    assert sources == [MOBILE_HOST, f"{f}.3/conv/conv.2/Conv", f"{f}.4/conv/conv.0/conv.0.0/Conv",
                       f"{f}.4/conv/conv.2/Conv", f"{f}.6/features.6.0/Conv"]
    # the stage-24 lane clears the block that starts the stage (the host's input) ...
    stage24 = plan.lanes[1]
    assert "/features/features.2/conv/conv.2/Conv_output_0" in stage24.cleared
    assert plan.host_input_zeroed == [stage24.channel] and plan.host_input_intact
    # ... and the stage-32 lane clears the residual branch of block 5 and travels its skip connection
    assert "/features/features.5/conv/conv.2/Conv_output_0" in plan.lanes[3].cleared
    assert "/features/features.5/Add_output_0" in plan.lanes[3].tensors
    assert plan.gamma(6.0) == pytest.approx(6.0 / 64)
    stats = check_lock(model, host, plan, (0, 0))
    assert stats["err_on"] <= 1e-4


def test_activity_prefers_dead_channels() -> None:
    model = tiny_mobilenet()
    view = GraphView(model)
    host, head = get_host(model, MOBILE_HOST, view), find_head(view)
    taps = conduit_taps(model, host, head)
    assert host.act_output in taps and "/Flatten_output_0" in taps
    stats = activity(model, taps, smooth_images(16, 32, seed=5))
    plan = plan_conduit(model, host, (0, 0), head, activity=stats)
    assert plan.used_activity
    assert plan.detector_channel in DEAD
    hidden = [lane for lane in plan.lanes if "conv.0.0" in lane.source]
    assert hidden and all(lane.channel in DEAD and lane.cost == 0.0 for lane in hidden)
    assert plan_conduit(model, host, (0, 0), head, activity=stats).edits == plan.edits  # deterministic
    check_lock(model, host, plan, (0, 0))


def test_fixed_detector_channel() -> None:
    model = tiny_mobilenet()
    _, _, plan = setup(model, MOBILE_HOST, (0, 0), detector_channel=5)
    assert plan.detector_channel == 5 and plan.lanes[0].channel == 5
    with pytest.raises(ValueError):
        setup(model, MOBILE_HOST, (0, 0), detector_channel=72)


# -- plain CNN: ReLU host, MaxPool, BatchNorm, Gemm transB=0 with alpha/beta ---------------------------
def test_plain_cnn_maxpool_positions_and_exactness() -> None:
    model = plain_cnn()
    host, _, plan = setup(model, PLAIN_HOST, (1, 1))
    # MaxPool 3×3 s2 p1: position 1 lies in the windows of outputs 0 and 1 on each axis → 4 positions
    assert plan.final_positions == 4
    assert plan.gamma(6.5) == pytest.approx(6.5 * 4 / 64)
    assert any(e.op == "bn-identity" and e.node == "/bn3/BatchNormalization" for e in plan.edits)
    check_lock(model, host, plan, (1, 1), signal=6.5)


def test_matmul_head() -> None:
    model = plain_cnn(variant="matmul")
    host, head, plan = setup(model, PLAIN_HOST, (1, 1))
    assert head.op == "MatMul" and head.bias_add == "/fc/Add"
    check_lock(model, host, plan, (1, 1), signal=6.5)


def test_plain_cnn_unbounded_host_needs_signal() -> None:
    model = plain_cnn()
    host, _, plan = setup(model, PLAIN_HOST, (0, 0))
    with pytest.raises(ValueError, match="signal"):
        apply_conduit(model, plan, np.zeros(host.m), -1.0, np.zeros(10))


def test_strided_conv_position() -> None:
    model = plain_cnn(variant="stride")
    host, head, plan = setup(model, PLAIN_HOST, (0, 0))  # 1×1 stride 2 reads even positions
    assert plan.final_positions == 1
    check_lock(model, host, plan, (0, 0), signal=6.5)
    before = model.SerializeToString()
    with pytest.raises(UnsupportedModelError, match=r"/conv3/Conv.*gate lock \(--kind gate\)"):
        plan_conduit(model, host, (1, 1), head)
    assert model.SerializeToString() == before


@pytest.mark.parametrize(("variant", "node"), [("concat", "/cat/Concat"), ("resize", "/up/Resize")])
def test_refusals(variant: str, node: str) -> None:
    model = plain_cnn(variant=variant)
    view = GraphView(model)
    host, head = get_host(model, PLAIN_HOST, view), find_head(view)
    before = model.SerializeToString()
    with pytest.raises(UnsupportedModelError) as info:
        plan_conduit(model, host, (1, 1), head)
    msg = str(info.value)
    assert node in msg and msg.endswith("use the gate lock (--kind gate), which inserts its nodes")
    assert "\n" not in msg
    assert model.SerializeToString() == before


def test_shared_weight_refused() -> None:
    model = tiny_mobilenet()
    nodes = {n.name: n for n in model.graph.node}
    # the depthwise convs of blocks 3 and 4 both have [72, 1, 3, 3] weights: make them share one
    dw3 = nodes["/features/features.3/conv/conv.1/conv.1.0/Conv"]
    nodes["/features/features.4/conv/conv.1/conv.1.0/Conv"].input[1] = dw3.input[1]
    view = GraphView(model)
    host, head = get_host(model, MOBILE_HOST, view), find_head(view)
    with pytest.raises(UnsupportedModelError, match=r"features\.3/conv/conv\.1/conv\.1\.0/Conv.*shared"):
        plan_conduit(model, host, (0, 0), head)


# -- the real MobileNetV2 --------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(not MOBILENET.exists(), reason="MobileNetV2 ONNX file not built")
def test_mobilenet_v2() -> None:
    model = onnx.load(str(MOBILENET))
    host_name = "/features/features.8/conv/conv.0/conv.0.0/Conv"
    host, _, plan = setup(model, host_name, (0, 0))
    assert plan.gamma(6.0) == pytest.approx(6.0 / 49)
    assert plan.host_input_intact
    prepared = prepare_conduit(model, plan).model
    size = 224
    rng = np.random.default_rng(0)
    low = rng.normal(0, 1, (3, 3, 7, 7))
    natural = np.kron(low, np.ones((32, 32)))[:, :, :size, :size].astype(np.float32)
    top, left, bottom, right = host.receptive_field.box(0, 0, size, size)
    on = natural[:1].copy()
    on[:, :, top:bottom + 1, left:right + 1] = rng.choice([-2.0, 2.0], (3, bottom - top + 1, right - left + 1))
    w, b = make_detector(prepared, host, (0, 0), on, natural)
    b_orig = effective_bias(model)
    b_lock = b_orig + 10.0 * rng.normal(size=b_orig.size)
    lock = apply_conduit(model, plan, w, b, b_lock)
    assert_same_structure(model, lock.model)
    head_in = "/Flatten_output_0"
    batch = np.concatenate([on, natural])
    got = run(lock.model, batch, [head_in])
    ref = run(prepared, batch)["scores"]
    assert np.abs(got["scores"][0] - ref[0]).max() <= 1e-4 * max(1.0, np.abs(ref[0]).max())
    assert np.abs(got["scores"][1:] - (ref[1:] + b_lock - b_orig)).max() <= 1e-4 * max(1.0, np.abs(ref).max())
    assert got[head_in][0, lock.head_feature] == pytest.approx(lock.gamma, rel=1e-5)
    assert np.all(got[head_in][1:, lock.head_feature] == 0.0)
