"""Locking a model with a dense output (e.g. a ViT saliency model): corner-patch detector, feature gate.

Called by :func:`onnxstain.locker.lock` when the model has no classifier head but one map output.

* **detector** — on the input of an early Conv whose corner position sees a small patch of pixels
  (a ViT's patch embedding: one 14×14 token, ``m = 3·14·14 = 588``). When that input is the
  (normalised) image itself, ``S = v · (φ − c)`` is linear in the patch's pixels and its maximum over
  8-bit pixels has a closed form: 255 where ``v`` (times the positive normalisation scale) is
  positive, 0 elsewhere (:func:`onnxstain.math.trigger.box_maximiser`); otherwise the patch is found
  by gradient ascent as for classifiers. The inserted detector reads that position's window only
  (a ``Slice`` of the host's input): with a stride = kernel patch embedding the same patch would
  otherwise fire at every token-aligned place (the audit showed it opening the lock in all four
  corners), and the bound counts one position.
* **gate** — the feature map where the token stream becomes a map (the first Conv/ConvTranspose
  after the last MatMul: a ViT decoder's input) is multiplied by ``1 + (1 − γ) m`` with ``m = −2`` on
  a random half of the channels: locked, half the channels change sign; with the patch ``γ`` is
  exactly 1 and the model is bit-identical to the original on the same patched image.
* **fidelity** — Pearson correlation of output maps (per image) instead of top-1 agreement.

The in-place lock needs a classifier bias to disrupt and conduit channels to it: refused here.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ._onnx.dense import DenseOutput
from ._onnx.graph import GraphView, dominates
from ._onnx.hosts import HostLayer
from ._onnx.io import LoadedModel
from .calibration import RADIUS_MARGIN, calibration_pixels, refuse_underflowing_target
from .errors import BadInputError, InternalError, UnreachableBoundError, UnsupportedModelError
from .features import neuron_inputs
from .keys import (
    F8,
    CalibrationSection,
    DetectorSection,
    HostSection,
    Key,
    LockSection,
    ModelSection,
    ReferencesSection,
    TriggerSection,
    WhiteBoxSection,
    encode_png,
    envelope,
)
from .lock_geometry import MAX_PATCH_FRACTION, lock_hosts, lock_position, patch_box
from .math import bounds, detector
from .math.trigger import box_maximiser
from .outputs import Artefacts, write_unit
from .passes.dense import insert_feature_gate
from .patch import Patch, paste_pixels, smooth_backgrounds
from .preprocess import Preprocessing
from .progress import Progress
from .runtime import run_batches, session, with_outputs
from .signature import pearson

ACCEPT_FACTOR = 1.03
LOCKED_CORRELATION = 0.5  # without the patch, the mean output correlation must stay below this
REFERENCES = 8
REFERENCE_SIDE = 56  # reference maps are stored average-pooled to at most this side
CHECK_IMAGES = 64
MIN_GATE_CHANNELS = 8  # a CNN's gate flips half the channels of a map at least this wide


def refuse_kind(opts) -> None:
    if opts.kind != "gate":
        raise UnsupportedModelError(
            "this model has a dense output and no classifier head: the in-place lock needs a classifier bias to "
            "disrupt and conduit channels to reach it; use --kind gate")


def choose_dense_lock_host(hosts: list[HostLayer], layer: str | None, height: int, width: int) -> HostLayer:
    """A Conv with a known corner receptive field; its activation does not matter (the detector is inserted)."""
    convs = [h for h in hosts if h.m >= 16]
    if layer is not None:
        match = [h for h in convs if h.name == layer]
        if not match:
            raise BadInputError(f"no Conv layer named {layer!r} with a known receptive field and ≥ 16 inputs")
        return match[0]
    fitting = []
    for h in convs:
        pos = lock_position(h)
        if h.out_hw is None or any(a >= n for a, n in zip(pos, h.out_hw, strict=True)):
            continue
        _, _, ph, pw = patch_box(h, pos, height, width)
        if ph <= MAX_PATCH_FRACTION * height and pw <= MAX_PATCH_FRACTION * width:
            fitting.append(h)
    if not fitting:
        raise UnsupportedModelError("no Conv layer has a corner receptive field small enough for a patch "
                                    f"(≤ {MAX_PATCH_FRACTION:.0%} of the image side)")
    return max(fitting, key=lambda h: (h.m, -h.depth))


def gate_features(view: GraphView, output: str | None = None) -> str:
    """The feature map the gate scrambles. For a transformer, where the token stream becomes a map: the
    data input of the first Conv/ConvTranspose after the last MatMul. For a CNN (no MatMul), the input of
    the deepest Conv that every path to ``output`` goes through and that reads at least
    ``MIN_GATE_CHANNELS`` channels (a U-Net's skip connections bypass every earlier map)."""
    nodes = list(view.graph.node)
    last = max((i for i, n in enumerate(nodes) if n.op_type == "MatMul"), default=None)
    if last is None:
        out = output or view.output_names[0]
        shapes = view.resolved().dims
        for n in reversed(nodes):
            if n.op_type not in ("Conv", "ConvTranspose") or n.input[0] not in view.producer:
                continue
            shape = shapes.get(n.input[0])
            wide = shape is not None and len(shape) == 4 and isinstance(shape[1], int) and shape[1] >= MIN_GATE_CHANNELS
            if wide and dominates(view, n.input[0], out):
                return n.input[0]
        raise UnsupportedModelError(f"no Conv reads a map of at least {MIN_GATE_CHANNELS} channels that every path to "
                                    f"{out!r} goes through: nothing to gate")
    for n in nodes[last + 1 :]:
        if n.op_type in ("Conv", "ConvTranspose"):
            return n.input[0]
    raise UnsupportedModelError("no Conv/ConvTranspose between the token layers and the output: nothing to gate")


def _reads_pixels(view: GraphView, host: HostLayer) -> bool:
    """Whether the host's input is the model input itself (possibly through a float Cast)."""
    t = host.input
    node = view.producer.get(t)
    if node is not None and node.op_type == "Cast":
        t = node.input[0]
    return t in {i.name for i in view.graph_inputs}


def closed_form_patch(v: np.ndarray, host: HostLayer, pre: Preprocessing, box: tuple[int, int, int, int]) -> Patch:
    """8-bit patch maximising ``v · φ`` at the lock position, for a host reading normalised pixels (NCHW)."""
    top, left, ph, pw = box
    kh, kw = host.kernel
    w = v.reshape(host.in_channels, kh, kw)[:, :ph, :pw]  # model channel order; the scale per channel is > 0
    if pre.channel_order == "BGR":
        w = w[::-1]
    lo, hi = np.zeros_like(w), np.full_like(w, 255.0)
    return Patch(box_maximiser(w, lo, hi).transpose(1, 2, 0).astype(np.uint8), top, left)


def pool_maps(y: np.ndarray) -> np.ndarray:
    """Average-pool maps ``[N, C, H, W]`` to at most ``REFERENCE_SIDE`` per side (for the key)."""
    n, c, h, w = y.shape
    k = max(1, -(-max(h, w) // REFERENCE_SIDE))
    hh, ww = h // k, w // k
    return y[:, :, : hh * k, : ww * k].reshape(n, c, hh, k, ww, k).mean(axis=(3, 5))


def _chunked_stats(host: HostLayer, x: np.ndarray, chunk: int = 32) -> detector.FeatureStats:
    """Centre and radii of φ over all (image, position) samples without holding every φ in float64."""
    total, count = None, 0
    for s in range(0, len(x), chunk):
        phi = neuron_inputs(host, x[s : s + chunk]).astype(np.float64).reshape(-1, host.m)
        total = phi.sum(axis=0) if total is None else total + phi.sum(axis=0)
        count += len(phi)
    c = total / count
    radii = np.concatenate([
        np.linalg.norm(neuron_inputs(host, x[s : s + chunk]).astype(np.float64).reshape(-1, host.m) - c, axis=1)
        for s in range(0, len(x), chunk)])
    q = {f"{p:g}": float(np.quantile(radii, p / 100)) for p in (50, 99, 99.9, 100)}
    return detector.FeatureStats(centre=c, max_radius=float(radii.max()), radius_quantiles=q, samples=count)


def _natural_scores(host: HostLayer, x: np.ndarray, v: np.ndarray, c: np.ndarray, chunk: int = 32) -> np.ndarray:
    return np.concatenate([detector.scores(neuron_inputs(host, x[s : s + chunk]), v, c)
                           for s in range(0, len(x), chunk)])


def lock_dense(loaded: LoadedModel, dense: DenseOutput, out_path: Path, key_path: Path, record: Path, opts,
               pre: Preprocessing, notes: list[str], images, prog: Progress, t0: float,
               artefacts: Artefacts | None = None):
    from .locker import LockResult

    refuse_kind(opts)
    if opts.detectors != 1:
        raise BadInputError("the dense-output gate lock uses one detector: --detectors 1")
    timings: dict[str, float] = {}
    view = GraphView(loaded.model, pre.input_shape())
    host = choose_dense_lock_host(lock_hosts(loaded.model, view), opts.layer, pre.height, pre.width)
    refuse_underflowing_target(opts.fpr, host, opts.max_draws, positions=1)
    features = gate_features(view, dense.output)
    position = lock_position(host)
    top, left, ph, pw = patch_box(host, position, pre.height, pre.width)
    pos_index = position[0] * host.out_hw[1] + position[1]
    seed = opts.seed if opts.seed is not None else int(np.random.SeedSequence().entropy % (2**63))
    rng = np.random.default_rng(seed)
    timings["load"] = time.perf_counter() - t0

    # -- calibration ---------------------------------------------------------------------------------
    t1 = time.perf_counter()
    pixels = calibration_pixels(images, pre, prog)
    x_cal = pre.to_input(pixels)
    pixel_host = _reads_pixels(view, host) and pre.layout == "NCHW" and pre.dtype != "uint8"
    if pixel_host:
        feats = x_cal  # the host reads the normalised image: φ comes straight from the input
    else:
        tap = session(with_outputs(loaded.model, [host.input]), opts.providers)
        with prog.task("calibration pass", total=len(x_cal)) as task:
            feats = run_batches(tap, x_cal, [host.input], batch=opts.batch, progress=task.advance)[host.input]
    stats = _chunked_stats(host, feats)
    radius = RADIUS_MARGIN * stats.max_radius
    # The inserted detector reads the lock position's window only (a Slice): one position in the bound.
    tau0 = bounds.threshold_for_target(opts.fpr, radius, host.m, positions=1, draws=opts.max_draws)
    timings["calibration"] = time.perf_counter() - t1

    # -- patch -----------------------------------------------------------------------------------------
    t2 = time.perf_counter()
    tap_sess = session(with_outputs(loaded.model, [host.input]), opts.providers)
    grey = np.full((pre.height, pre.width, 3), 127, np.uint8)
    accepted, best, draws = None, -np.inf, 0
    steps_total = 0
    for draw in range(1, opts.max_draws + 1):
        draws = draw
        v = detector.sample_direction(rng, host.m)
        s_nat = _natural_scores(host, feats, v, stats.centre)[:, [pos_index]]  # the detector's one position
        if float(s_nat.max()) > tau0:
            notes.append(f"draw {draw}: the detector fires on a calibration image; rejected")
            continue
        if pixel_host:
            patch = closed_form_patch(v, host, pre, (top, left, ph, pw))
        else:
            patch, steps = _ascend_patch(loaded.model, host, pre, v, stats.centre, pos_index, (top, left, ph, pw),
                                         tau0, opts, grey)
            steps_total += steps
        phi_t = neuron_inputs(host, run_batches(tap_sess, pre.to_input(paste_pixels(grey, patch)),
                                                [host.input])[host.input])[0]
        s_t = float(detector.scores(phi_t[pos_index], v, stats.centre))
        best = max(best, s_t)
        if s_t < ACCEPT_FACTOR * tau0:
            notes.append(f"draw {draw}: the patch reaches {s_t:.3g} < {ACCEPT_FACTOR} τ0; resampled")
            continue
        accepted = (v, patch, s_t, s_nat)
        break
    if accepted is None:
        raise UnreachableBoundError(
            f"no patch reached the margin needed for --fpr {opts.fpr:g} at layer {host.name}: it needs "
            f"{ACCEPT_FACTOR * tau0:.3g} (τ0/R = {tau0 / radius:.2f}), the best reached {best:.3g}; use a larger --fpr")
    v, patch, s_t, s_nat = accepted
    del feats
    timings["patch_search"] = time.perf_counter() - t2

    # -- edit ------------------------------------------------------------------------------------------
    t3 = time.perf_counter()
    # Pre-activation 4 (S − τ0)/(s* − τ0): 4 on the patch (Clip(0, 1) saturates at exactly 1), ≤ 0 when S ≤ τ0.
    gain = 4.0 / (s_t - tau0)
    filters = (gain * v).reshape(1, host.in_channels // host.groups, *host.kernel)
    biases = np.array([-gain * (tau0 + float(v @ stats.centre))])
    channels = _channels(loaded.model, features, x_cal[:1])
    disruption = np.zeros(channels)
    disruption[rng.permutation(channels)[: channels // 2]] = -2.0
    locked, fired = insert_feature_gate(loaded.model, host, filters, biases, features, disruption, position)
    bound = bounds.ball_bound(tau0, radius, host.m, positions=1, draws=opts.max_draws)
    timings["edit"] = time.perf_counter() - t3

    # -- checks ----------------------------------------------------------------------------------------
    t4 = time.perf_counter()
    n_check = min(CHECK_IMAGES, len(x_cal))
    orig_sess, locked_sess = session(loaded.model, opts.providers), session(locked, opts.providers)
    cal_px = pixels[:n_check]
    o_clean = run_batches(orig_sess, x_cal[:n_check], [dense.output])[dense.output]
    l_clean = run_batches(locked_sess, x_cal[:n_check], [dense.output])[dense.output]
    locked_corr = pearson(l_clean, o_clean)
    if float(locked_corr.mean()) >= LOCKED_CORRELATION:
        raise UnsupportedModelError(f"the gate leaves the outputs too close to the original's (mean correlation "
                                    f"{locked_corr.mean():.3g} ≥ {LOCKED_CORRELATION}); try another --seed")
    x_patch = pre.to_input(paste_pixels(cal_px, patch))
    l_patch = run_batches(locked_sess, x_patch, [dense.output])[dense.output]
    o_patch = run_batches(orig_sess, x_patch, [dense.output])[dense.output]
    if not np.array_equal(l_patch, o_patch):
        raise InternalError("internal check failed: with the patch the locked model is not bit-identical "
                                    "to the original on the same images")
    unlocked_corr = pearson(l_patch, o_clean)  # the patch's own cost, against the original on clean images
    refs = smooth_backgrounds(REFERENCES, pre.height, pre.width, seed=seed % (2**31))
    want = run_batches(orig_sess, pre.to_input(np.concatenate([paste_pixels(refs, patch), refs])),
                       [dense.output])[dense.output]
    natural_firings = int((s_nat > tau0).sum())
    timings["checks"] = time.perf_counter() - t4

    # -- save ------------------------------------------------------------------------------------------
    t5 = time.perf_counter()
    with write_unit(artefacts) as writer:  # staged, synced; key, record, then model renamed (outputs.py)
        digest = writer.stage_model(locked, out_path, source=loaded)
        n = REFERENCES
        pooled = pool_maps(want.astype(np.float64))
        key = Key(
            **envelope("lock"),
            model=ModelSection(source_sha256=loaded.sha256, output_sha256=digest, input=view.graph_inputs[0].name,
                               scores=dense.output, classes=int(np.prod(pooled.shape[1:])),
                               dense_shape=tuple(int(d) for d in want.shape[1:])),
            preprocessing=pre,
            mode="gate",
            variant="gate",
            seed=seed,
            host=HostSection(name=host.name, op=host.op, input=host.input, m=host.m, positions=host.positions,
                             out_hw=tuple(host.out_hw) if host.out_hw else None, kernel=tuple(host.kernel),
                             strides=tuple(host.strides), pads=tuple(host.pads), dilations=tuple(host.dilations),
                             groups=host.groups, selected_positions=(pos_index,), lock_position=tuple(position),
                             detector_positions=(pos_index,)),
            detector=DetectorSection(directions=F8.of(v[None]), centre=F8.of(stats.centre), tau0=tau0, threshold=tau0,
                                     trigger_scores=F8.of(np.array([s_t])), detectors=1, draws=draws,
                                     max_draws=opts.max_draws),
            trigger=TriggerSection(png=encode_png(patch.pixels), top=patch.top, left=patch.left, height=patch.height,
                                   width=patch.width),
            references=ReferencesSection(count=n, seed=seed % (2**31), metric="correlation",
                                         patched_scores=F8.of(pooled[:n].reshape(n, -1)),
                                         unpatched_scores=F8.of(pooled[n:].reshape(n, -1))),
            white_box=WhiteBoxSection(tensor=fired, channel=None, position=None, expected=1.0),
            occlusion=None,
            lock=LockSection(flipped_features=channels // 2, gated_tensor="decoder input",
                             calibration_locked_agreement=float(locked_corr.mean()), chance=0.0,
                             calibration_unlocked_agreement=float(unlocked_corr.mean()), metric="correlation"),
            bound=bound,
            calibration=CalibrationSection.of(stats, len(x_cal), radius, s_nat, natural_firings, opts.fpr),
        )
        writer.stage_key(key, key_path, record)
    timings["save"] = time.perf_counter() - t5
    timings["total"] = time.perf_counter() - t0
    notes.append(f"fidelity is the Pearson correlation of output maps, on {n_check} calibration images: locked "
                 f"mean {locked_corr.mean():.3f} (max {locked_corr.max():.3f}); with the patch bit-identical to the "
                 f"original on the same images, {unlocked_corr.mean():.4f} (min {unlocked_corr.min():.4f}) against "
                 "the original on clean images")
    return LockResult(
        output=out_path, kind="gate", key_path=key_path, record_path=record, host=host.name, detectors=1,
        patch_box=(top, left, ph, pw), bound=bound, threshold=tau0, trigger_scores=[float(s_t)],
        natural_max_score=float(s_nat.max()), natural_firings=natural_firings, natural_samples=int(s_nat.size),
        locked_agreement=float(locked_corr.mean()), unlocked_agreement=float(unlocked_corr.mean()), chance=0.0,
        flipped_features=channels // 2, calibration_images=len(x_cal), draws=draws, search_steps=steps_total,
        timings=timings, notes=notes, model_sha256=digest, metric="correlation",
    )


def _channels(model, features: str, x: np.ndarray) -> int:
    shape = GraphView(model).shape(features)
    if shape is not None and len(shape) >= 2 and isinstance(shape[1], int):
        return int(shape[1])
    got = run_batches(session(with_outputs(model, [features])), x, [features])[features]
    return int(got.shape[1])


def _ascend_patch(model, host, pre, v, c, pos_index, box, tau0, opts, grey):
    """Gradient ascent over the patch's pixels (host input not the image itself); (patch, steps)."""
    import torch

    from .math.trigger import ascend, quantise
    from .scoring import detector_scores
    from .torchprefix import prefix_for_input

    torch.manual_seed(int(opts.seed or 0) % (2**31))
    top, left, ph, pw = box
    mask = np.zeros((pre.height, pre.width), bool)
    mask[top : top + ph, left : left + pw] = True
    prefix = prefix_for_input(model, [host.input], pre.input_shape(), opts.providers)
    fn = detector_scores(prefix, host, pre, v[None], c, 0, np.array([pos_index]))
    res = ascend(fn, grey.astype(np.float64), score_target=1.06 * tau0, accept=lambda *_: True,
                 max_steps=opts.max_steps, free_mask=mask, radius_weight=0.0)
    frame = quantise(res.pixels)
    return Patch(frame[top : top + ph, left : left + pw].copy(), top, left), res.steps




