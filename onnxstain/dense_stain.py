"""Staining a model with a dense output (e.g. a ViT saliency model): inserted detector, pattern signature.

Called by :func:`onnxstain.stainer.stain` when the model has no classifier head but one map output
``[B, C, H, W]``. Differences from the classifier stain:

* **host** — a token layer: ``MatMul + Add`` on ``[B, T, m]`` followed by GELU (or ReLU); every token
  is a position (the bound counts them all, ``T`` is read from the calibration pass);
* **signature** — on the trigger the output shows a secret ±1 tile pattern: the Pearson correlation of
  the output map with the pattern is high, while the original model's (and the controls') is near 0;
* **mode** — insert only: the detector and the pattern are new nodes and natural outputs are
  bit-identical (checked). In-place routing would have to carry a detector through attention, the
  decoder's transposed convolutions and resizes, which has no exact route: it is refused.
* **GELU** — float32 GELU is exactly 0 for pre-activations ≤ −6 (:data:`GELU_ZERO`): the detector's
  pre-activation is ``g (S − τ) − 6`` with ``g`` chosen so that the trigger gives ``DELTA``. It is
  non-zero only when ``S > τ + 0.46/g``, inside the event ``S > τ`` the bound counts.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from ._onnx.dense import DenseOutput
from ._onnx.graph import GraphView
from ._onnx.hosts import GELU_ZERO, MIN_DIMENSION, HostLayer, find_hosts
from ._onnx.io import LoadedModel
from .calibration import (
    ACCEPT_FACTOR,
    SEARCH_FACTOR,
    calibration_pixels,
    natural_radius,
    refuse_underflowing_target,
    selected_positions,
)
from .errors import BadInputError, InternalError, UnreachableBoundError, UnsupportedModelError
from .features import neuron_inputs
from .keys import (
    F8,
    CalibrationSection,
    DetectorSection,
    HostSection,
    Key,
    ModelSection,
    SignatureSection,
    TriggerSection,
    WhiteBoxSection,
    encode_png,
    envelope,
)
from .math import bounds, detector
from .math.trigger import ascend, quantise
from .outputs import Artefacts, write_unit
from .passes.dense import insert_dense_stain
from .preprocess import Preprocessing
from .progress import Progress
from .runtime import run_batches, session, with_outputs
from .scoring import detector_scores
from .signature import dense_pattern, pearson

DELTA = 2.0  # detector pre-activation on the trigger: GELU(2) = 1.95, so Clip(0, 1) gives exactly 1
PATTERN_BLOCK = 16  # side of the pattern's ±1 tiles, in output pixels (at most; see pattern_block)
PATTERN_TILES = 4  # at least this many tiles along each side of the map
PATTERN_THRESHOLD = 0.5  # verify: the trigger's map correlates with the pattern at least this much
CHECK_IMAGES = 64


def refuse_mode(opts) -> None:
    if opts.mode != "insert":
        raise UnsupportedModelError(
            "this model has a dense output and no classifier head: an in-place stain would have to route the "
            "detector through attention and the decoder, which has no exact route; use --mode insert")
    if opts.variant != "non-additive":
        raise UnsupportedModelError("dense-output models take the non-additive inserted stain only "
                                    "(--variant non-additive)")


def dense_hosts(hosts: list[HostLayer]) -> list[HostLayer]:
    """Hosts a dense-output model's inserted detector can read: token layers (``MatMul + Add`` on
    ``[B, T, m]``) and convolutions with a known output size."""
    return [h for h in hosts if h.usable and (h.op == "MatMul" or (h.op == "Conv" and h.out_hw is not None))]


def choose_dense_host(hosts: list[HostLayer], layer: str | None) -> HostLayer:
    usable = dense_hosts(hosts)
    if layer is not None:
        match = [h for h in hosts if h.name == layer]
        if not match:
            raise BadInputError(f"no layer named {layer!r} (see `onnxstain inspect`)")
        if match[0] not in usable:
            raise UnsupportedModelError(f"layer {layer!r} cannot host a detector: "
                                        f"{match[0].reason or 'not a token layer or a convolution'}")
        return match[0]
    if not usable:
        reasons = sorted({h.reason for h in hosts if h.reason})
        raise UnsupportedModelError(
            "the model has no usable host layer (a Conv, or a MatMul+Add token layer, followed by a ReLU-type "
            f"activation or GELU, with at least {MIN_DIMENSION} inputs per neuron)"
            + (f"; the candidates fail because: {'; '.join(reasons[:3])}" if reasons else ""))
    return max(usable, key=lambda h: (h.depth, h.m))


def selected_dense_positions(host: HostLayer) -> np.ndarray:
    """Where the trigger must fire: the centre token of a ViT, or the central position(s) of a conv map."""
    if host.op == "Conv":

        return selected_positions(host)
    return selected_tokens(host.positions)


def selected_tokens(tokens: int) -> np.ndarray:
    """The one token the trigger must fire at: the centre patch token (CLS + g×g grid), else the middle."""
    g = round(float(np.sqrt(tokens - 1)))
    if g * g == tokens - 1:
        return np.array([1 + (g // 2) * g + g // 2])
    return np.array([tokens // 2])


def pattern_block(shape: tuple[int, int, int]) -> int:
    """Tile side of the ±1 pattern: ``PATTERN_BLOCK`` output pixels, smaller on small maps so that each
    side has at least ``PATTERN_TILES`` tiles (a map of one tile would be flat and correlate with nothing)."""
    return max(1, min(PATTERN_BLOCK, min(shape[1], shape[2]) // PATTERN_TILES))


def detector_weights(v: np.ndarray, c: np.ndarray, tau: float, s_star: float, gelu: bool) -> detector.NeuronEdit:
    """Pre-activation ``g (S − τ) + offset``: ``DELTA`` at the trigger's weakest selected position, and for
    GELU hosts at most ``GELU_ZERO`` (output exactly 0) whenever ``S ≤ τ``."""
    offset = GELU_ZERO if gelu else 0.0
    g = (DELTA - offset) / (s_star - tau)
    return detector.NeuronEdit(weights=g * v, bias=-g * (tau + float(v @ c)) + offset, gain=g, threshold=tau,
                               delta=DELTA)


def stain_dense(loaded: LoadedModel, dense: DenseOutput, out_path: Path, key_path: Path, record: Path, opts,
                pre: Preprocessing, notes: list[str], images, prog: Progress, t0: float,
                artefacts: Artefacts | None = None):
    from .stainer import StainResult

    refuse_mode(opts)
    timings: dict[str, float] = {}
    view = GraphView(loaded.model, pre.input_shape())
    host = choose_dense_host(find_hosts(loaded.model, view), opts.layer)
    refuse_underflowing_target(opts.fpr, host, opts.max_draws)
    seed = opts.seed if opts.seed is not None else int(np.random.SeedSequence().entropy % (2**63))
    rng = np.random.default_rng(seed)
    timings["load"] = time.perf_counter() - t0

    # -- calibration ---------------------------------------------------------------------------------
    t1 = time.perf_counter()
    pixels = calibration_pixels(images, pre, prog)
    x_cal = pre.to_input(pixels)
    taps = [host.input, dense.output]
    sess = session(with_outputs(loaded.model, taps), opts.providers)
    with prog.task("calibration pass", total=len(x_cal)) as task:
        cal = run_batches(sess, x_cal, taps, batch=opts.batch, progress=task.advance)
    phi_all = neuron_inputs(host, cal[host.input])
    if host.op != "Conv":
        host = dataclasses.replace(host, tokens=int(phi_all.shape[1]))
    nat_out = cal[dense.output]
    del cal
    dense = dataclasses.replace(dense, shape=tuple(int(d) for d in nat_out.shape[1:]))
    stats = detector.FeatureStats.from_features(phi_all)
    radius = natural_radius(stats.max_radius, host)
    tau0 = bounds.threshold_for_target(opts.fpr, radius, host.m, positions=host.positions, draws=opts.max_draws)
    sel = selected_dense_positions(host)
    timings["calibration"] = time.perf_counter() - t1

    # -- directions and trigger search ---------------------------------------------------------------
    t2 = time.perf_counter()
    import torch

    from .torchprefix import prefix_for_input

    torch.manual_seed(seed % (2**31))
    prefix = None
    target = SEARCH_FACTOR * tau0
    weights = np.full(host.positions, opts.max_draws)

    def cross_ok(_smin: float, radii: np.ndarray) -> bool:
        return bounds.cross_key_bound(radii, tau0, host.m, positions_weight=weights).value <= opts.fpr

    accepted = None
    steps_total = draws = 0
    with prog.task("trigger search", total=None) as task:
        for draw in range(1, opts.max_draws + 1):
            draws = draw
            v = detector.sample_direction(rng, host.m)
            s_nat = detector.scores(phi_all, v, stats.centre)
            if float(s_nat.max()) >= 0.5 * tau0:
                notes.append(f"draw {draw}: natural scores reach {s_nat.max():.3g} ≥ τ0/2; direction rejected")
                continue
            init = pixels[int(np.argmax(s_nat[:, sel].min(axis=1)))].astype(np.float64)
            if prefix is None:
                # shape-only parts (a ViT's resized position embedding) are constants at this input size
                prefix = prefix_for_input(loaded.model, [host.input], pre.input_shape(), opts.providers)
            fn = detector_scores(prefix, host, pre, v[None], stats.centre, 0, sel)

            def report(step, smin, task=task, draw=draw):
                task.update(f"trigger search (draw {draw}): step {step}, score {smin:.2f} / {target:.2f}")

            res = ascend(fn, init, score_target=target, accept=cross_ok, max_steps=opts.max_steps, progress=report)
            steps_total += res.steps
            trig = quantise(res.pixels)
            phi_t = neuron_inputs(host, run_batches(sess, pre.to_input(trig), [host.input])[host.input])[0]
            s_t = detector.scores(phi_t, v, stats.centre)
            s_star = float(s_t[sel].min())
            if s_star < ACCEPT_FACTOR * tau0:
                notes.append(f"draw {draw}: the 8-bit trigger reached {s_star:.3g} < {ACCEPT_FACTOR} τ0; resampled")
                continue
            accepted = (v, trig, phi_t, s_t, s_star, s_nat)
            break
    if accepted is None:
        raise UnreachableBoundError(
            f"no trigger reached the margin needed for --fpr {opts.fpr:g} at layer {host.name} (τ0/R = "
            f"{tau0 / radius:.2f}) within {opts.max_draws} draws; try another --seed, --layer or a larger --fpr")
    v, trig, phi_t, s_t, s_star, s_nat = accepted
    prefix = fn = None
    timings["trigger_search"] = time.perf_counter() - t2

    # -- edit ------------------------------------------------------------------------------------------
    t3 = time.perf_counter()
    ed = detector_weights(v, stats.centre, tau0, s_star, host.gelu)
    stored_w = ed.weights.astype(np.float32).astype(np.float64)
    stored_b = float(np.float32(ed.bias))
    # float32 storage moves the pre-activation by at most ‖Δw‖R + |Δw·c + Δb| on the calibrated ball;
    # the gap between GELU_ZERO and the last non-zero GELU input (−5.54) absorbs it, as the ReLU's
    # zero does not: check it rather than assume it.
    shift = float(np.linalg.norm(stored_w - ed.weights) * radius
                  + abs(float((stored_w - ed.weights) @ stats.centre) + stored_b - ed.bias))
    if host.gelu and shift > 0.4:
        raise InternalError(f"internal check failed: float32 storage moves the detector by {shift:.3g}")
    pattern_seed = int(rng.integers(2**31))
    block = pattern_block(dense.shape)
    unit = dense_pattern(pattern_seed, dense.shape, block)
    logit_scale = _logit_scale(nat_out, dense)
    amplitude = float(max(12.0, 2.0 * logit_scale))
    stained, gamma = insert_dense_stain(loaded.model, host, dense, ed.weights, ed.bias, amplitude * unit)
    bound = bounds.ball_bound(tau0, radius, host.m, positions=host.positions, draws=opts.max_draws)
    timings["edit"] = time.perf_counter() - t3

    # -- checks ----------------------------------------------------------------------------------------
    t4 = time.perf_counter()
    n_check = min(CHECK_IMAGES, len(x_cal))
    check = session(with_outputs(stained, [dense.output, gamma]), opts.providers)
    got = run_batches(check, np.concatenate([pre.to_input(trig), x_cal[:n_check]]), [dense.output, gamma])
    out, sig = got[dense.output], got[gamma].reshape(-1)
    if sig[0] != 1.0:
        raise InternalError(f"internal check failed: the detector gives {sig[0]:.4g} on the trigger (want 1)")
    if np.any(sig[1:] != 0.0) or not np.array_equal(out[1:], nat_out[:n_check]):
        raise InternalError("internal check failed: natural outputs of the stained model are not "
                                    "bit-identical to the original's")
    orig_trig = run_batches(session(loaded.model, opts.providers), pre.to_input(trig), [dense.output])[dense.output]
    trig_corr = float(pearson(out[:1], unit[None])[0])
    orig_corr = float(pearson(orig_trig, unit[None])[0])
    if trig_corr < 0.9 or abs(orig_corr) >= PATTERN_THRESHOLD / 2:
        raise InternalError(f"internal check failed: pattern correlation {trig_corr:.3g} on the trigger, "
                                    f"{orig_corr:.3g} for the original model")
    fidelity = pearson(out[1:], nat_out[:n_check])
    natural_firings = int((s_nat > tau0).sum())
    timings["checks"] = time.perf_counter() - t4

    # -- save ------------------------------------------------------------------------------------------
    t5 = time.perf_counter()
    with write_unit(artefacts) as writer:  # staged, synced; key, record, then model renamed (outputs.py)
        digest = writer.stage_model(stained, out_path, source=loaded)
        key = Key(
            **envelope("stain"),
            model=ModelSection(source_sha256=loaded.sha256, output_sha256=digest, input=view.graph_inputs[0].name,
                               scores=dense.output, classes=int(np.prod(dense.shape)), dense_shape=tuple(dense.shape)),
            preprocessing=pre,
            mode="insert",
            variant="non-additive",
            seed=seed,
            host=HostSection(name=host.name, op=host.op, input=host.input, output=gamma, channel=0, host_channel=None,
                             group=0, m=host.m, positions=host.positions, selected_positions=tuple(int(p) for p in sel),
                             activation=host.activation, kernel=tuple(host.kernel), strides=tuple(host.strides),
                             pads=tuple(host.pads), dilations=tuple(host.dilations), groups=host.groups,
                             out_hw=tuple(host.out_hw) if host.out_hw else None),
            detector=DetectorSection(direction=F8.of(v), centre=F8.of(stats.centre), threshold=tau0, tau0=tau0,
                                     s_star=s_star, gain=ed.gain, delta=DELTA, offset=GELU_ZERO if host.gelu else 0.0,
                                     trigger_scores=F8.of(s_t),
                                     trigger_radii=F8.of(detector.radii(phi_t, stats.centre)),
                                     draws=draws, max_draws=opts.max_draws),
            trigger=TriggerSection(png=encode_png(trig), height=pre.height, width=pre.width),
            signature=SignatureSection(type="pattern", cls=-1, pattern_seed=pattern_seed, block=block,
                                       amplitude=amplitude, expected_margin=trig_corr, threshold=PATTERN_THRESHOLD,
                                       original_margin=orig_corr),
            white_box=WhiteBoxSection(tensor=gamma, channel=0, expected=1.0, threshold=0.5, positions=(0,)),
            bound=bound,
            calibration=CalibrationSection.of(stats, len(x_cal), radius, s_nat, natural_firings, opts.fpr),
        )
        writer.stage_key(key, key_path, record)
    timings["save"] = time.perf_counter() - t5
    timings["total"] = time.perf_counter() - t0
    return StainResult(
        output=out_path, key_path=key_path, record_path=record, host=host.name, channel=None, mode="insert",
        variant="non-additive", bound=bound, threshold=tau0, trigger_score=s_star, signature_type="pattern",
        signature_class=-1, signature_margin=trig_corr, natural_max_score=float(s_nat.max()),
        natural_firings=natural_firings, natural_samples=int(s_nat.size), calibration_images=len(x_cal),
        agreement=float(fidelity.mean()), max_abs_delta=float(np.abs(out[1:] - nat_out[:n_check]).max()),
        draws=draws, search_steps=steps_total, timings=timings, notes=notes, model_sha256=digest,
    )


def _logit_scale(nat_out: np.ndarray, dense: DenseOutput) -> float:
    """The 99th percentile of |logit| on natural outputs (inverse sigmoid of the map when squashed)."""
    y = nat_out.astype(np.float64)
    if dense.squashed:
        y = np.clip(y, 1e-7, 1 - 1e-7)
        y = np.log(y / (1 - y))
    return float(np.quantile(np.abs(y), 0.99))
