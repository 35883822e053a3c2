"""The shuffle lock's stages (``--kind shuffle``): a mid-network layer's channels stored out of order, and a
patch whose corner pixels sort into the order that puts them back (:mod:`onnxstain.math.shuffle`,
:mod:`onnxstain.passes.shuffle`, :mod:`onnxstain._lock.shuffle_site`).

1. **site** — the image's first Conv (the patch is a window of its input, as the gate's) and an ungrouped Conv
   in the middle of the network that every path to the output passes through.
2. **calibrate** — the calibration images and the original's outputs on them; the window probed with a few
   images (which pixel channel moves each sort key, from which value to which).
3. **search** — no search: ``σ`` drawn, each sort key given the value of its rank on an evenly spaced ladder
   over the range every key can reach, read back through the model to check the order and its gaps.
4. **edit** — the layer's channels stored in the order ``σ``, the sort and the gather inserted.
5. **check** — with the patch the references give exactly the original's outputs, without it they do not.
6. **write** — model, key (the patch and ``σ⁻¹``), public record.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx

from .._onnx import head as head_mod
from .._onnx.hosts import find_hosts
from ..calibration import calibration_pixels
from ..errors import BadModelError, InternalError, UnsupportedModelError
from ..keys import (
    F8,
    HostSection,
    Key,
    LockSection,
    ReferencesSection,
    ShuffleSection,
    WhiteBoxSection,
    envelope,
)
from ..math import bounds
from ..math import shuffle as shuffle_math
from ..math.agreement import chance_agreement
from ..passes.shuffle import insert_shuffle
from ..patch import Patch, paste_pixels, smooth_backgrounds
from ..runtime import run_batches, session, with_outputs
from ..signature import lock_agreement
from .edit import classifier_agreement, detection_agreement, two_answer_kappa
from .job import LockJob, write_outputs
from .keys import model_section, patch_section
from .shuffle_site import SIDE, read_point, shuffle_site
from .types import LockResult
from .window import WindowProbe, probe_window

REFERENCES = 8  # synthetic reference images stored (as a seed) for black-box verification
MIN_GAP = 1.5  # pixel levels between consecutive sort keys under the patch, at least (rounding, int8 of the input)
OPEN_MARGIN = 0.1  # a classifier the shuffle leaves above chance + 10 points is refused (not locked) ...
OPEN_KAPPA = 0.2  # ... a two-answer head whose locked answers keep |kappa| above this ...
OPEN_MAP = 0.2  # ... and a detector that keeps this anchor mAP
CHECK_IMAGES = 256  # calibration images the locked model is judged on (±3 points of agreement; kappa ±0.06)


class ShuffleLock:
    """The shuffle lock of a model with a classifier or detector head."""

    probe: WindowProbe
    pixels: np.ndarray
    x_cal: np.ndarray  # the first CHECK_IMAGES calibration images, preprocessed
    nat_scores: np.ndarray
    sigma: np.ndarray
    patch: Patch
    gap: float
    locked: onnx.ModelProto
    signal: str
    agreement: float
    chance: float
    kappa: float | None
    natural_placed: np.ndarray
    want: np.ndarray
    digest: str

    def __init__(self, job: LockJob) -> None:
        """Choose the window and the layer; refuse what this lock cannot do before any work."""
        if job.head is None:
            raise UnsupportedModelError("the shuffle lock protects a classifier or detector head; this model's "
                                        "output is a dense map: use --kind gate")
        self.job, self.head = job, job.head
        site = shuffle_site(job.view, find_hosts(job.loaded.model, job.view), job.head, job.pre, job.opts.fpr,
                            job.opts.layer)
        self.first, self.layer, self.blocks, self.group = site.first, site.layer, site.blocks, site.group
        self._window_session: object | None = None

    def for_key(self, job: LockJob) -> ShuffleLock:
        """These stages for another key's job of the same model (site and calibration shared)."""
        stages = copy.copy(self)
        stages.job = job
        return stages

    # -- stages ------------------------------------------------------------------------------------
    def calibrate(self) -> None:
        job, head = self.job, self.head
        self.pixels = calibration_pixels(job.images, job.pre, job.prog)
        self.x_cal = job.pre.to_input(self.pixels[:CHECK_IMAGES])  # the sort keys below read every image
        sess = session(with_outputs(job.loaded.model, [head.scores]), job.opts.providers)
        self.nat_scores = run_batches(sess, self.x_cal, [head.scores], batch=job.opts.batch)[head.scores]
        probe = probe_window(self.window_keys, SIDE, job.pre.height, job.pre.width, grey=job.pre.channels == 1)
        if probe is None:
            raise UnsupportedModelError("the corner's values do not each follow one pixel channel (the model mixes "
                                        "channels before its first Conv): use --kind gate")
        self.probe = probe
        self.natural_placed = np.zeros(0, np.int64)

    def window_keys(self, px: np.ndarray) -> np.ndarray:
        """The corner window's values ``[N, 1, m]`` (c-major, as the inserted sort reads them) on 8-bit images."""
        job, window = self.job, self.first.input
        x = job.pre.to_input(px)
        graph_inputs = {i.name for i in job.view.graph_inputs}
        if window not in graph_inputs:
            x = run_batches(session(with_outputs(job.loaded.model, [window]), job.opts.providers), x, [window],
                            batch=job.opts.batch)[window]
        corner = np.asarray(x)[:, :, :SIDE, :SIDE]
        return corner.reshape(len(corner), 1, -1)

    def search(self) -> None:
        self.sigma = shuffle_math.draw_order(self.blocks, self.job.rng)
        self.patch, self.gap = ladder_patch(self.probe, self.sigma, self)
        order = shuffle_math.gather_order(self.sigma)
        keys = self.window_keys(self.pixels)[:, 0, : self.blocks]
        self.natural_placed = shuffle_math.placed_blocks(np.argsort(-keys, axis=1, kind="stable"), order)

    def edit(self) -> None:
        job, head, layer = self.job, self.head, self.layer
        stored = shuffle_math.channel_order(self.sigma, self.group, layer.out_channels)
        done = insert_shuffle(job.loaded.model, layer, read_point(layer), self.first.input, SIDE, self.blocks,
                              self.group, stored)
        assert done.signal is not None
        self.locked, self.signal = done.model, done.signal
        if head.detection:
            self.agreement, self.chance, self.kappa = detection_agreement(
                done.model, self.x_cal, self.nat_scores, head, job), 0.0, None
        else:
            agree, kappa = classifier_agreement(done.model, self.x_cal, self.nat_scores.reshape(len(self.x_cal), -1),
                                                head, job)
            self.agreement, self.chance = agree, chance_agreement(head.classes)
            self.kappa = two_answer_kappa(head, kappa)
        self.refuse_if_open()

    def refuse_if_open(self) -> None:
        """Refuse (before anything is written) a model the reordered layer does not lock: on the calibration
        images the locked model must fall to chance (a detector: anchor mAP ≤ 0.2; two answers: |kappa| ≤ 0.2).
        A sequence recogniser reads most steps the same through a shuffled layer (EasyOCR 94.7 %, RapidOCR's
        recogniser 98.1 % of steps): its later layers are not disrupted by one layer's order."""
        if self.kappa is not None:
            still, what = abs(self.kappa) > OPEN_KAPPA, f"Cohen's kappa {self.kappa:+.2f} with the original's answers"
        elif self.head.detection:
            still, what = self.agreement > OPEN_MAP, f"anchor mAP {self.agreement:.2f} against the original"
        else:
            still = self.agreement > self.chance + OPEN_MARGIN
            what = f"{100 * self.agreement:.1f}% top-1 agreement with the original (chance {100 * self.chance:.1f}%)"
        if still:
            raise UnsupportedModelError(
                f"reordering {self.layer.name}'s channels does not lock this model: without the patch it keeps "
                f"{what} on the calibration images; use --kind gate")

    def check(self) -> None:
        """With the patch the locked model gives the original's outputs exactly; without, it does not."""
        job, head = self.job, self.head
        refs = smooth_backgrounds(REFERENCES, job.pre.height, job.pre.width, seed=job.seed % (2**31))
        x_ref = job.pre.to_input(np.concatenate([paste_pixels(refs, self.patch), refs]))
        n = len(refs)
        taps = list(dict.fromkeys([head.scores, head.output]))
        original = run_batches(session(with_outputs(job.loaded.model, taps), job.opts.providers), x_ref, taps)
        got = run_batches(session(with_outputs(self.locked, [*taps, self.signal]), job.opts.providers), x_ref,
                          [*taps, self.signal])
        if not np.isfinite(original[head.output]).all():
            raise BadModelError("the model gives NaN or infinite scores on the reference images")
        want = original[head.scores][:n]
        error = float(np.abs(want - got[head.scores][:n]).max())
        if error > 1e-4 * max(1.0, float(np.abs(want).max())):
            raise InternalError(f"internal check failed: the patched references do not unlock (max |Δ| {error:.3g})")
        placed = shuffle_math.placed_blocks(got[self.signal], shuffle_math.gather_order(self.sigma))
        if (placed[:n] != self.blocks).any():
            raise InternalError("internal check failed: the patch does not sort into the key's order")
        self.want = np.concatenate([got[head.output][:n], original[head.output][n:]])
        per_step = head.classes if head.steps else None
        _, still = lock_agreement(got[head.output][:n], self.want[:n], got[head.output][n:], self.want[n:],
                                  per_step, head_mod.decision_threshold(job.view, head.output))
        if still.mean() > 0.5:
            job.notes.append("the locked model still gives the original's outputs on most unpatched reference images")

    def write(self) -> None:
        self.digest = write_outputs(self.job, self.locked, self.key)

    def key(self, digest: str) -> Key:
        job, head, layer = self.job, self.head, self.layer
        n = len(self.want) // 2
        return Key(
            **envelope("lock"),
            model=model_section(job, digest),
            preprocessing=job.pre, mode="shuffle", variant="shuffle", seed=job.seed,
            host=HostSection(name=layer.name, op=layer.op, input=layer.input, m=layer.m, positions=layer.positions,
                             out_hw=tuple(layer.out_hw) if layer.out_hw else None, kernel=tuple(layer.kernel),
                             strides=tuple(layer.strides), pads=tuple(layer.pads), dilations=tuple(layer.dilations),
                             groups=layer.groups, selected_positions=(0,), output=layer.output),
            detector=None,
            trigger=patch_section(self.patch),
            references=ReferencesSection(count=n, seed=job.seed % (2**31), patched_scores=F8.of(self.want[:n]),
                                         unpatched_scores=F8.of(self.want[n:])),
            white_box=WhiteBoxSection(tensor=self.signal, channel=None, expected=1.0),
            occlusion=None,
            lock=LockSection(calibration_locked_agreement=self.agreement, calibration_unlocked_agreement=1.0,
                             chance=self.chance, flipped_channels=self.blocks * self.group,
                             agreement_metric="anchor mAP" if head.detection else None),
            bound=self.bound,
            calibration=None,
            shuffle=ShuffleSection(layer=layer.name, tensor=read_point(layer), window=self.first.input, side=SIDE,
                                   channels=layer.out_channels, blocks=self.blocks, group=self.group,
                                   order=tuple(int(i) for i in shuffle_math.gather_order(self.sigma)),
                                   gap=float(self.gap), row_sums=F8.of(self.row_sums())),
        )

    def row_sums(self) -> np.ndarray:
        """The original layer's row fingerprints (verify's white box matches the suspect's against them)."""
        view = self.job.view
        return shuffle_math.row_fingerprints(view.constant(view.node(self.layer.name).input[1]))

    @property
    def bound(self) -> bounds.Bound:
        """Half of the blocks put in place by any one input: at most ``1/(K/2)!`` over the key's draw."""
        return shuffle_math.placement_bound(self.blocks)

    def result(self) -> LockResult:
        job, head = self.job, self.head
        bound = self.bound
        placed_needed = int(bound.params["placed"])
        return LockResult(
            output=job.output, kind="shuffle", key_path=job.key_path, record_path=job.record, host=self.layer.name,
            detectors=0, patch_box=(0, 0, SIDE, SIDE), input_hw=(job.pre.height, job.pre.width), bound=bound,
            threshold=float(placed_needed), trigger_scores=[float(self.blocks)],
            natural_max_score=float(self.natural_placed.max(initial=0)),
            natural_firings=int((self.natural_placed >= placed_needed).sum()),
            natural_samples=len(self.natural_placed), locked_agreement=self.agreement, unlocked_agreement=1.0,
            chance=self.chance, flipped_features=self.blocks * self.group, calibration_images=len(self.x_cal),
            draws=1, search_steps=0, timings=job.timings, notes=job.notes, model_sha256=self.digest,
            kappa=self.kappa, metric="anchor mAP" if head.detection else "top-1",
            packed_detector=head.first_label == head_mod.PACKED_BOX, blocks=self.blocks, gap=self.gap,
        )


def ladder_patch(probe: WindowProbe, sigma: np.ndarray, lock: ShuffleLock) -> tuple[Patch, float]:
    """The corner patch whose first ``K`` sort keys rank as ``σ`` (key ``q`` ranks ``σ[q]``, 0 the largest), and
    the smallest gap between consecutive keys in pixel levels; read back through the model to check both."""
    k = len(sigma)
    lo, hi, effect = probe.lo[:k], probe.hi[:k], probe.effect[:, :k]
    low, high = float(lo.max()), float(hi.min())
    if not high > low:
        raise UnsupportedModelError("the corner's pixel channels reach no common range of values (the model scales "
                                    "its channels apart before the first Conv): use --kind gate")
    target = shuffle_math.ladder_values(sigma, low, high)  # key q ranks σ[q]
    rows = np.abs(effect).argmax(axis=0)  # the patch pixel channel each key follows
    slope = effect[rows, np.arange(k)] / 255.0  # value per pixel level
    base = np.where(slope > 0, lo, hi)  # the key's value at pixel level 0
    flat = np.full(effect.shape[0], 128, np.int64)
    flat[rows] = np.clip(np.round((target - base) / slope), 0, 255)
    c = effect.shape[0] // (probe.side * probe.side)
    pixels = np.broadcast_to(flat.reshape(probe.side, probe.side, c), (probe.side, probe.side, 3)).astype(np.uint8)
    patch = Patch(pixels.copy(), 0, 0)
    canvas = np.zeros((1, lock.job.pre.height, lock.job.pre.width, 3), np.uint8)
    keys = lock.window_keys(paste_pixels(canvas, patch))[0, 0, :k].astype(np.float64)
    order = np.argsort(-keys, kind="stable")
    if not np.array_equal(order, shuffle_math.gather_order(sigma)):
        raise InternalError("internal check failed: the patch's corner does not sort into the drawn order")
    gap = float(np.min(-np.diff(keys[order])) / np.abs(slope).max())
    if gap < MIN_GAP:
        raise UnsupportedModelError(f"the corner's sort keys are only {gap:.2g} pixel levels apart under the patch "
                                    f"(at least {MIN_GAP} are needed): use --kind gate")
    return patch, gap
