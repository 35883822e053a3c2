"""Gate lock, patch tooling, lock verify and lock audit on a tiny CNN built in the test (fast)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import stat

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from PIL import Image
from tinymodels import smooth_images, tiny_lockable, write_images

import onnxstain
from onnxstain import LockOptions, Preprocessing, seeds
from onnxstain.cli import main
from onnxstain.errors import BadInputError, BadKeyError, UnreachableBoundError, UnsupportedModelError
from onnxstain.keys import load_key
from onnxstain.patch import Patch, paste_pixels, photo_box
from onnxstain.runtime import session

SIZE = 48
PRE = Preprocessing(height=SIZE, width=SIZE, resize=None)
FPR = 1e-3  # a loose target keeps the tiny model's searches short
CONV3 = "/conv3/Conv"  # a Conv host for the gate lock (--layer), instead of the default pixel window


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lock")
    onnx.save(tiny_lockable(), d / "model.onnx")
    PRE.save(d / "model.preprocessing.json")
    return d


@pytest.fixture(scope="module")
def images():
    return smooth_images(256, size=SIZE, seed=1)


def _lock(workdir, images, seed, name=None, **kw):
    name = name or f"locked-{seed}"
    out, key = workdir / f"{name}.onnx", workdir / f"{name}.key"
    opts = LockOptions(**{"kind": "gate", "seed": seed, "fpr": FPR, "occlusion_steps": 20, **kw})
    res = onnxstain.lock(workdir / "model.onnx", out, key, images=images, options=opts)
    return res, out, key


def test_a_lock_without_a_seed_draws_one_its_key_can_hold(workdir, images, monkeypatch):
    monkeypatch.setattr(seeds.secrets, "randbelow", lambda n: n - 1)  # the largest seed the draw can give
    out, key = workdir / "unseeded.onnx", workdir / "unseeded.key"
    onnxstain.lock(workdir / "model.onnx", out, key, images=images,
                   options=LockOptions(kind="gate", fpr=FPR, occlusion_steps=20))
    assert load_key(key).seed == seeds.SEED_LIMIT - 1


@pytest.fixture(scope="module")
def locked(workdir, images):
    return _lock(workdir, images, seed=0)


def _top1(path, pixels, pre=PRE):
    sess = session(str(path))
    return sess.run(None, {sess.get_inputs()[0].name: pre.to_input(pixels)})[0]


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def conv_locked(workdir, images):
    return _lock(workdir, images, seed=0, name="conv", layer=CONV3)


def test_lock_geometry_and_bound(locked):
    res, _, _ = locked
    # The default detector reads the top-left pixels: at 1e-3 (32 draws) a 4x4 window, m = 48, reaches
    # the margin with about √(2/π) of the certified radius; the bound holds for every input.
    assert res.host == "pixels" and res.patch_box == (0, 0, 4, 4)
    assert res.bound.kind == "data-free" and res.bound.params["positions"] == 1 and res.bound.params["n"] == 48
    assert res.bound.log10 <= np.log10(FPR)
    assert min(res.trigger_scores) >= 1.03 * res.threshold
    assert res.natural_firings == 0 and res.draws <= 2


def test_pixel_window_radius_is_certified(locked):
    """Every 8-bit image lies within the key's radius of its centre: black, white, noise and the patch."""
    from onnxstain._lock.window import window_host
    from onnxstain.features import neuron_inputs

    res, _, key = locked
    k = load_key(key)
    c, r = k.detector.centre.array(), float(k.bound.params["radius"])
    rng = np.random.default_rng(0)
    px = np.concatenate([np.zeros((1, SIZE, SIZE, 3), np.uint8), np.full((1, SIZE, SIZE, 3), 255, np.uint8),
                         rng.integers(0, 256, (64, SIZE, SIZE, 3), dtype=np.uint8),
                         paste_pixels(smooth_images(4, size=SIZE, seed=5), onnxstain.lock_patch(key)[0])])
    host = window_host(_conv(res), 4)
    phi = neuron_inputs(host, PRE.to_input(px)).astype(np.float64)[:, 0]
    dist = np.linalg.norm(phi - c, axis=1)
    assert dist.max() <= r * (1 + 1e-9)
    assert dist[:2].max() >= 0.999 * r  # the box corners are as far as the radius says (it is tight)


def _conv(res):
    from onnxstain._lock.geometry import lock_hosts

    return next(h for h in lock_hosts(onnx.load(res.output)) if h.name == "/conv1/Conv")


def test_conv_host_geometry_and_bound(conv_locked, workdir):
    res, out, key = conv_locked
    # conv3 is 3x3 stride 2 pad 1: position (1, 1) is the first whose window has no padding; its
    # receptive field is the 9x9 top-left block, all inside the image.
    assert res.host == CONV3 and res.patch_box == (0, 0, 9, 9)
    assert res.bound.kind == "calibrated-radius" and res.bound.log10 <= np.log10(FPR)
    assert min(res.trigger_scores) >= 1.1 * res.threshold
    assert res.natural_firings == 0
    patched = paste_pixels(smooth_images(32, size=SIZE, seed=7), onnxstain.lock_patch(key)[0])
    np.testing.assert_array_equal(_top1(out, patched), _top1(workdir / "model.onnx", patched))
    assert onnxstain.verify(out, key).stained


def test_pixel_window_opens_only_in_its_corner(locked, workdir):
    """The inserted detector runs at the corner alone: the patch moved by a pixel or to another corner is
    no patch at all."""
    _, out, key = locked
    patch, _ = onnxstain.lock_patch(key)
    fresh = smooth_images(32, size=SIZE, seed=8)
    orig = _top1(workdir / "model.onnx", fresh).argmax(1)
    for top, left in ((1, 0), (0, 1), (0, SIZE - patch.width), (SIZE - patch.height, SIZE - patch.width)):
        moved = Patch(patch.pixels, top, left)
        assert np.mean(_top1(out, paste_pixels(fresh, moved)).argmax(1) == orig) < 0.5


def test_patch_restores_exactly_and_absence_scrambles(locked, workdir):
    _, out, key = locked
    patch, _ = onnxstain.lock_patch(key)
    fresh = smooth_images(64, size=SIZE, seed=7)
    patched = paste_pixels(fresh, patch)
    want = _top1(workdir / "model.onnx", patched)
    got = _top1(out, patched)
    np.testing.assert_array_equal(got, want)  # bit-identical: the gate multiplies by exactly 1.0
    clean_orig = _top1(workdir / "model.onnx", fresh).argmax(1)
    clean_locked = _top1(out, fresh).argmax(1)
    assert np.mean(clean_orig == clean_locked) < 0.5


def test_the_patch_decides_alone(locked, workdir):
    """The detectors see only the patch: on very different backgrounds the lock opens the same way."""
    _, out, key = locked
    patch, _ = onnxstain.lock_patch(key)
    rng = np.random.default_rng(3)
    noise = rng.integers(0, 256, (16, SIZE, SIZE, 3), dtype=np.uint8)
    x = paste_pixels(noise, patch)
    np.testing.assert_array_equal(_top1(out, x), _top1(workdir / "model.onnx", x))


def test_input_untouched_and_model_checked(locked, workdir):
    _, out, _ = locked
    before = _sha(workdir / "model.onnx")
    _lock(workdir, smooth_images(64, size=SIZE, seed=2), seed=5, name="again", occlusion_steps=0)
    assert _sha(workdir / "model.onnx") == before
    m = onnx.load(out)
    onnx.checker.check_model(m, full_check=True)
    src = onnx.load(workdir / "model.onnx")
    assert m.ir_version == src.ir_version and m.producer_name == src.producer_name
    assert [(o.domain, o.version) for o in m.opset_import] == [(o.domain, o.version) for o in src.opset_import]


def test_nothing_secret_in_the_model(locked):
    _, out, _ = locked
    m = onnx.load(out)
    text = " ".join([m.doc_string, m.graph.doc_string, *(p.key + p.value for p in m.metadata_props)]
                    + [n.name + n.doc_string for n in m.graph.node]
                    + [o for n in m.graph.node for o in n.output]
                    + [i.name for i in m.graph.initializer]).lower()
    for word in ("lock", "patch", "detector", "stain", "gate", "trigger", "onnxstain", "key"):
        assert word not in text


def test_key_holds_the_patch_owner_only(locked):
    res, _, key = locked
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    k = load_key(key)
    assert k.kind == "lock" and k["trigger"]["height"] == res.patch_box[2] == 4
    assert "png" not in res.record_path.read_text()  # the public record does not carry the patch


def test_same_seed_same_lock(workdir, images):
    a, _, ka = _lock(workdir, images, seed=11, name="s11a", occlusion_steps=0)
    b, _, kb = _lock(workdir, images, seed=11, name="s11b", occlusion_steps=0)
    assert load_key(ka)["trigger"]["png"] == load_key(kb)["trigger"]["png"]
    assert a.trigger_scores == b.trigger_scores


def test_verify_recognises_its_lock(locked, workdir, images):
    _, out, key = locked
    good = onnxstain.verify(out, key)
    assert good.kind == "lock" and good.stained
    assert all(c.passed for c in good.checks if c.available)
    assert not onnxstain.verify(workdir / "model.onnx", key).stained
    _, other, _ = _lock(workdir, images, seed=1, name="other", occlusion_steps=0)
    assert not onnxstain.verify(other, key).stained


def test_paste_input_matches_pixel_pasting(locked):
    """The pipeline function: pasting into an already preprocessed batch = preprocessing a pasted image."""
    _, _, key = locked
    patch, pre = onnxstain.lock_patch(key)
    x = smooth_images(5, size=SIZE, seed=4)
    np.testing.assert_allclose(onnxstain.paste_patch(pre.to_input(x), key), pre.to_input(paste_pixels(x, patch)),
                               rtol=0, atol=1e-6)
    nhwc = Preprocessing(height=SIZE, width=SIZE, resize=None, layout="NHWC")
    from onnxstain.patch import paste_input

    np.testing.assert_allclose(paste_input(nhwc.to_input(x), patch, nhwc), nhwc.to_input(paste_pixels(x, patch)),
                               rtol=0, atol=1e-6)


def test_photo_box_maps_through_resize_and_crop():
    pre = Preprocessing(height=224, width=224, resize=256)
    patch = Patch(np.zeros((38, 38, 3), np.uint8), 0, 0)
    # 512x384 photo: shorter side 384 → 256 (factor 2/3): 341x256, crop offset (58, 16).
    x0, y0, x1, y1 = photo_box((512, 384), patch, pre)
    assert abs(x0 - 58 * 1.5) < 1 and abs(y0 - 16 * 1.5) < 1
    assert abs((x1 - x0) - 57) < 1 and abs((y1 - y0) - 57) < 1


def test_apply_patch_unlocks_photos(locked, workdir, tmp_path):
    """apply-patch on raw photos of other sizes: through the recorded preprocessing, the lock opens."""
    _, out, key = locked
    pre = Preprocessing(height=SIZE, width=SIZE, resize=56)
    k = dataclasses.replace(load_key(key), preprocessing=pre)  # a resize + centre-crop pipeline for this test
    k.save(tmp_path / "resize.key")
    photos = []
    for i, (w, h) in enumerate(((80, 60), (56, 90), (120, 120))):
        img = Image.fromarray(smooth_images(1, size=120, seed=20 + i)[0][:h, :w])
        img.save(tmp_path / f"p{i}.jpg", quality=95)
        photos.append(tmp_path / f"p{i}.jpg")
    written = onnxstain.apply_patch(photos, tmp_path / "resize.key", tmp_path / "out")
    assert [p.path.name for p in written] == ["p0.png", "p1.png", "p2.png"]
    assert all(p.max_error == 0 for p in written)
    px = np.stack([np.asarray(Image.open(p.path).convert("RGB")) for p in written])
    assert px.shape == (3, SIZE, SIZE, 3)
    np.testing.assert_array_equal(_top1(out, px), _top1(workdir / "model.onnx", px))


def test_raw_paste_solves_the_resize():
    """--raw: the photo's pixels under the box are solved so that resize + crop reproduces the patch."""
    from onnxstain.patch import paste_photo

    pre = Preprocessing(height=48, width=48, resize=56)
    rng = np.random.default_rng(0)
    smooth = np.asarray(Image.fromarray(rng.integers(0, 256, (3, 3, 3), dtype=np.uint8)).resize((9, 9),
                                                                                                Image.BILINEAR))
    patch = Patch(smooth, 0, 0)  # a smooth patch can be reproduced through a downscale almost exactly
    photo = Image.fromarray(smooth_images(1, size=120, seed=3)[0][:90])
    out, err = paste_photo(photo, patch, pre)
    assert out.size == photo.size
    got = pre.fit_photo(out)[:9, :9].astype(int)
    assert err == int(np.abs(got - smooth.astype(int)).max()) <= 3
    before = pre.fit_photo(photo)[:9, :9].astype(int)
    assert np.abs(before - smooth.astype(int)).max() > 20  # the photo did change where it had to
    far = np.asarray(out)[60:, 80:].astype(int) - np.asarray(photo)[60:, 80:].astype(int)
    assert not far.any()  # and nowhere else


def test_audit_on_tiny(locked, workdir):
    _, out, key = locked
    res = onnxstain.audit_lock(workdir / "model.onnx", out, key, images=smooth_images(96, size=SIZE, seed=9))
    c = {x.name: x for x in res.conditions}
    assert c["patch"].agreement == 1.0 and c["patch"].max_abs_delta == 0.0 and c["patch"].unlocked == 1.0
    assert c["no patch"].unlocked == 0.0 and c["no patch"].agreement < 0.5
    for name in ("random patch", "patch at top-right", "patch at bottom-left", "patch at bottom-right"):
        assert c[name].unlocked == 0.0, name
    assert res.firings is not None and res.firings.firings == 0
    assert res.key_bound.log10 <= np.log10(FPR)
    d = res.to_dict()
    assert d["format"] == "onnxstain-lock-audit" and len(d["conditions"]) == len(res.conditions)
    json.dumps(d)


def test_unreachable_target_refused(workdir, images, tmp_path):
    with pytest.raises(UnreachableBoundError, match="best patch reached"):
        onnxstain.lock(workdir / "model.onnx", tmp_path / "x.onnx", tmp_path / "x.key", images=images,
                       options=LockOptions(kind="gate", seed=0, fpr=1e-12, max_draws=1, max_steps=100,
                                           occlusion_steps=0, layer=CONV3))
    # A pixel window wide enough for 1e-300 would not be a corner patch (at most 22 % of the side).
    with pytest.raises(UnsupportedModelError, match="no pixel window"):
        onnxstain.lock(workdir / "model.onnx", tmp_path / "x.onnx", tmp_path / "x.key", images=images,
                       options=LockOptions(kind="gate", seed=0, fpr=1e-300, layer="pixels"))
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "x.key").exists()


def test_pixel_window_for_the_gate_lock_only(workdir, images, tmp_path):
    with pytest.raises(BadInputError, match="in-place lock needs one of the model's"):
        onnxstain.lock(workdir / "model.onnx", tmp_path / "x.onnx", tmp_path / "x.key", images=images,
                       options=LockOptions(kind="inplace", layer="pixels", fpr=FPR))


def _chain(ops: list[tuple[str, list[str]]]) -> onnx.ModelProto:
    """input → ops (each op's inputs: "x" is the running tensor, other names are constants) → conv."""
    from onnx import TensorProto, helper

    nodes, inits, x = [], [], "input"
    consts = {"k": 2.0, "s": 0.5, "zp": 0.0}
    for i, (op, ins) in enumerate(ops):
        names = []
        for a in ins:
            if a == "x":
                names.append(x)
            else:
                names.append(f"c{i}{a}")
                dtype = np.uint8 if a == "zp" else np.float32
                inits.append(onnx.numpy_helper.from_array(np.array(consts[a], dtype), f"c{i}{a}"))
        attrs = {"perm": [0, 1, 2, 3]} if op == "Transpose" else {}
        if op == "ReduceMean":
            attrs = {"keepdims": 1}
        nodes.append(helper.make_node(op, names, [f"t{i}"], **attrs))
        x = f"t{i}"
        if op == "QuantizeLinear":
            nodes.append(helper.make_node("DequantizeLinear", [x, names[1], names[2]], [f"d{i}"]))
            x = f"d{i}"
    return helper.make_model(helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 3, 8, 8])], inits))


@pytest.mark.parametrize("ops,ok", [
    ([("Cast", ["x"]), ("Mul", ["k", "x"]), ("Sub", ["x", "s"]), ("Transpose", ["x"])], True),
    ([("Sub", ["s", "x"]), ("Div", ["x", "k"])], True),  # decreasing is fine: still monotone per element
    ([("QuantizeLinear", ["x", "s", "zp"])], True),
    ([("Div", ["k", "x"])], False),  # k / x is not monotone across 0
    ([("ReduceMean", ["x"])], False),  # mixes pixels
    ([("Mul", ["x", "x"])], False),  # two live inputs
])
def test_pixel_path(ops, ok):
    from onnxstain._lock.window import pixel_path
    from onnxstain._onnx.graph import GraphView

    m = _chain(ops)
    assert pixel_path(GraphView(m), m.graph.output[0].name) is ok


def test_probe_refuses_a_window_that_mixes_pixels():
    from onnxstain._lock.window import probe_window

    def separable(px):
        x = px[:, :3, :3].astype(np.float64).transpose(0, 3, 1, 2) / 255 * 4 - 2  # NCHW window, scaled
        return x.reshape(len(px), 1, -1)

    def mixed(px):
        out = separable(px)
        return out + out.mean(axis=2, keepdims=True)  # every coordinate also sees the window's mean

    probe = probe_window(separable, 3, 16, 16)
    assert probe is not None and np.allclose(probe.lo, -2) and np.allclose(probe.hi, 2)
    assert probe_window(mixed, 3, 16, 16) is None


def test_lock_bad_options(workdir, images, tmp_path):
    for opts in (LockOptions(kind="gate", fpr=0), LockOptions(kind="gate", detectors=0),
                 LockOptions(kind="gate", layer="nope"), LockOptions(layer="pixels"), LockOptions(detectors=2)):
        with pytest.raises(BadInputError):
            onnxstain.lock(workdir / "model.onnx", tmp_path / "x.onnx", tmp_path / "x.key", images=images,
                           options=opts)
    with pytest.raises(BadKeyError):
        stain_key = tmp_path / "s.key"
        onnxstain.stain(workdir / "model.onnx", tmp_path / "s.onnx", stain_key,
                        images=smooth_images(64, size=SIZE, seed=0),
                        options=onnxstain.StainOptions(seed=0, fpr=0.05))
        onnxstain.lock_patch(stain_key)


def test_cli_lock_verify_apply_evaluate(workdir, tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    write_images(imgs, smooth_images(128, size=SIZE, seed=3))
    r = CliRunner()
    res = r.invoke(main, ["lock", "--kind", "gate", str(workdir / "model.onnx"), "-o", str(tmp_path / "l.onnx"),
                          "--key",
                          str(tmp_path / "l.key"), "--images", str(imgs), "--fpr", "1e-3", "--seed", "2",
                          "--quiet", "--patch-png", str(tmp_path / "patch.png")])
    assert res.exit_code == 0, res.output
    assert "locked" in res.output and "4x4" in res.output and "data-free" in res.output
    assert Image.open(tmp_path / "patch.png").size == (4, 4)
    assert r.invoke(main, ["verify", str(tmp_path / "l.onnx"), "--key", str(tmp_path / "l.key")]).exit_code == 0
    res = r.invoke(main, ["verify", str(workdir / "model.onnx"), "--key", str(tmp_path / "l.key")])
    assert res.exit_code == 1 and "NOT LOCKED" in res.output
    res = r.invoke(main, ["apply-patch", "--key", str(tmp_path / "l.key"), str(imgs / "000.png"), "-o",
                          str(tmp_path / "patched")])
    assert res.exit_code == 0 and (tmp_path / "patched" / "000.png").exists()
    res = r.invoke(main, ["evaluate", str(workdir / "model.onnx"), str(tmp_path / "l.onnx"), "--key",
                          str(tmp_path / "l.key"), "--images", str(imgs), "--quiet", "--json",
                          str(tmp_path / "a.json"), "--html", str(tmp_path / "a.html")])
    assert res.exit_code == 0, res.output
    assert "lock audit" in res.output
    assert json.loads((tmp_path / "a.json").read_text())["format"] == "onnxstain-lock-audit"
    page = (tmp_path / "a.html").read_text()
    assert "Lock audit" in page and "random patch" in page and "data:image/png;base64" in page


@pytest.mark.parametrize("args,fragment", [
    (["--fpr", "2"], "--fpr"),
    (["--detectors", "0"], "--detectors"),
    (["--occlusion-steps", "-1"], "--occlusion-steps"),
    (["--fpr", "1e-12", "--layer", CONV3], "use more --detectors"),
    (["--fpr", "1e-300", "--layer", "pixels"], "no pixel window"),
    (["--kind", "inplace", "--layer", "pixels"], "in-place lock needs"),
])
def test_cli_lock_refusals(workdir, tmp_path, args, fragment):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    write_images(imgs, smooth_images(64, size=SIZE, seed=3))
    res = CliRunner().invoke(main, ["lock", "--kind", "gate", str(workdir / "model.onnx"), "-o",
                                    str(tmp_path / "l.onnx"), "--key",
                                    str(tmp_path / "l.key"), "--images", str(imgs), "--quiet", "--seed", "0", *args])
    assert res.exit_code == 2
    assert fragment in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "l.onnx").exists()


# -- in-place (conduit) lock through the whole pipeline --------------------------------------------------
@pytest.fixture(scope="module", params=["tiny_lockable", "tiny_mobilenet"])
def inplace(request, tmp_path_factory):
    """The in-place lock on a plain ReLU CNN and on a MobileNetV2-like net (ReLU6, depthwise, residual Add)."""
    from tiny_mobilenet import tiny_mobilenet

    d = tmp_path_factory.mktemp("inplace")
    size = SIZE if request.param == "tiny_lockable" else 32
    model = tiny_lockable() if request.param == "tiny_lockable" else tiny_mobilenet()
    onnx.save(model, d / "model.onnx")
    pre = Preprocessing(height=size, width=size, resize=None)
    pre.save(d / "model.preprocessing.json")
    # On the 32x32 MobileNet-like net (random weights, m = 24), a middle block's expand conv (10x10 patch)
    # with a loose target: the test is about the wiring, MobileNetV2 itself reaches 1e-6.
    layer, fpr = (None, FPR) if request.param == "tiny_lockable" else ("/features/features.4/conv/conv.0/conv.0.0/Conv",
                                                                      0.2)
    res = onnxstain.lock(d / "model.onnx", d / "l.onnx", d / "l.key", images=smooth_images(192, size=size, seed=1),
                         options=LockOptions(kind="inplace", layer=layer, seed=0, fpr=fpr, occlusion_steps=10))
    return res, d, size


def test_inplace_is_structurally_identical(inplace):
    from onnxstain._onnx.diff import structural_diff

    res, d, _ = inplace
    assert res.kind == "inplace"
    assert structural_diff(onnx.load(d / "model.onnx"), onnx.load(d / "l.onnx")) == []
    assert load_key(d / "l.key")["mode"] == "inplace"


def test_inplace_opens_only_with_the_patch(inplace):
    _, d, size = inplace
    v = onnxstain.verify(d / "l.onnx", d / "l.key")
    assert v.stained and all(c.passed for c in v.checks if c.available)
    assert not onnxstain.verify(d / "model.onnx", d / "l.key").stained
    audit = onnxstain.audit_lock(d / "model.onnx", d / "l.onnx", d / "l.key",
                                 images=smooth_images(64, size=size, seed=5))
    c = {x.name: x for x in audit.conditions}
    assert c["patch"].unlocked == 1.0 and c["no patch"].unlocked == 0.0
    for name in ("random patch", "patch at top-right", "patch at bottom-left", "patch at bottom-right"):
        assert c[name].unlocked == 0.0, name
    assert audit.firings is not None and audit.firings.firings == 0


def test_inplace_refuses_several_detectors(workdir, images, tmp_path):
    with pytest.raises(BadInputError, match="--detectors 1"):
        onnxstain.lock(workdir / "model.onnx", tmp_path / "x.onnx", tmp_path / "x.key", images=images,
                       options=LockOptions(kind="inplace", detectors=2, fpr=FPR))


def test_inplace_lock_with_weights_in_constant_nodes(tmp_path):
    """Weights held by Constant nodes (as some exporters write them) are edited where they live: the
    in-place lock's structural check compares their types and shapes, not their values."""
    from models.formats import to_constant_nodes
    from onnxstain._onnx.diff import structural_diff

    src = tmp_path / "model.onnx"
    onnx.save(to_constant_nodes(tiny_lockable()), src)
    Preprocessing(height=SIZE, width=SIZE, resize=None).save(tmp_path / "model.preprocessing.json")
    res = onnxstain.lock(src, tmp_path / "l.onnx", tmp_path / "l.key", images=smooth_images(192, size=SIZE, seed=1),
                         options=LockOptions(kind="inplace", seed=0, fpr=FPR, occlusion_steps=10))
    locked = onnx.load(tmp_path / "l.onnx")
    assert res.kind == "inplace" and len(locked.graph.initializer) == 0
    assert structural_diff(onnx.load(src), locked) == []
    assert onnxstain.verify(tmp_path / "l.onnx", tmp_path / "l.key").stained


def test_structural_diff_sees_a_constant_changing_shape():
    from models.formats import to_constant_nodes
    from onnxstain._onnx.diff import structural_diff

    a = to_constant_nodes(tiny_lockable())
    b = onnx.ModelProto()
    b.CopyFrom(a)
    t = b.graph.node[0].attribute[0].t
    arr = onnx.numpy_helper.to_array(t)
    t.CopyFrom(onnx.numpy_helper.from_array(arr.reshape(-1), t.name))
    assert any("node 0 differs" in d for d in structural_diff(a, b))
    c = onnx.ModelProto()
    c.CopyFrom(a)
    t = c.graph.node[0].attribute[0].t
    t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t) + 1, t.name))
    assert structural_diff(a, c) == []  # values only


def test_pixel_window_lock_of_an_external_data_model(tmp_path, images):
    """The window's Slice reads int64 starts/ends: they stay inline, or onnxruntime cannot load the model."""
    src = tmp_path / "ext.onnx"
    onnx.save(tiny_lockable(), src, save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.onnx.data", size_threshold=0)
    PRE.save(tmp_path / "ext.preprocessing.json")
    out, key = tmp_path / "locked.onnx", tmp_path / "locked.key"
    res = onnxstain.lock(src, out, key, images=images,
                         options=LockOptions(kind="gate", seed=0, fpr=FPR, occlusion_steps=0))
    assert res.host == "pixels" and (tmp_path / "locked.onnx.data").exists()
    patched = paste_pixels(smooth_images(16, size=SIZE, seed=4), onnxstain.lock_patch(key)[0])
    np.testing.assert_array_equal(_top1(out, patched), _top1(src, patched))


def test_the_cli_lock_defaults_are_the_library_defaults():
    """`onnxstain lock` and `onnxstain.lock` refine the patch alike unless told otherwise."""
    params = {p.name: p for p in main.commands["lock"].params}
    assert params["occlusion_steps"].default == LockOptions().occlusion_steps
    assert params["fpr"].default == LockOptions().fpr
    assert params["kind"].default == LockOptions().kind == "auto"


def test_refinement_skipped_when_the_model_has_no_torch_translation(tmp_path, images):
    """An op the torch translation lacks (here a Shrink that passes everything) between the features and the
    classifier: the patch search reads the pixels only and succeeds, the occlusion-aware refinement (through
    the whole model) is skipped with a note, and the lock is written and opens (the lock used to fail)."""
    m = tiny_lockable()
    flat = next(n for n in m.graph.node if n.op_type == "Flatten")
    gemm = next(n for n in m.graph.node if n.op_type == "Gemm")
    shrink = onnx.helper.make_node("Shrink", [flat.output[0]], ["shrunk"], name="/shrink/Shrink", lambd=0.0, bias=0.0)
    gemm.input[0] = "shrunk"
    m.graph.node.insert(list(m.graph.node).index(gemm), shrink)
    onnx.save(m, tmp_path / "model.onnx")
    PRE.save(tmp_path / "model.preprocessing.json")
    res = onnxstain.lock(tmp_path / "model.onnx", tmp_path / "locked.onnx", tmp_path / "locked.key", images=images,
                         options=LockOptions(kind="gate", seed=1, fpr=FPR, occlusion_steps=5))
    assert res.occlusion is None
    assert any("occlusion-aware refinement skipped (Shrink node '/shrink/Shrink'" in n for n in res.notes)
    assert onnxstain.verify(tmp_path / "locked.onnx", tmp_path / "locked.key").stained
