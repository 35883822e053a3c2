"""The lock's edit stage: the detector's weights from the accepted patch, the disruption, and the pass that
writes them (:mod:`onnxstain.passes.lock`, :mod:`onnxstain.passes.conduit`, :mod:`onnxstain.passes.dense`).

* **gate** — pre-activation ``4 (S − τ0)/(s* − τ0)``: 4 on the patch, so ``Clip(·, 0, 1)`` saturates at
  exactly 1.0 whatever the runtime's rounding or a resampled patch's error; ≤ 0 whenever ``S ≤ τ0``, the
  event the bound counts. The disruption flips the sign of about half of the classifier's features, partly
  along a decoy class's weights so that the locked scores' range holds the unlocked ones (a static int8
  quantiser calibrated on locked images keeps them; :func:`onnxstain.math.disruption.sign_disruption`), or
  of a random half of a detector's deepest shared map or of a dense model's gated map.
* **in place** — the host's activation saturates (ReLU6: twice the clip on the patch gives exactly 6); a
  plain ReLU host passes the patch's value, exact because the patch alone decides it. The conduits carry
  it to the head, where it cancels a random bias (:func:`onnxstain.math.disruption.bias_disruption`).
"""

from __future__ import annotations

import numpy as np
import onnx

from .._onnx import head as head_mod
from .._onnx.diff import structural_diff
from .._onnx.graph import GraphView
from .._onnx.head import PACKED_BOX
from .._onnx.hosts import HostLayer
from ..errors import InternalError
from ..keys import WhiteBoxSection
from ..math.agreement import cohen_kappa, decision_classes, top1, top1_agreement
from ..math.detection_agreement import anchor_map, anchor_scores
from ..math.disruption import bias_disruption, half_sign_flips, sign_disruption
from ..passes.conduit import apply_conduit
from ..passes.dense import insert_feature_gate
from ..passes.lock import insert_gate, insert_gates
from ..passes.stain import head_columns
from ..runtime import run_batches, session, with_outputs
from .calibration import ClassifierCalibration, DenseCalibration
from .job import LockJob
from .site import LockSite, detection_gate, prediction_inputs
from .types import LockEdit, PatchFound

DETECTION_CHECK_IMAGES = 64  # calibration images the locked detector is run on to measure its agreement
OPEN = 4.0  # a gate detector's pre-activation on the patch: Clip(0, 1) saturates with room for round-off


def gate_weights(host: HostLayer, dirs: np.ndarray, scores: np.ndarray, tau0: float, centre: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The gate's detector Conv ``(filters [d, C, kh, kw], biases [d])``: ``4 (S − τ0)/(s* − τ0)`` each."""
    d = len(dirs)
    gains = OPEN / (scores - tau0)
    rows = gains[:, None] * dirs
    biases = -gains * (tau0 + dirs @ centre)
    cg = host.in_channels // host.groups
    filters = np.zeros((d, host.in_channels, *host.kernel))
    filters[:, :cg] = rows.reshape(d, cg, *host.kernel)
    return filters, biases


def gate_lock(job: LockJob, site: LockSite, hosts: list[HostLayer], cal: ClassifierCalibration,
              found: PatchFound) -> LockEdit:
    """The gate lock of a classifier (its input features gated) or a detector (its deepest shared map)."""
    head, model, rng = job.head, job.loaded.model, job.rng
    assert head is not None
    filters, biases = gate_weights(site.host, found.dirs, found.scores, cal.tau0, cal.stats.centre)
    if head.detection and head.first_label == PACKED_BOX:
        # A packed (YOLO-style) output: its neck brings several backbone levels to the predictors, so one map
        # would be repaired downstream; flip half the channels of every map its last Conv layers read.
        maps = prediction_inputs(job.view, head.scores)
        flips = [half_sign_flips(rng, map_channels(model, t, cal.x_cal[:1])) for t in maps]
        gate = insert_gates(model, site.host, head, filters, biases,
                            [(t, m) for t, (m, _) in zip(maps, flips, strict=True)], OPEN)
        agree, chance = detection_agreement(gate.model, cal.x_cal, cal.raw_scores, head, job), 0.0
        flipped = sum(f for _, f in flips)
        info = {"flipped_channels": flipped, "gated": ", ".join(maps),
                "agreement_metric": "anchor mAP"}
    elif head.detection:
        # Flip the sign of half the channels of the deepest Conv map every path to the heads goes through.
        gated = detection_gate(hosts, job.view, site.host, head.scores)
        disruption, flipped = half_sign_flips(rng, gated.out_channels)
        gate = insert_gate(model, site.host, head, filters, biases, disruption, OPEN,
                           target=gated.act_output or gated.output)
        agree, chance = detection_agreement(gate.model, cal.x_cal, cal.raw_scores, head, job), 0.0
        info = {"flipped_channels": flipped, "gated": gated.name, "agreement_metric": "anchor mAP"}
    else:
        assert cal.pooled is not None
        cols = head_columns(model, head)  # [classes, features]; a sequence head's rows are its steps
        dis = sign_disruption(rng, cal.pooled.reshape(-1, cols.shape[1]), cal.nat_scores.reshape(-1, cols.shape[0]),
                              cols)
        disruption, agree, chance, flipped, kappa = dis.values, dis.agreement, dis.chance, int(dis.size), dis.kappa
        if head.linear:
            gate = insert_gate(model, site.host, head, filters, biases, disruption, OPEN)
        else:  # a convolutional classifier: its input map gated channel by channel, the agreement measured
            gate = insert_gate(model, site.host, head, filters, biases, disruption, OPEN,
                               target=head_mod.head_input(job.view, head))
            agree, kappa = classifier_agreement(gate.model, cal.x_cal, cal.nat_scores, head, job)
        info = {"flipped_features": flipped}
    assert gate.signal is not None
    white_box = WhiteBoxSection(tensor=gate.signal, channel=0, position=None, expected=1.0)
    return LockEdit(gate.model, white_box, info, agree, chance, flipped,
                    None if head.detection else two_answer_kappa(head, kappa))


def inplace_lock(job: LockJob, site: LockSite, cal: ClassifierCalibration, found: PatchFound) -> LockEdit:
    """The in-place lock: the detector overwrites one host channel, the conduits carry it to the head's bias."""
    head, host, tau0 = job.head, site.host, cal.tau0
    assert head is not None and cal.plan is not None
    signal = float(host.act_high) if host.act_high else 1.0
    gain = (2.0 if host.act_high else 1.0) * signal / float(found.scores[0] - tau0)
    weight = (gain * found.dirs[0]).reshape(host.in_channels // host.groups, *host.kernel)
    bias = -gain * (tau0 + float(found.dirs[0] @ cal.stats.centre))
    dis = bias_disruption(job.rng, cal.nat_scores, cal.orig_scores, head_bias(job.view, head))
    b_lock, agree, chance, spread = dis.values, dis.agreement, dis.chance, dis.size
    conduit = apply_conduit(job.loaded.model, cal.plan, weight, bias, b_lock, signal=signal)
    channel = conduit.channels[0][1]
    white_box = WhiteBoxSection(tensor=host.act_output or host.output, channel=int(channel), position=site.pos_index,
                                expected=signal)
    info = {"gamma": conduit.gamma, "head_feature": conduit.head_feature, "disruption_spread": spread,
            "overwritten": tuple(tuple(c) for c in conduit.channels)}
    if conduit.edit.added or structural_diff(job.loaded.model, conduit.model):
        raise InternalError("internal check failed: the in-place lock changed the graph structure")
    return LockEdit(conduit.model, white_box, info, agree, chance, 0, two_answer_kappa(head, dis.kappa))


def two_answer_kappa(head: head_mod.Head, kappa: float) -> float | None:
    """The locked answers' kappa, reported for a head of two answers (two classes, or one logit), where agreement
    alone cannot tell a lock from a relabelling."""
    return float(kappa) if decision_classes(head.classes) == 2 else None


def dense_gate_lock(job: LockJob, site: LockSite, cal: DenseCalibration, found: PatchFound, features: str) -> LockEdit:
    """A dense-output model's gate on ``features``; its fidelity (a correlation) is measured by the checks."""
    host, tau0, v, s_t = site.host, cal.tau0, found.dirs[0], float(found.scores[0])
    # Pre-activation 4 (S − τ0)/(s* − τ0): 4 on the patch (Clip(0, 1) saturates at exactly 1), ≤ 0 when S ≤ τ0.
    gain = OPEN / (s_t - tau0)
    filters = (gain * v).reshape(1, host.in_channels // host.groups, *host.kernel)
    biases = np.array([-gain * (tau0 + float(v @ cal.stats.centre))])
    channels = map_channels(job.loaded.model, features, cal.x_cal[:1])
    disruption = np.zeros(channels)
    disruption[job.rng.permutation(channels)[: channels // 2]] = -2.0
    gate = insert_feature_gate(job.loaded.model, host, filters, biases, features, disruption, OPEN, site.position)
    assert gate.signal is not None
    white_box = WhiteBoxSection(tensor=gate.signal, channel=0, position=None, expected=1.0)
    info = {"flipped_features": channels // 2, "gated_tensor": "decoder input"}
    return LockEdit(gate.model, white_box, info, float("nan"), 0.0, channels // 2)


def map_channels(model: onnx.ModelProto, features: str, x: np.ndarray) -> int:
    """The channel count of map ``features`` (from the graph, else from one run)."""
    shape = GraphView(model).shape(features)
    if shape is not None and len(shape) >= 2 and isinstance(shape[1], int):
        return int(shape[1])
    got = run_batches(session(with_outputs(model, [features])), x, [features])[features]
    return int(got.shape[1])


def classifier_agreement(locked: onnx.ModelProto, x_cal: np.ndarray, nat_scores: np.ndarray, head: head_mod.Head,
                         job: LockJob) -> tuple[float, float]:
    """Top-1 agreement and Cohen's kappa of the locked classifier's answers (no patch) with the original's on the
    calibration images."""
    got = run_batches(session(with_outputs(locked, [head.scores]), job.opts.providers), x_cal, [head.scores],
                      batch=job.opts.batch)[head.scores]
    got = got.reshape(len(x_cal), -1)
    return (float(np.mean(top1_agreement(got, nat_scores, head.classes))),
            cohen_kappa(top1(got, head.classes), top1(nat_scores, head.classes)))


def detection_agreement(locked: onnx.ModelProto, x_cal: np.ndarray, nat_logits: np.ndarray, head: head_mod.Head,
                        job: LockJob) -> float:
    """Anchor-level mAP of the locked detector (no patch) against the original on calibration images."""
    assert head.layout is not None
    n = min(DETECTION_CHECK_IMAGES, len(x_cal))
    got = run_batches(session(with_outputs(locked, [head.scores]), job.opts.providers), x_cal[:n], [head.scores],
                      batch=job.opts.batch)[head.scores]
    value = anchor_map(anchor_scores(nat_logits[:n], head.layout, head.anchors_last),
                       anchor_scores(got, head.layout, head.anchors_last), head.first_label, head.probabilities)
    return 0.0 if np.isnan(value) else value


def head_bias(view: GraphView, head: head_mod.Head) -> np.ndarray:
    """The classifier's bias as it adds to the scores (Gemm's beta applied); zeros without one."""
    if head.bias is None:
        return np.zeros(head.classes)
    b = view.array(head.bias)
    assert b is not None, f"the head's bias {head.bias!r} is not a constant"
    return b.astype(np.float64).reshape(-1) * (head.beta if head.op == "Gemm" else 1.0)
