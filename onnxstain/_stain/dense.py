"""Staining a model with a dense output (e.g. a ViT saliency model): inserted detector, pattern signature.

Called by :func:`onnxstain._stain.pipeline.stain` when the prepared job (:mod:`onnxstain._stain.job`) has no
classifier head but one map output ``[B, C, H, W]``; the search is :mod:`onnxstain._stain.trigger_search`'s.
Differences from the classifier stain:

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
from typing import Any

import numpy as np
import onnx

from .._onnx.dense import DenseOutput
from .._onnx.hosts import GELU_ZERO, HostLayer
from ..calibration import selected_positions
from ..errors import BadModelError, InternalError
from ..keys import CalibrationSection, HostSection, Key, ModelSection, SignatureSection, WhiteBoxSection
from ..math import bounds, detector
from ..passes.dense import insert_dense_stain
from ..runtime import run_batches, session, with_outputs
from ..signature import dense_pattern, map_agreement, pearson
from .hosts import choose_dense_host, dense_hosts
from .job import CalibrationPass, StainJob, calibration_pass, detector_section, host_fields, stain_key, write
from .result import StainResult
from .trigger_search import DenseRescore, TriggerFind, TriggerSearch

__all__ = ["choose_dense_host", "dense_hosts", "stain_dense"]

DELTA = 2.0  # detector pre-activation on the trigger: GELU(2) = 1.95, so Clip(0, 1) gives exactly 1
PATTERN_BLOCK = 16  # side of the pattern's ±1 tiles, in output pixels (at most; see pattern_block)
PATTERN_TILES = 4  # at least this many tiles along each side of the map
PATTERN_THRESHOLD = 0.5  # verify: the trigger's map correlates with the pattern at least this much
CHECK_IMAGES = 64


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


def stain_dense(job: StainJob, images: Any) -> StainResult:
    """The dense stain of a prepared job (its ``dense`` output set): calibrate, search, edit, check, write."""
    dense = _dense(job)
    job.clock.lap("load")
    cal, dense, nat_out = _calibrate(job, images, dense)
    tau0 = bounds.threshold_for_target(job.opts.fpr, cal.radius, job.host.m, positions=job.host.positions,
                                       draws=job.opts.max_draws)
    sel = selected_dense_positions(job.host)
    job.clock.lap("calibration")
    search = TriggerSearch(job, cal, job.host, tau0, sel, DenseRescore(cal, job.host, job.pre, job.opts.providers))
    find = search.find_all()[0]
    job.clock.lap("trigger_search")
    edit = _edit(job, cal, find, tau0, dense, nat_out)
    job.clock.lap("edit")
    checked = _check(job, cal, find, edit)
    job.clock.lap("checks")
    digest = write(job, edit.model, lambda sha: _key(job, cal, find, sel, edit, checked, sha))
    return StainResult(
        output=job.output, key_path=job.key_path, record_path=job.record, host=job.host.name, channel=None,
        mode="insert", variant="non-additive", bound=edit.bound, threshold=tau0, trigger_score=find.s_star,
        signature_type="pattern", signature_class=-1, signature_margin=checked.trigger_correlation,
        natural_max_score=float(find.natural.max()), natural_firings=checked.natural_firings,
        natural_samples=int(find.natural.size), calibration_images=len(cal.inputs), agreement=checked.fidelity,
        max_abs_delta=checked.max_abs_delta, draws=find.draws, search_steps=search.steps,
        timings=job.clock.timings, notes=job.notes, model_sha256=digest)


def _dense(job: StainJob) -> DenseOutput:
    if job.dense is None:
        raise InternalError("internal check failed: the dense stain ran on a model without a dense output")
    return job.dense


def _map_shape(dense: DenseOutput) -> tuple[int, int, int]:
    """The dense output's ``(C, H, W)``, known once the calibration pass has run the model."""
    if dense.shape is None:
        raise InternalError(f"internal check failed: the shape of the dense output {dense.output} is unknown")
    return dense.shape


def _calibrate(job: StainJob, images: Any, dense: DenseOutput) -> tuple[CalibrationPass, DenseOutput, np.ndarray]:
    """The calibration pass with the map output tapped; a token host learns its token count from it."""
    cal = calibration_pass(job, images, [job.host.input, dense.output])
    if job.host.op != "Conv":
        job.host = dataclasses.replace(job.host, tokens=int(cal.phi.shape[1]))
    nat_out = cal.outputs.pop(dense.output)
    if nat_out.ndim != 4:
        raise BadModelError(f"the output {dense.output} has shape {list(nat_out.shape)} when run; "
                            "the graph gives it four dimensions")
    _, c, h, w = (int(d) for d in nat_out.shape)
    return cal, dataclasses.replace(dense, shape=(c, h, w)), nat_out


@dataclasses.dataclass
class _Edit:
    """The inserted detector and pattern."""

    model: onnx.ModelProto
    gamma: str  # the detector's output tensor (1 on the trigger, 0 on natural inputs)
    neuron: detector.NeuronEdit
    tau0: float
    pattern_seed: int
    block: int
    amplitude: float
    unit: np.ndarray  # the ±1 pattern [C, H, W]
    bound: bounds.Bound


def _edit(job: StainJob, cal: CalibrationPass, find: TriggerFind, tau0: float, dense: DenseOutput,
          nat_out: np.ndarray) -> _Edit:
    host = job.host
    ed = detector_weights(find.direction, cal.stats.centre, tau0, find.s_star, host.gelu)
    stored_w = ed.weights.astype(np.float32).astype(np.float64)
    stored_b = float(np.float32(ed.bias))
    # float32 storage moves the pre-activation by at most ‖Δw‖R + |Δw·c + Δb| on the calibrated ball;
    # the gap between GELU_ZERO and the last non-zero GELU input (−5.54) absorbs it, as the ReLU's
    # zero does not: check it rather than assume it.
    shift = float(np.linalg.norm(stored_w - ed.weights) * cal.radius
                  + abs(float((stored_w - ed.weights) @ cal.stats.centre) + stored_b - ed.bias))
    if host.gelu and shift > 0.4:
        raise InternalError(f"internal check failed: float32 storage moves the detector by {shift:.3g}")
    pattern_seed = int(job.rng.integers(2**31))
    block = pattern_block(_map_shape(dense))
    unit = dense_pattern(pattern_seed, _map_shape(dense), block)
    amplitude = pattern_amplitude(_logit_scale(nat_out, dense), _trigger_logits(job, find, dense), dense.squashed)
    stained = insert_dense_stain(job.loaded.model, host, dense, ed.weights, ed.bias, amplitude * unit)
    assert stained.signal is not None
    bound = bounds.ball_bound(tau0, cal.radius, host.m, positions=host.positions, draws=job.opts.max_draws)
    return _Edit(model=stained.model, gamma=stained.signal, neuron=ed, tau0=tau0, pattern_seed=pattern_seed,
                 block=block, amplitude=amplitude, unit=unit, bound=bound)


@dataclasses.dataclass
class _Checked:
    trigger_correlation: float  # the stained model's map on the trigger against the pattern
    original_correlation: float  # the original model's
    fidelity: float  # mean correlation of natural maps with the original's
    max_abs_delta: float
    natural_firings: int


def _check(job: StainJob, cal: CalibrationPass, find: TriggerFind, edit: _Edit) -> _Checked:
    """The detector gives exactly 1 on the trigger and 0 on natural images (whose maps are bit-identical to
    the original model's, both run as written: the calibration pass ran the folded analysis copy), and the
    trigger's map shows the pattern where the original's does not."""
    output, providers = _dense(job).output, job.opts.providers
    n_check = min(CHECK_IMAGES, len(cal.inputs))
    check = session(with_outputs(edit.model, [output, edit.gamma]), providers)
    trig_input = job.pre.to_input(find.pixels)
    batch = np.concatenate([trig_input, cal.inputs[:n_check]])
    got = run_batches(check, batch, [output, edit.gamma])
    out, sig = got[output], got[edit.gamma].reshape(-1)
    original = run_batches(session(job.loaded.model, providers), batch, [output])[output]
    orig_trig, nat_out = original[:1], original[1:]
    if sig[0] != 1.0:
        raise InternalError(f"internal check failed: the detector gives {sig[0]:.4g} on the trigger (want 1)")
    if np.any(sig[1:] != 0.0) or not np.array_equal(out[1:], nat_out[:n_check]):
        raise InternalError("internal check failed: natural outputs of the stained model are not "
                            "bit-identical to the original's")
    trig_corr = float(pearson(out[:1], edit.unit[None])[0])
    orig_corr = float(pearson(orig_trig, edit.unit[None])[0])
    if trig_corr < 0.9 or abs(orig_corr) >= PATTERN_THRESHOLD / 2:
        raise InternalError(f"internal check failed: pattern correlation {trig_corr:.3g} on the trigger, "
                            f"{orig_corr:.3g} for the original model")
    return _Checked(trigger_correlation=trig_corr, original_correlation=orig_corr,
                    fidelity=float(map_agreement(out[1:], nat_out[:n_check]).mean()),
                    max_abs_delta=float(np.abs(out[1:] - nat_out[:n_check]).max()),
                    natural_firings=int((find.natural > edit.tau0).sum()))


def _key(job: StainJob, cal: CalibrationPass, find: TriggerFind, sel: np.ndarray, edit: _Edit, checked: _Checked,
         digest: str) -> Key:
    host, dense = job.host, _dense(job)
    c, h, w = (int(d) for d in edit.unit.shape)  # job.dense may not know it: the calibration pass measured it
    return stain_key(
        job, find.pixels,
        model=ModelSection(source_sha256=job.loaded.sha256, output_sha256=digest, input=job.view.graph_inputs[0].name,
                           scores=dense.output, classes=c * h * w, dense_shape=(c, h, w)),
        mode="insert",
        variant="non-additive",
        host=HostSection(**host_fields(host, sel), output=edit.gamma, channel=0, host_channel=None, group=0,
                         activation=host.activation),
        detector=detector_section(find.direction, cal.stats.centre, find.phi, find.scores, threshold=edit.tau0,
                                  tau0=edit.tau0, s_star=find.s_star, gain=edit.neuron.gain, delta=DELTA,
                                  offset=GELU_ZERO if host.gelu else 0.0, draws=find.draws,
                                  max_draws=job.opts.max_draws),
        signature=SignatureSection(type="pattern", cls=-1, pattern_seed=edit.pattern_seed, block=edit.block,
                                   amplitude=edit.amplitude, expected_margin=checked.trigger_correlation,
                                   threshold=PATTERN_THRESHOLD, original_margin=checked.original_correlation),
        white_box=WhiteBoxSection(tensor=edit.gamma, channel=0, expected=1.0, threshold=0.5, positions=(0,)),
        bound=edit.bound,
        calibration=CalibrationSection.of(cal.stats, len(cal.inputs), cal.radius, find.natural,
                                          checked.natural_firings, job.opts.fpr),
    )


def pattern_amplitude(natural_scale: float, trigger_logits: np.ndarray, squashed: bool) -> float:
    """The pattern's amplitude in logits: twice the natural logit scale (the pattern stands out against any
    natural map), and large enough that the trigger's own map cannot hide it. Behind a Sigmoid, every pixel
    of the trigger's map must land on the pattern's side by a margin of 8 logits (σ saturates within 3e-4
    of 0 or 1, so the map correlates with the ±1 pattern at ≈ 1 whatever the trigger's logits were — an
    optimised trigger can drive a text or saliency map far beyond the natural 99th percentile); without
    one, three times the trigger's largest logit keeps the correlation above 0.9."""
    peak = float(np.abs(trigger_logits.astype(np.float64)).max()) if trigger_logits.size else 0.0
    needed = peak + 8.0 if squashed else 3.0 * peak
    return float(max(12.0, 2.0 * natural_scale, needed))


def _trigger_logits(job: StainJob, find: TriggerFind, dense: DenseOutput) -> np.ndarray:
    """The original model's logits (before the final Sigmoid, if any) on the trigger."""
    sess = session(with_outputs(job.loaded.model, [dense.logits]), job.opts.providers)
    return run_batches(sess, job.pre.to_input(find.pixels), [dense.logits])[dense.logits]


def _logit_scale(nat_out: np.ndarray, dense: DenseOutput) -> float:
    """The 99th percentile of |logit| on natural outputs (inverse sigmoid of the map when squashed)."""
    y = nat_out.astype(np.float64)
    if dense.squashed:
        y = np.clip(y, 1e-7, 1 - 1e-7)
        y = np.log(y / (1 - y))
    return float(np.quantile(np.abs(y), 0.99))
