"""The first and last stages of every stain: ``prepare`` (check the paths, load the model once, its
preprocessing, the classifier-or-dense dispatch and the host layer, the seed) and ``write`` (the
model, the key and its public record as one unit), with the calibration pass and the key sections
the classifier and the dense stain share.

A :class:`StainJob` carries what the middle stages (calibrate → search → edit → check) read: the
loaded model, its graph view, the head (classifier or detector) or dense output, the host layer,
the options, the seeded generator, the notes and the stopwatch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .._onnx import head as head_mod
from .._onnx.dense import DenseOutput, find_dense_output
from .._onnx.fold import fold_shape_only, fuse_pads
from .._onnx.graph import GraphView
from .._onnx.hosts import HostLayer, find_hosts
from .._onnx.inputs import settle_preprocessing
from .._onnx.io import LoadedModel, load_model
from .._onnx.shapes import example_input
from ..calibration import calibration_pixels, natural_radius, refuse_underflowing_target
from ..errors import UnsupportedModelError
from ..features import neuron_inputs
from ..keys import F8, DetectorSection, Key, TriggerSection, encode_png, envelope
from ..math import chance, detector
from ..outputs import Artefacts, checked_job_outputs, write_unit
from ..preprocess import Preprocessing, PreprocessingRequest
from ..progress import Progress, Silent
from ..runtime import run_batches, session, with_outputs
from ..sanity import refuse_nonfinite
from ..seeds import draw_seed
from ..stopwatch import Stopwatch
from .hosts import check_quantized_weights, choose_dense_host, choose_host, refuse_dense_mode
from .result import StainOptions


@dataclasses.dataclass
class StainJob:
    """One stain, prepared: everything the later stages read, nothing they compute."""

    loaded: LoadedModel
    opts: StainOptions
    pre: Preprocessing
    view: GraphView
    hosts: list[HostLayer]
    host: HostLayer
    head: head_mod.Head | None  # a classifier or detector head ...
    dense: DenseOutput | None  # ... or a dense output (exactly one of them)
    route: Any  # the in-place route from the host to the head (classifier stains in place), else None
    seed: int
    rng: np.random.Generator
    output: Path
    key_path: Path
    record: Path
    artefacts: Artefacts | None
    progress: Progress
    notes: list[str]
    clock: Stopwatch
    auto_variant: bool = False  # the variant was "auto": the edit may fall back to the non-additive one
    _analysis: onnx.ModelProto | None = dataclasses.field(default=None, repr=False)

    def for_key(self, output: Path, key_path: Path, record: Path, seed: int | None,
                artefacts: Artefacts | None = None, clock: Stopwatch | None = None) -> StainJob:
        """This model's job for one key: its outputs, its seed (``None``: fresh entropy) and generator, its own
        notes and stopwatch. The loaded model, graph view, host and the analysis model are shared: no stage
        edits them (the edit passes work on a copy)."""
        seed = draw_seed(seed)
        return dataclasses.replace(self, seed=seed, rng=np.random.default_rng(seed), output=output,
                                   key_path=key_path, record=record, artefacts=artefacts, notes=list(self.notes),
                                   clock=clock or Stopwatch())

    def analysis_model(self) -> onnx.ModelProto:
        """What the calibration pass and the trigger search run: where the graph has zero Pads before its Convs
        (run-time "same" padding, once its shape-only subgraph is folded for the preprocessing's input size),
        a copy with them fused into the Convs, which onnxruntime runs at the speed of an export that wrote
        them as Conv pads; else the model itself (its calibration then bit-identical to earlier releases).
        Edits go to ``loaded.model``, whose graph and dynamic axes stay as they are."""
        if self._analysis is None:
            model = self.loaded.model
            if any(n.op_type == "Pad" for n in model.graph.node):
                folded = fold_shape_only(model, example_input(model, self.pre.input_shape()), self.opts.providers,
                                         any_batch=True)
                # the host's input stays a tensor of its own: the calibration pass and the search read it
                fused = fuse_pads(folded, keep={self.host.input})
                model = fused if fused is not folded else model
            self._analysis = model
        return self._analysis


def prepare(model: str | Path, output: str | Path, key_path: str | Path, options: StainOptions | None = None,
            preprocessing: Preprocessing | PreprocessingRequest | None = None, progress: Progress | None = None,
            record_path: str | Path | None = None, artefacts: Artefacts | None = None) -> StainJob:
    """Check every path, load and check the model once, resolve its preprocessing, find its head (or
    dense output) and host layer, refuse what cannot work, and draw the seed."""
    out_path, key_path, record = checked_job_outputs(model, output, key_path, record_path)
    job = load_job(model, options, preprocessing, progress)
    return job.for_key(out_path, key_path, record, job.opts.seed, artefacts, job.clock)


def load_job(model: str | Path, options: StainOptions | None = None,
             preprocessing: Preprocessing | PreprocessingRequest | None = None,
             progress: Progress | None = None) -> StainJob:
    """The model's part of :func:`prepare`, for any number of keys (:meth:`StainJob.for_key` gives each its
    outputs and seed): load and check the model, settle its preprocessing, head, host and variant."""
    clock = Stopwatch()
    opts = options or StainOptions()
    loaded = load_model(model)
    opts.check()
    pre, notes = settle_preprocessing(loaded.model, loaded.path, preprocessing)
    refuse_nonfinite(loaded, pre, opts.providers)
    view = GraphView(loaded.model, pre.input_shape())
    head = head_mod.find_scores_head(view)
    dense = find_dense_output(view) if head is None else None
    if head is None and dense is None:
        raise UnsupportedModelError(head_mod.no_head_message(view, "which the black-box signature needs"))
    if dense is not None:
        refuse_dense_mode(opts)
    hosts = find_hosts(loaded.model, view)
    host, route = _host(hosts, view, head, opts)
    auto = opts.variant == "auto"
    opts, why = resolve_variant(opts, host, head, route, view)
    if why:
        notes = [*notes, auto_note(why)]
    if auto and opts.mode == "inplace" and head is not None:
        check_quantized_weights(view, host, head, opts.variant)  # the resolved variant's edits
    unset = Path()  # a model's job has no outputs until for_key gives it a key's
    return StainJob(loaded=loaded, opts=opts, pre=pre, view=view, hosts=hosts, host=host, head=head, dense=dense,
                    route=route, seed=0, rng=np.random.default_rng(0), output=unset, key_path=unset, record=unset,
                    artefacts=None, progress=progress or Silent(), notes=list(notes), clock=clock,
                    auto_variant=auto)


def _host(hosts: list[HostLayer], view: GraphView, head: head_mod.Head | None,
          opts: StainOptions) -> tuple[HostLayer, Any]:
    """The host layer (and, in place, its route to the head), refused before any work if out of reach."""
    if head is None:
        host = choose_dense_host(hosts, opts.layer)
        refuse_underflowing_target(opts.fpr, host, opts.max_draws)
        return host, None
    host = choose_host(hosts, view, head, opts.mode, opts.layer)
    refuse_underflowing_target(opts.fpr, host, opts.max_draws)
    if opts.mode != "inplace":
        return host, None
    if opts.variant != "auto":  # else checked once resolved (prepare)
        check_quantized_weights(view, host, head, opts.variant)
    return host, head_mod.direct_route(view, host, head)[0]


def resolve_variant(opts: StainOptions, host: HostLayer, head: head_mod.Head | None, route: Any,
                    view: GraphView) -> tuple[StainOptions, str | None]:
    """The variant ``auto`` stands for, and why it is not the additive one where it could have been.

    In place on a classifier, ``auto`` is the additive variant: the detector hides in a working neuron whose
    classifier column, row and bias no weight statistic singles out, the classifier keeps its scale (int8
    quantises it as the original), and the trigger's signature is the shift of the scores that column
    drives. Where that cannot work (a per-channel scale or sibling heads on the route read the hidden
    channel's own output, a PReLU, a per-tensor int8 classifier) or the head has too few classes for a
    shift to be specific (fewer than one class signature needs for the black-box chance target), the
    non-additive variant overwrites a channel. Inserted and dense stains keep the non-additive branch."""
    if opts.variant != "auto":
        return opts, None
    if opts.mode != "inplace" or head is None or not head.linear or route is None:
        return dataclasses.replace(opts, variant="non-additive"), None
    if route.affine or route.siblings:
        why = (f"a per-channel scale or shift ({route.affine[0][0]})" if route.affine else
               f"other heads ({', '.join(s.node for s in route.siblings)}) beside the classifier") + \
            " on the route read the hidden channel's own output"
    elif not chance.single_suffices(head.classes, chance.chance_target(opts.fpr, opts.chance)):
        # the shift signature reads the K − 1 differences between the trigger's scores; with few classes it has
        # few to read, and a drift in them passes or fails it (RapidOCR's two classes: 1 % weight noise read
        # −3.7 against 0.5): where one class signature would not meet the chance target, keep the class one
        why = f"{head.classes} classes are too few for the additive stain's shift signature"
    elif host.activation == "prelu":
        why = "the host's PReLU becomes a ReLU on the stained channel"
    elif view.is_quantized(head.weight) and not view.quantized(head.weight).per_axis:
        why = "the int8 classifier is quantised per tensor"
    else:
        return dataclasses.replace(opts, variant="additive"), None
    return dataclasses.replace(opts, variant="non-additive"), why


def auto_note(why: str) -> str:
    return (f"the stain overwrites a channel (non-additive variant): {why}, so the additive variant, which hides "
            "the detector in a working channel, cannot be used here; the overwritten channel's classifier "
            "column stands out among the layer's columns")


# -- calibration -----------------------------------------------------------------------------------------
@dataclasses.dataclass
class CalibrationPass:
    """One onnxruntime pass over the calibration images with feature taps."""

    pixels: np.ndarray  # uint8 [N, H, W, 3]
    inputs: np.ndarray  # the model's inputs for them
    outputs: dict[str, np.ndarray]  # the tapped tensors, the host's input excepted (it is ``phi``)
    phi: np.ndarray  # the host's neuron inputs [N, P, m]
    stats: detector.FeatureStats
    radius: float  # R, the calibrated radius the ball bound assumes
    tapped: onnx.ModelProto  # the model with the taps as outputs
    session: Any | None  # an onnxruntime session of ``tapped`` (None once released)


def calibration_pass(job: StainJob, images: Any, taps: list[str]) -> CalibrationPass:
    """Run the calibration images (``images``, else the built-in calibration photos) with ``taps``
    (the host's input first; it stays in ``outputs`` where another tap names it too) and measure the centre
    and radius of the host's natural features."""
    pixels = calibration_pixels(images, job.pre, job.progress)
    x_cal = job.pre.to_input(pixels)
    shared = job.host.input in taps[1:]  # the host may read the classifier's own input (a last Dense layer)
    taps = list(dict.fromkeys(taps))
    tapped = with_outputs(job.analysis_model(), taps)
    sess = session(tapped, job.opts.providers)
    with job.progress.task("calibration pass", total=len(x_cal)) as task:
        outputs = run_batches(sess, x_cal, taps, batch=job.opts.batch, progress=task.advance)
    host_in = outputs[job.host.input] if shared else outputs.pop(job.host.input)
    phi = neuron_inputs(job.host, host_in)
    stats = detector.FeatureStats.from_features(phi)
    return CalibrationPass(pixels=pixels, inputs=x_cal, outputs=outputs, phi=phi, stats=stats,
                           radius=natural_radius(stats.max_radius, job.host), tapped=tapped, session=sess)


# -- the key and the write -------------------------------------------------------------------------------
def host_fields(host: HostLayer, selected: np.ndarray) -> dict[str, Any]:
    """The key's host section fields every stain writes (the tapped output and channels vary)."""
    return dict(name=host.name, op=host.op, input=host.input, m=host.m, positions=host.positions,
                selected_positions=tuple(int(p) for p in selected), kernel=tuple(host.kernel),
                strides=tuple(host.strides), pads=tuple(host.pads), dilations=tuple(host.dilations),
                groups=host.groups, out_hw=tuple(host.out_hw) if host.out_hw else None)


def detector_section(direction: np.ndarray, centre: np.ndarray, phi: np.ndarray, scores: np.ndarray, *,
                     threshold: float, tau0: float, s_star: float, gain: float, delta: float, draws: int,
                     max_draws: int, offset: float | None = None) -> DetectorSection:
    """The key's detector: direction, centre, thresholds, and the trigger's scores and radii (``phi``)."""
    return DetectorSection(direction=F8.of(direction), centre=F8.of(centre), threshold=threshold, tau0=tau0,
                           s_star=s_star, gain=gain, delta=delta, offset=offset, trigger_scores=F8.of(scores),
                           trigger_radii=F8.of(detector.radii(phi, centre)), draws=draws, max_draws=max_draws)


def stain_key(job: StainJob, trigger: np.ndarray, **sections: Any) -> Key:
    """A stain key: the envelope, the job's preprocessing and seed, the trigger PNG, and ``sections``."""
    return Key(**envelope("stain"), preprocessing=job.pre, seed=job.seed,
               trigger=TriggerSection(png=encode_png(trigger), height=job.pre.height, width=job.pre.width),
               **sections)


def write(job: StainJob, stained: onnx.ModelProto, key_of: Callable[[str], Key]) -> str:
    """Stage the model, then the key ``key_of(its SHA-256)`` and the record, and commit them as one unit
    (:mod:`onnxstain.outputs`; with ``job.artefacts`` the caller commits). Returns the model's SHA-256."""
    with write_unit(job.artefacts) as writer:  # staged, synced; key, record, then model renamed
        digest = writer.stage_model(stained, job.output, source=job.loaded)
        writer.stage_key(key_of(digest), job.key_path, job.record)
    job.clock.lap("save")
    job.clock.total()
    return digest
