"""Deciding a stain's edit: which channel, which signature class, which weights and route.

Everything here works on arrays collected by the calibration pass and the trigger search; the
ONNX rewriting itself is in :mod:`onnxstain.passes.stain`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from .._onnx.graph import GraphView
from .._onnx.head import head_input
from .._onnx.hosts import HostLayer, layer_affine, neuron_affine, stored_layer
from .._onnx.io import LoadedModel
from ..errors import BadInputError, InternalError, UnsupportedModelError
from ..math import compensation, detector, outliers
from ..math.quantization import int8_head_agreement
from ..passes import stain as stain_pass
from ..signature import ScoreView
from .trigger_search import TriggerFind


def choose_channel(opts, host: HostLayer, head, loaded: LoadedModel, pooled: np.ndarray | None,
                    nat_scores: np.ndarray) -> int | None:
    """Data-aware choice of the host channel to overwrite (non-additive) or hide in (additive)."""
    if opts.channel is not None:
        if not 0 <= opts.channel < host.out_channels // host.groups:
            raise BadInputError(f"--channel must be in 0..{host.out_channels // host.groups - 1}")
        return opts.channel
    if opts.mode == "insert" and opts.variant == "non-additive":
        return None
    if opts.variant == "additive":
        return None  # chosen after the trigger search, where its response to the trigger is known
    if pooled is None:  # a detector's per-anchor head: the in-place routes refuse it before this
        raise InternalError("internal check failed: an in-place channel choice without pooled features")
    cols = stain_pass.head_columns(loaded.model, head)  # [K, F]
    in_group = np.arange(host.out_channels) < host.out_channels // host.groups  # φ is built for group 0
    # Non-additive: the overwritten channel's natural contribution is lost (its mean is compensated
    # through the classifier bias). Score candidates by the exact number of top-1 flips on the
    # calibration images, then by the largest score change.
    norms = np.linalg.norm(cols, axis=0)
    proxy = np.where(in_group, pooled.std(axis=0) * norms, np.inf)
    candidates = np.argsort(proxy)[: min(128, int(in_group.sum()))]
    base = nat_scores.argmax(1)
    keys = []
    for k in candidates:
        dev = np.outer(pooled[:, k] - pooled[:, k].mean(), cols[:, k])
        keys.append((float(np.sum((nat_scores - dev).argmax(1) != base)), float(np.abs(dev).max()), int(k)))
    keys.sort()
    if not can_compensate(host, head, GraphView(loaded.model)):
        return keys[0][2]
    # The loss is compensated from the other features (see build_edit): rank the best candidates by
    # their flips once compensated, cross-validated over the calibration images (ties: the plain loss).
    top = keys[:CV_CANDIDATES]
    flips = compensation.cross_validate(pooled, nat_scores, cols, np.array([k[2] for k in top])).flips
    return min(zip(flips.tolist(), top, strict=True))[1][2]


CV_CANDIDATES = 32  # channels whose compensated loss is cross-validated


def can_compensate(host: HostLayer, head, view: GraphView) -> bool:
    """Whether the non-additive in-place edit may compensate the lost feature through the classifier:
    a float classifier (int8 weights would all be re-encoded) and an ungrouped host (φ is per group)."""
    return host.groups == 1 and not view.is_quantized(head.weight)


def _group0_affine(view: GraphView, host: HostLayer) -> tuple[np.ndarray, np.ndarray]:
    rows, b = layer_affine(view, host)
    return rows[: host.out_channels // host.groups], b[: host.out_channels // host.groups]  # φ is group 0's


def _shift_strengths(host: HostLayer, rows: np.ndarray, b: np.ndarray, cols: np.ndarray, phi_t: np.ndarray,
                     sel: np.ndarray) -> np.ndarray:
    """Per neuron, how far its classifier column moves the scores when the trigger saturates it:
    ``‖col_k‖ (hi − act_k(trigger))``, the activation taken at its highest selected position."""
    own = phi_t[sel].astype(np.float64) @ rows.T + b  # [P, C / groups]
    hi = host.act_high if host.act_high is not None else 6.0
    return np.linalg.norm(cols, axis=0) * (hi - np.clip(_activate(host, own), 0.0, hi).max(axis=0))


def additive_channel(host: HostLayer, view: GraphView, head, phi_t: np.ndarray, sel: np.ndarray,
                      mode: str, model) -> int:
    """The working neuron to hide the detector in, given its response to the trigger.

    Insert mode: the neuron most clearly active on the trigger (through ReLU the detector's part
    then shows in full). In-place mode: the neuron whose classifier column moves the scores most when it
    saturates on the trigger (the shift signature), among neurons that are off on the trigger, whose column,
    row and bias no weight statistic exposes before the edit (the compensated in-place choice,
    :func:`additive_inplace_channel`, also ranks the row and bias after it).
    """
    rows, b = _group0_affine(view, host)
    if mode == "insert":
        own = phi_t[sel].astype(np.float64) @ rows.T + b
        return int(np.argmax(own.min(axis=0)))  # the most clearly active on the trigger
    all_cols = stain_pass.head_columns(model, head)
    gain = _shift_strengths(host, rows, b, all_cols[:, : len(b)], phi_t, sel)
    unexposed = _unexposed_channels(stored_layer(view, host), all_cols, len(b))
    return int(np.argmax(np.where(unexposed, gain, -np.inf)))


def additive_leaks(host: HostLayer, route, rows: np.ndarray, b: np.ndarray, kappa: np.ndarray,
                   s_nat: np.ndarray, phi: np.ndarray, dtype=np.float64) -> np.ndarray:
    """``Δ_k(x)``, ``[N, len(b)]``: how much each hosted channel's pooled feature changes on each image
    once the detector ``κ_k S`` is added to its pre-activation (``rows`` ``[C', m]``, ``s_nat`` ``[N, P]``
    the detector scores of ``phi`` ``[N, P, m]``). Exact, from the calibration taps; ``float32`` is
    enough to rank candidates and twice as fast."""
    n, p, m = phi.shape
    own = np.asarray(phi, dtype).reshape(n * p, m) @ np.asarray(rows, dtype).T
    own += np.asarray(b, dtype)
    new = np.asarray(s_nat, dtype).reshape(n * p, 1) * np.asarray(kappa, dtype)
    new += own
    new, own = _activate(host, new, out=new), _activate(host, own, out=own)
    new -= own
    return _pool(route, new.reshape(n, p, -1), axis=1).astype(np.float64)


def additive_inplace_channel(host: HostLayer, route, view: GraphView, head, model, v: np.ndarray,
                             c: np.ndarray, tau: float, delta: float, phi_t: np.ndarray, phi_all: np.ndarray,
                             sel: np.ndarray, pooled: np.ndarray, nat_scores: np.ndarray) -> tuple[int, bool]:
    """In place, additive, compensated classifier: the working neuron to hide the detector in, and whether
    it hides (its column, row and bias outside the top ``HIDING_FRACTION`` of their layers once edited).

    Candidates are the neurons whose shift signature (``‖col_k‖ (hi − act_k(trigger))``, as
    :func:`additive_channel`) is within ``ADDITIVE_GAIN_FLOOR`` of the strongest; the one with the
    fewest top-1 flips once its leak ``Δ_k`` is compensated, cross-validated over the calibration
    images, is chosen (ties: the smallest RMS change of the images' top-1 − runner-up gaps,
    cross-validated likewise).
    """
    rows, b = _group0_affine(view, host)
    all_cols = stain_pass.head_columns(model, head)
    cols = all_cols[:, : len(b)]
    stored = stored_layer(view, host)
    gain = np.where(_unexposed_channels(stored, all_cols, len(b)), _shift_strengths(host, rows, b, cols, phi_t, sel),
                    -np.inf)
    cands = np.flatnonzero(gain >= ADDITIVE_GAIN_FLOOR * gain.max())
    kappa = detector.additive_gains(rows[cands], b[cands], v, c, tau, phi_t[sel], delta)
    hidden = _hidden_after_edit(stored, cands, kappa, v, c)
    if hidden.any():  # else every candidate stands out once edited: the strongest signatures, as before
        cands, kappa = cands[hidden], kappa[hidden]
    s_nat = detector.scores(phi_all, v, c)
    leaks = np.empty((len(phi_all), len(cands)))
    for i in range(0, len(cands), LEAK_CHUNK):
        part = slice(i, i + LEAK_CHUNK)
        leaks[:, part] = additive_leaks(host, route, rows[cands[part]], b[cands[part]], kappa[part], s_nat, phi_all,
                                        dtype=np.float32)
    # Flips are few and coarse (most candidates have none); ties go to the smallest RMS change of the
    # top-1 − runner-up gap. Over every candidate (not only the strongest signatures) this picks
    # channels whose natural activity hides the leak: fewer held-out flips for a somewhat weaker shift.
    cv = compensation.cross_validate(pooled, nat_scores, cols, cands, changes=leaks)
    best = int(cands[min(range(len(cands)), key=lambda i: (int(cv.flips[i]), float(cv.decision_rms[i])))])
    return best, bool(hidden.any())


ADDITIVE_GAIN_FLOOR = 0.5  # additive in place: candidates keep ≥ half the strongest shift signature
HIDING_FRACTION = 2 * outliers.EXPOSED_FRACTION  # the hidden channel stays out of its layers' top 2 %
LEAK_CHUNK = 64  # candidates whose leaks are computed at once ([N·P, chunk] float32)
ADDITIVE_SATURATION = 1.02  # additive in place: the trigger drives the hidden neuron to 1.02 × its clip


def _unexposed_channels(stored: tuple[np.ndarray, ...], cols: np.ndarray, n: int) -> np.ndarray:
    """Per channel of group 0 (``n``): whether its classifier column (``cols`` ``[K, F]``), its host row and its
    host bias (``stored``, :func:`~onnxstain._onnx.hosts.stored_layer`) are all outside the top
    ``HIDING_FRACTION`` of their layers on every :mod:`~onnxstain.math.outliers` statistic. A thief who prunes
    the classifier's largest column, or the host's most extreme row, must not hit the stain."""
    rows, b = stored[0], stored[1]
    ok = ~outliers.exposed(cols.T, HIDING_FRACTION)[:n]
    ok &= ~outliers.exposed(rows, HIDING_FRACTION)[:n]
    ok &= ~outliers.exposed(b, HIDING_FRACTION)[:n]
    return ok if ok.any() else np.ones(n, bool)


def _hidden_after_edit(stored: tuple[np.ndarray, ...], cands: np.ndarray, kappa: np.ndarray, v: np.ndarray,
                       c: np.ndarray) -> np.ndarray:
    """Per candidate: whether its host row ``w + κ v`` and bias ``β − κ v·c``, as stored, stay outside the top
    ``HIDING_FRACTION`` of the layer (the detector's part must not make the row stand out)."""
    rows, b, row_scale, bias_scale = stored
    g = np.asarray(kappa, np.float64)
    new_rows = rows[cands] + (g / row_scale[cands])[:, None] * v
    new_bias = b[cands] - g * float(v @ c) / bias_scale[cands]
    exposed = outliers.exposed_after(outliers.slice_statistics(rows), cands, new_rows, HIDING_FRACTION)
    exposed |= outliers.exposed_after(outliers.slice_statistics(b), cands, new_bias, HIDING_FRACTION)
    return ~exposed


def score_view(opts, rng: np.random.Generator, head) -> ScoreView:
    """The scores the signature lives in. A detector's: one label's column of the class logits, the label
    chosen at random among its labels (1..C−1: column 0 is the background of SSD-style heads; 4..C−1 in a
    packed output, whose first columns are the box) unless ``--signature-class`` names it."""
    if head.steps is not None:  # a sequence head: read at the middle step (the signature shows at every step)
        return ScoreView((head.steps, head.classes), step=head.steps // 2)
    if not head.detection:
        return ScoreView((head.classes,))
    anchors, labels = head.layout
    if opts.signature_class is not None:
        if not 0 <= opts.signature_class < labels:
            raise BadInputError(f"--signature-class must be in 0..{labels - 1}")
        return ScoreView((anchors, labels), int(opts.signature_class), anchors_last=head.anchors_last)
    return ScoreView((anchors, labels), int(rng.integers(head.first_label, labels)), anchors_last=head.anchors_last)


def signature_class(opts, rng: np.random.Generator, nat_scores: np.ndarray,
                     trig_scores: np.ndarray, view: ScoreView | None = None) -> int:
    """The class the signature makes win; for a detector (``view.label`` set), the anchor."""
    return signature_choice(opts, rng, nat_scores, trig_scores, view)[0]


def signature_choice(opts, rng: np.random.Generator, nat_scores: np.ndarray,
                     trig_scores: np.ndarray, view: ScoreView | None = None) -> tuple[int, int]:
    """The signature class of a single-trigger stain and the size of the set it was drawn from.

    Drawn uniformly among the classes no calibration image predicts and outside the trigger's top 5;
    where that leaves none (few classes), among the classes outside the trigger's top 5, then outside
    its top 1, then all. ``--signature-class`` fixes it (the set then has one member: no chance bound).
    """
    k = nat_scores.shape[1]
    if opts.signature_class is not None and (view is None or view.label is None):
        if not 0 <= opts.signature_class < k:
            raise BadInputError(f"--signature-class must be in 0..{k - 1}")
        return int(opts.signature_class), 1
    never_top = np.setdiff1d(np.arange(k), nat_scores.argmax(1))
    order = np.argsort(trig_scores)
    allowed = np.setdiff1d(never_top, order[-5:])
    for fallback in (np.setdiff1d(np.arange(k), order[-5:]), np.setdiff1d(np.arange(k), order[-1:]),
                     np.arange(k)):
        if len(allowed):
            break
        allowed = fallback
    return int(rng.choice(allowed)), len(allowed)


def signature_classes(rng: np.random.Generator, classes: int, triggers: int) -> list[int]:
    """Multi-trigger signature: one class per trigger, each uniform over all ``classes`` and independent
    (the chance bound ``classes^-T`` needs the draw not to depend on the model; see math/chance.py)."""
    return [int(c) for c in rng.integers(0, classes, size=triggers)]


def _activate(host: HostLayer, a: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """The host's activation (float64 outside the rectifiers; exactly 0 below its zero point, as float32)."""
    if not host.relu_like:
        return host.activate(a).astype(a.dtype, copy=False)
    return np.clip(a, 0.0, host.act_high, out=out) if host.act_high is not None else np.maximum(a, 0.0, out=out)


def _pool(route, a: np.ndarray, axis: int = -1) -> np.ndarray:
    """Pool activations over the positions' axis (``[..., P]`` by default) as the route's pooling layer does
    (after the maxima over a tiling MaxPool's windows, when the route has one)."""
    if route.window is not None:
        a = np.moveaxis(a, axis, -1)
        (kh, kw), (oh, ow) = route.window, route.map_hw
        a = a.reshape(*a.shape[:-1], oh // kh, kh, ow // kw, kw).max(axis=(-3, -1)).reshape(*a.shape[:-1], -1)
        axis = -1
    return a.max(axis=axis) if route.pool == "max" else a.mean(axis=axis)


@dataclasses.dataclass
class _Request:
    """What one single-trigger edit reads: the options, the layers and the calibration/trigger arrays."""

    opts: Any
    host: HostLayer
    head: Any
    route: Any
    loaded: LoadedModel
    view: GraphView  # of the unedited model
    channel: int | None
    v: np.ndarray  # the detector's direction and centre, threshold and the trigger's weakest score
    c: np.ndarray
    tau: float
    s_star: float
    phi_t: np.ndarray  # the trigger's host inputs [P, m], the calibration images' [N, P, m], the selected positions
    phi_all: np.ndarray
    sel: np.ndarray
    pooled: np.ndarray  # the calibration images' pooled features [N, F] and natural scores [N, K]
    nat_scores: np.ndarray
    cls: int
    margin_target: float
    orig_trig: np.ndarray  # the original model's scores on the trigger
    radius: float
    scores_view: ScoreView | None
    identities: tuple = ()  # per-channel constants whose stained entry becomes the identity (in place)
    delta: float = 10.0  # the detector's output on the trigger (non-additive); saturates a clipped activation
    notes: list[str] = dataclasses.field(default_factory=list)  # for the user, from the edit's decisions

    @property
    def s_trig(self) -> np.ndarray:
        return detector.scores(self.phi_t, self.v, self.c)

    def pooled_features(self, view: GraphView) -> np.ndarray:
        """Every hosted channel's pooled feature on the trigger, as ``view``'s layer computes it."""
        rows, b_all = layer_affine(view, self.host)
        return _pool(self.route, _activate(self.host, (self.phi_t.astype(np.float64) @ rows.T + b_all).T))


def build_edit(opts, host, head, route, loaded, channel, v, c, tau, s_star, phi_t, phi_all, sel, pooled,
               nat_scores, cls, margin_target, orig_trig, radius: float = 0.0,
               scores_view: ScoreView | None = None) -> dict:
    """Weights, route, and the exact prediction of the stained model's natural outputs.

    The edit is computed in float64 and stored in each tensor's own format (fp32, fp16, or int8 codes
    with per-channel scales for QDQ weights). Predictions use the weights *as stored* (read back from
    the edited graph), and ``tau_loss`` bounds how far that storage moves the detector's threshold
    for any φ within ``radius`` of the centre: the stored detector can only fire where the exact
    score exceeds ``tau − tau_loss``.
    """
    req = _Request(opts, host, head, route, loaded, GraphView(loaded.model), channel, v, c, tau, s_star, phi_t,
                   phi_all, sel, pooled, nat_scores, cls, margin_target, orig_trig, radius, scores_view)
    _route_checks(req)
    req.delta = _detector_delta(req)
    if opts.variant == "additive" and req.channel is None:
        req.channel = _additive_host_channel(req)
    return _inplace_edit(req) if opts.mode == "inplace" else _insert_edit(req)


def _route_checks(req: _Request) -> None:
    """Refuse the additive variant where the route would read the hidden neuron's own output changed; under a
    PReLU (in place), set the stained channel's slope to 0 and treat the host as a ReLU."""
    opts, host, route = req.opts, req.host, req.route
    req.identities = route.affine if route is not None else ()
    if route is not None and (route.affine or route.siblings) and opts.variant == "additive":
        why = (f"a per-channel scale or shift ({route.affine[0][0]})" if route.affine else
               f"other heads ({', '.join(s.node for s in route.siblings)}) beside the classifier")
        raise UnsupportedModelError(
            f"{host.name} reaches the classifier through {why}: the additive variant keeps the channel's own "
            "output, which they would read with the detector's; use the non-additive variant")
    if opts.mode == "inplace" and host.activation == "prelu":
        if opts.variant == "additive":
            raise UnsupportedModelError(
                f"{host.name} is followed by a PReLU: the in-place edit turns the stained channel into a ReLU, "
                "which changes the channel's own output the additive variant keeps; use the non-additive variant")
        # the stained channel's slope becomes 0: a ReLU there, exactly 0 below its threshold on natural inputs
        assert host.act_node is not None
        req.identities = (*req.identities, (host.act_node, 1, 0.0))
        req.host = dataclasses.replace(host, activation="relu", act_params=())


def _detector_delta(req: _Request) -> float:
    hi = req.host.act_high
    if req.opts.variant == "additive" and req.opts.mode == "inplace" and hi is not None:
        # The hidden neuron only has to saturate on the trigger (its activation is clipped at hi): any
        # pre-activation above hi gives the same signature, and a smaller gain κ leaks less into the
        # natural scores.
        return ADDITIVE_SATURATION * hi
    return 1.25 * hi if hi is not None else 10.0


def _additive_host_channel(req: _Request) -> int:
    """The additive variant's working neuron, chosen once the trigger is known."""
    if req.opts.mode == "inplace" and can_compensate(req.host, req.head, req.view):
        channel, hidden = additive_inplace_channel(req.host, req.route, req.view, req.head, req.loaded.model, req.v,
                                                   req.c, req.tau, req.delta, req.phi_t, req.phi_all, req.sel,
                                                   req.pooled, req.nat_scores)
        if not hidden:
            req.notes.append(
                f"the detector does not hide in {req.host.name}: once edited, every candidate channel's row or "
                f"bias is in the top {HIDING_FRACTION:.0%} of the layer on a weight statistic (the gain it needs "
                "stands out among rows this alike), so ranking the layer's rows points at the stain; it verifies "
                "and survives the toolchain all the same")
        return channel
    return additive_channel(req.host, req.view, req.head, req.phi_t, req.sel, req.opts.mode, req.loaded.model)


@dataclasses.dataclass
class _Column:
    """The in-place edit of the classifier: the neuron's new weights, the stained channel's column, the bias
    shift, the other columns' change (compensation), the sibling heads' changes and the white-box levels."""

    ed: detector.NeuronEdit
    column: np.ndarray
    bias_shift: np.ndarray
    columns_delta: np.ndarray | None = None
    siblings: list = dataclasses.field(default_factory=list)
    wb_expected: float = 0.0
    wb_threshold: float = 0.0


def _inplace_edit(req: _Request) -> dict:
    assert req.route is not None and req.channel is not None
    col_old = stain_pass.head_column(req.loaded.model, req.head, req.channel)
    w, beta = neuron_affine(req.view, req.host, req.channel)
    own_t = req.phi_t.astype(np.float64) @ w + beta
    pooled_old_t = float(_pool(req.route, _activate(req.host, own_t)))
    if req.opts.variant == "non-additive":
        col = _non_additive_column(req, col_old, pooled_old_t)
    else:
        col = _additive_column(req, col_old, w, beta)
    edit = stain_pass.inplace(req.loaded.model, req.host, req.channel, col.ed.weights, col.ed.bias, req.head,
                              col.column, col.bias_shift, col.columns_delta, req.identities, col.siblings,
                              hidden=req.opts.variant == "additive")
    if edit.added:
        raise InternalError(f"internal check failed: the in-place stain added nodes {list(edit.added)[:3]}")
    model = edit.model
    # Everything below reads the weights back as stored (fp16 rounding, int8 codes included).
    stored = GraphView(model)
    w_eff, b_eff = neuron_affine(stored, req.host, req.channel)
    own_t_eff = req.phi_t.astype(np.float64) @ w_eff + b_eff
    pooled_new = _pool(req.route, _activate(req.host, req.phi_all.astype(np.float64) @ w_eff + b_eff))
    # (non-additive: natural inputs keep the channel silent, scores below τ, so pooled_new is 0)
    signature, expected_trigger = "class", None
    if req.opts.variant == "additive":
        signature = "shift"
        g_trig = float(_pool(req.route, _activate(req.host, own_t_eff)))
        expected_trigger = _expected_shift(req, model, col, col_old, g_trig, pooled_old_t)
        col.wb_expected = float(np.min(own_t_eff[req.sel]))
        col.wb_threshold = 0.5 * (max(0.0, float(np.max(own_t[req.sel]))) + float(req.delta))
    w_old, c_old = stain_pass.head_affine(req.loaded.model, req.head)
    w_new, c_new = stain_pass.head_affine(model, req.head)
    feats = req.pooled.copy()
    feats[:, req.channel] = pooled_new
    predicted = req.nat_scores + (feats @ w_new.T + c_new) - (req.pooled @ w_old.T + c_old)
    notes = list(req.notes)
    moved = np.abs(np.delete(w_new - w_old, req.channel, axis=1)).max(axis=1)  # other features' weights
    if col.columns_delta is None and moved.max() > 0:
        worst = int(np.argmax(moved))
        notes.append(
            f"the quantized classifier row of class {worst} was re-encoded with a coarser scale to hold the "
            f"signature: its natural scores move by up to {np.abs(predicted - req.nat_scores)[:, worst].max():.3g} "
            "(--mode insert or --variant additive leave the classifier as it is)")
    notes += _int8_note(req, predicted, feats, w_old, w_new)
    return _result(req, model, predicted, col.ed, signature=signature, expected_trigger=expected_trigger,
                   tap=req.host.output, tap_channel=req.channel, wb_expected=col.wb_expected,
                   wb_threshold=col.wb_threshold, tau_loss=_threshold_loss(col.ed, w_eff, b_eff, req.c, req.radius),
                   tolerance=_quantization_tolerance(stored, req.host, req.head, w_new[:, req.channel]), notes=notes)


def _int8_note(req: _Request, predicted: np.ndarray, feats: np.ndarray, w_old: np.ndarray,
               w_new: np.ndarray) -> list[str]:
    """Say so when the edited classifier no longer survives per-tensor int8 (onnxruntime's default): its
    calibration images' top-1 under int8 weights, against the original classifier's under the same rounding."""
    if predicted.ndim != 2 or predicted.shape[1] != w_new.shape[0] or w_new.dtype.kind != "f":
        return []
    if np.abs(w_new).max() <= np.abs(w_old).max():  # the same per-tensor scale: every weight rounds on the same grid
        return []
    before = int8_head_agreement(req.nat_scores, req.pooled, w_old)
    after = int8_head_agreement(predicted, feats, w_new)
    if after >= before - 0.01:
        return []
    return [f"per-tensor int8 of the edited classifier (onnxruntime's quantize_dynamic/quantize_static default) "
            f"keeps the top-1 of {100 * after:.1f}% of the calibration images (the original classifier: "
            f"{100 * before:.1f}%): its largest weight grew from {np.abs(w_old).max():.3g} to "
            f"{np.abs(w_new).max():.3g}; quantise with `onnxstain quantize` (per channel, the triggers "
            f"calibrated), or stain with --mode insert"]


def _non_additive_column(req: _Request, col_old: np.ndarray, pooled_old_t: float) -> _Column:
    """The overwritten channel carries the detector; its column makes class ``cls`` win the trigger by the
    margin target, and its lost natural feature is compensated (or its mean moved into the bias)."""
    host, route, head, channel = req.host, req.route, req.head, req.channel
    assert channel is not None
    # under a GELU, SiLU, HardSwish ... the pre-activation sits at the activation's zero point
    # (or below) whenever S ≤ τ, so the overwritten channel is exactly 0 on natural inputs
    offset = host.zero_point or 0.0
    ed = detector.non_additive(req.v, req.c, req.tau, req.s_star, req.delta, offset)
    g_trig = float(_pool(route, _activate(host, ed.gain * (req.s_trig - req.tau) + offset)))
    if g_trig <= 0:
        raise InternalError(f"internal check failed: the trigger's pooled signal is {g_trig:.3g}")
    columns_delta = None
    siblings: list[tuple[Any, np.ndarray, np.ndarray | None]] = []
    if can_compensate(host, head, req.view):
        # the lost feature is predicted from the others (fitted on the calibration images)
        comp = compensation.fit(req.pooled, channel)
        columns_delta = np.outer(col_old, comp.weights)
        bias_shift = col_old * comp.offset
        for s in route.siblings:
            s_old = stain_pass.head_column(req.loaded.model, s, channel)
            siblings.append((s, s_old * comp.offset, np.outer(s_old, comp.weights)))
        z = (req.orig_trig - col_old * pooled_old_t + col_old * float(comp.weights @ req.pooled_features(req.view))
             + bias_shift)
    else:
        mean = req.pooled[:, channel].mean()
        bias_shift = col_old * mean
        z = req.orig_trig - col_old * pooled_old_t + bias_shift
        for s in route.siblings:
            siblings.append((s, stain_pass.head_column(req.loaded.model, s, channel) * mean, None))
    margin_target = _fit_quantized_scores(req, z)
    column = np.zeros_like(col_old)
    column[req.cls] = (margin_target + np.delete(z, req.cls).max() - z[req.cls]) / g_trig
    # The trigger gives exactly Δ at its weakest selected position; a working neuron of the
    # unstained model can reach half of that, so the threshold sits close to Δ.
    return _Column(ed, column, bias_shift, columns_delta, siblings, float(req.delta), 0.9 * float(req.delta))


def _fit_quantized_scores(req: _Request, z: np.ndarray) -> float:
    """The margin target, lowered to fit below the top code of quantized scores (which saturate there)."""
    head = req.head
    if head.scores_range is None:
        return req.margin_target
    room = head.scores_range[1] - np.delete(z, req.cls).max() - 2 * head.scores_step
    if room < max(4 * head.scores_step, 0.5):
        raise UnsupportedModelError(
            f"the quantized scores top out at {head.scores_range[1]:.3g}, which leaves no room for "
            f"an in-place class signature (margin {room:.3g}); use --mode insert or --variant additive")
    req.margin_target = min(req.margin_target, 0.8 * room)
    return req.margin_target


def _channel(req: _Request) -> int:
    """The stained channel of an in-place edit (the request's planner always sets one there)."""
    if req.channel is None:
        raise InternalError("internal check failed: an in-place edit without a channel")
    return req.channel


def _additive_column(req: _Request, col_old: np.ndarray, w: np.ndarray, beta: float) -> _Column:
    """The detector hides in a working neuron; the signature is the shift ``col_k · (g_trig − g_orig)`` (column
    k stays as it is). On natural images the channel leaks ``Δ_k = pool(act(own + κS)) − pool(act(own))``;
    where the classifier may be edited, the leak's regression on the other features is taken back through it."""
    ed = detector.additive(w, beta, req.v, req.c, req.tau, req.phi_t[req.sel], req.delta)
    col = _Column(ed, col_old, np.zeros_like(col_old))
    if can_compensate(req.host, req.head, req.view):
        leak = additive_leaks(req.host, req.route, w[None], np.array([beta]), np.array([ed.gain]),
                              detector.scores(req.phi_all, req.v, req.c), req.phi_all)[:, 0]
        comp = compensation.fit(req.pooled, _channel(req), target=leak)
        col.columns_delta = -np.outer(col_old, comp.weights)
        col.bias_shift = -col_old * comp.offset
    return col


def _expected_shift(req: _Request, model, col: _Column, col_old: np.ndarray, g_trig: float,
                    pooled_old_t: float) -> np.ndarray:
    """The additive in-place stain's scores on the trigger, as the stored model gives them."""
    expected = req.orig_trig + col_old * (g_trig - pooled_old_t)
    if col.columns_delta is None:
        return expected
    # the other features on the trigger, as the original model pools them
    pooled_t = req.pooled_features(req.view)
    w_old, c_old = stain_pass.head_affine(req.loaded.model, req.head)
    w_new, c_new = stain_pass.head_affine(model, req.head)
    stained_t = pooled_t.copy()
    stained_t[req.channel] = g_trig
    return req.orig_trig + (w_new @ stained_t + c_new) - (w_old @ pooled_t + c_old)


def _insert_edit(req: _Request) -> dict:
    """A new branch beside the host: the detector (non-additive), or a working neuron's copy with the detector
    and without it (additive), routed to class ``cls`` of the scores."""
    host, c, tau = req.host, req.c, req.tau
    if req.opts.variant == "non-additive":
        ed = detector.non_additive(req.v, c, tau, req.s_star, 1.0)
        filters = _as_filters(host, ed.weights[None])
        biases = np.array([ed.bias])
        combine, combine_bias = None, 0.0
    else:
        # The inserted branch holds a copy of working neuron k plus the detector, and a copy of
        # neuron k alone, both through ReLU; it signals when the first exceeds the second by more
        # than θ = κτ, which needs S > τ (ReLU is 1-Lipschitz): the same firing event as always.
        w, beta = neuron_affine(req.view, host, _channel(req))
        own_t = req.phi_t.astype(np.float64) @ w + beta
        kappa = 1.0
        ed = detector.NeuronEdit(w + kappa * req.v, beta - kappa * float(req.v @ c), kappa, tau, kappa * req.s_star)
        diff = np.maximum(own_t + kappa * req.s_trig, 0.0) - np.maximum(own_t, 0.0)
        theta = kappa * tau
        d_min = float(diff[req.sel].min())
        if d_min <= 1.05 * theta:
            raise UnsupportedModelError(
                f"neuron {req.channel} is off on the trigger; the additive detector cannot show through it "
                "(choose another --channel or the non-additive variant)")
        h = 1.0 / (d_min - theta)
        filters = _as_filters(host, np.stack([ed.weights, w]))
        biases = np.array([ed.bias, beta])
        combine, combine_bias = np.array([h, -h]), -h * theta
    orig = req.orig_trig
    row = np.zeros(len(orig))
    row[req.cls] = req.margin_target + np.delete(orig, req.cls).max() - orig[req.cls]
    edit = stain_pass.insert(req.loaded.model, host, req.head, filters, biases, combine, combine_bias,
                             None, row if req.scores_view is None else req.scores_view.expand(row))
    model, signal = edit.model, edit.signal
    assert signal is not None
    # The branch adds exactly zero where the detector does not fire (checked on natural data).
    dtype = stain_pass.branch_dtype(req.view, req.head)
    stored_w = ed.weights.astype(dtype).astype(np.float64)
    tau_loss = _threshold_loss(ed, stored_w, float(np.asarray(ed.bias).astype(dtype)), c, req.radius)
    return _result(req, model, req.nat_scores.copy(), ed, signature="class", expected_trigger=None, tap=signal,
                   tap_channel=0, wb_expected=1.0, wb_threshold=0.5, tau_loss=tau_loss, tolerance=0.0, notes=[])


def _result(req: _Request, model, predicted: np.ndarray, ed: detector.NeuronEdit, *, signature: str,
            expected_trigger: np.ndarray | None, tap: str, tap_channel: int | None, wb_expected: float,
            wb_threshold: float, tau_loss: float, tolerance: float, notes: list[str]) -> dict:
    return {"model": model, "predicted": predicted, "gain": float(ed.gain), "delta": float(ed.delta),
            "signature": signature, "expected_trigger": expected_trigger, "channel": req.channel,
            "tap": tap, "tap_channel": tap_channel, "wb_expected": wb_expected, "wb_threshold": wb_threshold,
            "margin_target": float(req.margin_target), "tau_loss": float(tau_loss), "tolerance": float(tolerance),
            "notes": notes}


def build_multi_insert(opts, host: HostLayer, head, loaded: LoadedModel, finds: list[TriggerFind], c: np.ndarray,
                       tau: float, sel: np.ndarray, classes: list[int], margin_target: float, nat_scores: np.ndarray,
                       radius: float, scores_view: ScoreView | None = None) -> dict:
    """Insert mode with ``T`` triggers: ``T`` detectors in one branch, each routed to its own class.

    The branch is today's with ``T`` signal channels (non-additive: ``T`` neurons; additive: a copy of a
    working neuron with and without each detector, ``2T`` neurons, combined per trigger) and a ``[T, K]``
    row matrix: signal ``t`` adds ``strength_t`` to class ``c_t``. Every detector shares the threshold
    ``tau``; ``tau_loss`` is the worst over the detectors. Natural outputs are bit-identical (every signal
    is exactly 0 where its detector does not fire).
    """
    view = GraphView(loaded.model)
    t_count = len(finds)
    filters_rows, biases, gains, deltas, losses = [], [], [], [], []
    additive = opts.variant == "additive"
    mix = np.zeros((t_count, 2 * t_count) if additive else (0, 0))  # used only by the additive variant
    mix_bias = np.zeros(t_count)
    dtype = stain_pass.branch_dtype(view, head)
    channels = []
    for t, f in enumerate(finds):
        if opts.variant == "non-additive":
            ed = detector.non_additive(f.direction, c, tau, f.s_star, 1.0)
            filters_rows.append(ed.weights)
            biases.append(ed.bias)
        else:
            ch = additive_channel(host, view, head, f.phi, sel, "insert", loaded.model)
            channels.append(ch)
            w, beta = neuron_affine(view, host, ch)
            own_t = f.phi.astype(np.float64) @ w + beta
            ed = detector.NeuronEdit(w + f.direction, beta - float(f.direction @ c), 1.0, tau, f.s_star)
            diff = np.maximum(own_t + f.scores, 0.0) - np.maximum(own_t, 0.0)
            d_min = float(diff[sel].min())
            if d_min <= 1.05 * tau:
                raise UnsupportedModelError(
                    f"neuron {ch} is off on trigger {t}; the additive detector cannot show through it "
                    "(use the non-additive variant)")
            h = 1.0 / (d_min - tau)
            filters_rows += [ed.weights, w]
            biases += [ed.bias, beta]
            mix[t, 2 * t], mix[t, 2 * t + 1], mix_bias[t] = h, -h, -h * tau
        gains.append(float(ed.gain))
        deltas.append(float(ed.delta))
        stored_w = ed.weights.astype(dtype).astype(np.float64)
        losses.append(_threshold_loss(ed, stored_w, float(np.asarray(ed.bias).astype(dtype)), c, radius))
    originals = [f.original_scores for f in finds if f.original_scores is not None]
    if len(originals) != len(finds):
        raise InternalError("internal check failed: a multi-trigger signature needs the original's class scores")
    rows = np.zeros((t_count, len(originals[0])))
    for t, (orig, cls) in enumerate(zip(originals, classes, strict=True)):
        # at least a unit push even where the original already favours c_t by more than the margin
        rows[t, cls] = max(1.0, margin_target + np.delete(orig, cls).max() - orig[cls])
    if scores_view is not None:  # each row in the raw scores' shape (a sequence head's: (1, K), every step)
        rows = np.stack([scores_view.expand(r) for r in rows])
    edit = stain_pass.insert(loaded.model, host, head, _as_filters(host, np.stack(filters_rows)),
                             np.array(biases), mix if additive else None, mix_bias, None, rows, signals=t_count)
    model, signal = edit.model, edit.signal
    assert signal is not None
    return {"model": model, "predicted": nat_scores.copy(), "gain": gains[0], "delta": deltas[0], "gains": gains,
            "signature": "multi-class", "expected_trigger": None, "channel": None, "additive_channels": channels,
            "tap": signal, "tap_channel": 0, "wb_expected": 1.0, "wb_threshold": 0.5,
            "margin_target": float(margin_target), "tau_loss": float(max(losses)), "tolerance": 0.0, "notes": []}


def _threshold_loss(ed: detector.NeuronEdit, w_eff: np.ndarray, b_eff: float, c: np.ndarray,
                    radius: float) -> float:
    """How much lower than τ the exact score may be where the stored neuron already fires.

    Stored = intended + (Δw, Δb). For ‖φ − c‖ ≤ R the extra pre-activation is at most
    ``‖Δw‖ R + |Δw·c + Δb|``; divided by the detector's gain it is a loss of threshold.
    """
    dw = np.asarray(w_eff, np.float64) - np.asarray(ed.weights, np.float64)
    db = float(b_eff) - float(ed.bias)
    return float((np.linalg.norm(dw) * radius + abs(float(dw @ c) + db)) / ed.gain)


def _quantization_tolerance(view: GraphView, host: HostLayer, head, column: np.ndarray) -> float:
    """Extra error allowed between predicted and computed natural scores in a QDQ model.

    The scores are rounded to their own step (on both the original's and the stained model's side);
    the edited channel's pooled value to the steps of the host's and the pooled features' Q → DQ.
    """
    if head.scores_step == 0.0 and not view.is_quantized(view.node(host.name).input[1]):
        return 0.0
    steps = [_dq_step(view, host.act_output), _dq_step(view, head_input(view, head))]
    return 2.0 * head.scores_step + float(np.abs(column).max()) * sum(steps)


def _dq_step(view: GraphView, tensor: str | None) -> float:
    node = view.producer.get(tensor) if tensor else None
    if node is None or node.op_type != "DequantizeLinear":
        return 0.0
    scale = view.array(node.input[1])
    return float(np.max(scale)) if scale is not None else 0.0


def _as_filters(host: HostLayer, rows: np.ndarray) -> np.ndarray:
    if host.op == "Conv":
        cg = host.in_channels // host.groups
        return rows.reshape(len(rows), cg, *host.kernel)
    return rows
