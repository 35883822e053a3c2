"""The lock's key: its sections built from what the stages found (:mod:`onnxstain.keys` owns the format)."""

from __future__ import annotations

import numpy as np

from .._onnx.head import label_fields
from ..keys import (
    F8,
    CalibrationSection,
    DetectorSection,
    HostSection,
    Key,
    LockSection,
    ModelSection,
    OcclusionSection,
    ReferencesSection,
    TriggerSection,
    encode_png,
    envelope,
)
from ..math import bounds, detector
from ..patch import Patch
from .job import LockJob
from .site import LockSite
from .types import LockEdit, PatchFound


def host_section(site: LockSite, dense: bool = False) -> HostSection:
    """The detector's host and lock position (a dense-output lock also records the detector's one position)."""
    h = site.host
    return HostSection(name=h.name, op=h.op, input=h.input, m=h.m, positions=h.positions,
                       out_hw=tuple(h.out_hw) if h.out_hw else None, kernel=tuple(h.kernel), strides=tuple(h.strides),
                       pads=tuple(h.pads), dilations=tuple(h.dilations), groups=h.groups,
                       selected_positions=(site.pos_index,), lock_position=tuple(site.position),
                       detector_positions=(site.pos_index,) if dense else None)


def detector_section(job: LockJob, found: PatchFound, stats: detector.FeatureStats, tau0: float) -> DetectorSection:
    return DetectorSection(directions=F8.of(found.dirs), centre=F8.of(stats.centre), tau0=tau0, threshold=tau0,
                           trigger_scores=F8.of(found.scores), detectors=len(found.dirs), draws=found.draws,
                           max_draws=job.opts.max_draws)


def trigger_section(found: PatchFound) -> TriggerSection:
    return patch_section(found.patch)


def patch_section(p: Patch) -> TriggerSection:
    """A lock's patch, as its key holds it (the PNG and its place in the model input)."""
    return TriggerSection(png=encode_png(p.pixels), top=p.top, left=p.left, height=p.height, width=p.width)


def model_section(job: LockJob, digest: str) -> ModelSection:
    """The protected model as a classifier's or detector's lock key records it (``digest``: the locked model's)."""
    head = job.head
    assert head is not None
    offset, scores, layout = label_fields(head)
    return ModelSection(source_sha256=job.loaded.sha256, output_sha256=digest, input=job.view.graph_inputs[0].name,
                        scores=head.output, classes=head.classes,
                        layout=tuple(head.layout) if head.detection and head.layout is not None else None,
                        label_offset=offset, label_scores=scores, label_layout=layout)


def classifier_key(job: LockJob, site: LockSite, found: PatchFound, edit: LockEdit, *, digest: str,
                   stats: detector.FeatureStats, tau0: float, radius: float, bound: bounds.Bound, images: int,
                   want: np.ndarray, natural_firings: int, unlocked_agree: float) -> Key:
    """A classifier's or detector's lock key; ``want``: the reference scores, patched then unpatched."""
    head, n = job.head, len(want) // 2
    assert head is not None
    return Key(
        **envelope("lock"),
        model=model_section(job, digest),
        preprocessing=job.pre,
        mode=job.opts.kind,
        variant=job.opts.kind,
        seed=job.seed,
        host=host_section(site),
        detector=detector_section(job, found, stats, tau0),
        trigger=trigger_section(found),
        references=ReferencesSection(count=n, seed=job.seed % (2**31), patched_scores=F8.of(want[:n]),
                                     unpatched_scores=F8.of(want[n:])),
        white_box=edit.white_box,
        occlusion=None if found.occlusion is None else OcclusionSection(
            steps=int(found.occlusion["steps"]), kl_start=found.occlusion["kl_start"],
            kl_end=found.occlusion["kl_end"]),
        lock=LockSection(**edit.info, calibration_locked_agreement=edit.locked_agreement, chance=edit.chance,
                         calibration_unlocked_agreement=unlocked_agree),
        bound=bound,
        calibration=CalibrationSection.of(stats, images, radius, found.natural, natural_firings, job.opts.fpr),
    )


def dense_key(job: LockJob, site: LockSite, found: PatchFound, edit: LockEdit, *, digest: str,
              stats: detector.FeatureStats, tau0: float, radius: float, bound: bounds.Bound, images: int,
              pooled: np.ndarray, dense_shape: tuple[int, ...], natural_firings: int, unlocked_agree: float) -> Key:
    """A dense-output lock key; ``pooled``: the reference maps (pooled), patched then unpatched."""
    assert job.dense is not None
    n = len(pooled) // 2
    return Key(
        **envelope("lock"),
        model=ModelSection(source_sha256=job.loaded.sha256, output_sha256=digest, input=job.view.graph_inputs[0].name,
                           scores=job.dense.output, classes=int(np.prod(pooled.shape[1:])), dense_shape=dense_shape),
        preprocessing=job.pre,
        mode="gate",
        variant="gate",
        seed=job.seed,
        host=host_section(site, dense=True),
        detector=detector_section(job, found, stats, tau0),
        trigger=trigger_section(found),
        references=ReferencesSection(count=n, seed=job.seed % (2**31), metric="correlation",
                                     patched_scores=F8.of(pooled[:n].reshape(n, -1)),
                                     unpatched_scores=F8.of(pooled[n:].reshape(n, -1))),
        white_box=edit.white_box,
        occlusion=None,
        lock=LockSection(**edit.info, calibration_locked_agreement=edit.locked_agreement, chance=0.0,
                         calibration_unlocked_agreement=unlocked_agree, metric="correlation"),
        bound=bound,
        calibration=CalibrationSection.of(stats, images, radius, found.natural, natural_firings, job.opts.fpr),
    )
