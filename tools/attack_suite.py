"""Attack suite: what a pipeline or a thief holding only the marked ONNX file does to each mark, measured.

For each model (``--models``, names from ``models/corpus.py``) and each mark (``--marks``: ``stain-inplace``
and ``stain-insert`` with the default settings (in place the default is the additive variant where the
route allows it), ``stain-additive`` and ``stain-overwrite`` (in place, hidden in a working neuron /
overwriting one), ``lock-gate`` — the default lock —, ``lock-inplace`` and ``lock-shuffle``),
the mark is made once with ``--seed``; then every attack of ``--attacks`` is applied to the marked model
(and, for the toolchain and weight attacks, to the original, so that the attacked model is compared with the
attacked original). One interface for every attack (:class:`Attack`): a name, a family and a function
that writes the attacked model and returns what it cost.

Families:

- **toolchain** — what a deployment pipeline does next: onnxruntime basic and extended optimisation,
  onnxsim, onnxslim, fp16 (onnxconverter-common), int8 dynamic (per tensor, the default, and per channel)
  and int8 static QDQ per tensor and per channel (onnxruntime.quantization; the static ones calibrated on
  64 natural images — 32 calibration photos × 2 views — that the evaluation does not use; the ``-keyed``
  ones calibrated as ``onnxstain quantize`` does with the key: a lock's patch on every other image, a
  stain's triggers added);
- **weights** — 1 % Gaussian weight noise (relative to each tensor's std), magnitude pruning of 10 % and
  30 % of every Conv/Gemm/MatMul weight, and fine-tuning of the classifier (300 Adam steps at lr 1e-3 and
  1e-2 on 64 photos labelled with the original's top-1: a thief with a small labelled set);
- **removal** — a thief's edits aimed at a mark, from the graph alone: zero the classifier column with
  the largest norm (the in-place stain's signature column stands out), reset the classifier bias to
  its median (the in-place lock's disruption), bypass each of the last Mul/Add nodes and every gather in
  turn (an inserted branch, gate or reordering: the best candidate is reported, with how many were tried),
  for a lock whose detector reads a pixel window through a ``Slice`` of the input, the patch read off the
  detector's weights (sign → 0/255), and for a lock whose order comes from a sort of the input (the
  shuffle lock), a search of the order pinned in place of the sort (:func:`order_search`: swaps kept
  when they lower the cross-entropy on the 64 labelled photos, for ``ORDER_SEARCH_SECONDS``);
- **detection** — how the marked model gives itself away: the rank of the mark's slices among their
  tensor's slices on robust z-scores (:mod:`onnxstain.math.outliers`: norm, max |w|, max/median of rows
  and columns, bias value both ways). The mark's slices: where an edit concentrates (slices changed by
  ≥ a tenth of the largest change, when they are at most 5 % of the tensor's; a compensation spread over
  every slice locates nothing) and, for an in-place mark, the host channel's row and bias and the classifier
  column it feeds, as the key names them. Found: any of them in the top 1 %. Structural tells: nodes
  added, op types new to the model, input consumers added.

Each result row: does the mark survive (``verify`` exit 0 for a stain; for a lock, the patch still
opens it and its absence still locks), top-1 agreement with the original (and, for a toolchain
transform, the transformed original's), and the attacker's cost. Writes ``attack_suite.json``,
``attack_suite.md`` (every row) and ``attack_suite_summary.md`` (attack × model and mark) to ``--out``;
``--tables`` merges earlier runs' JSON files into those tables.

    python tools/attack_suite.py --out out/attacks                                   # 3 models, default marks
    python tools/attack_suite.py --models mobilenet_v2 --marks stain-inplace --attacks int8-dynamic,noise-1%
    python tools/attack_suite.py --tables out/a/attack_suite.json out/b/attack_suite.json --out out/all
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import onnxstain  # noqa: E402
from onnxstain.errors import OnnxStainError  # noqa: E402
from onnxstain.keys import Key, load_key  # noqa: E402
from onnxstain.math import outliers  # noqa: E402
from onnxstain.naturalset import natural_images  # noqa: E402
from onnxstain.patch import Patch, paste_pixels  # noqa: E402
from onnxstain.runtime import run_batches, session, with_outputs  # noqa: E402
from onnxstain.verify import key_patch, key_triggers  # noqa: E402

DEFAULT_MODELS = ("mobilenet_v2", "rapidocr_cls", "efficientnet_lite0_dynamo")
MARKS = ("stain-inplace", "stain-insert", "stain-additive", "stain-overwrite", "lock-gate", "lock-inplace",
         "lock-shuffle")
DEFAULT_MARKS = ("stain-inplace", "stain-insert", "lock-gate")
WEIGHT_OPS = {"Conv": 1, "Gemm": 1, "MatMul": 1}  # op → index of its weight input


# -- context ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Context:
    """What every attack may use: the image sets at the model's input size (the attacker's own photos)."""

    key: Key
    calibration: np.ndarray  # uint8 [N,H,W,3]: static quantisation's calibration photos
    probe: np.ndarray  # uint8 [N,H,W,3]: the attacker's photos to check an edit keeps the model working
    seed: int
    labels: np.ndarray | None = None  # the calibration photos' labels for fine-tuning: the original's top-1

    def inputs(self, pixels: np.ndarray) -> np.ndarray:
        return self.key.preprocessing.to_input(pixels)


def _scores(model: Path | onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = session(model if isinstance(model, onnx.ModelProto) else str(model))
    name = sess.get_outputs()[0].name
    out = run_batches(sess, x, [name], batch=16)[name]
    return np.asarray(out, np.float64).reshape(len(x), -1)


def top1(model: Path | onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return _scores(model, x).argmax(axis=1)


# -- attacks ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Attack:
    name: str
    family: str  # toolchain | weights | removal
    apply: Callable[[Path, Path, Context], str]  # (marked model, output path, context) → cost note
    on_original: bool = False  # transform the original too and compare like with like


def _ort_optimised(level: str) -> Callable[[Path, Path, Context], str]:
    def apply(src: Path, dst: Path, ctx: Context) -> str:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_ENABLE_{level.upper()}")
        opts.optimized_model_filepath = str(dst)
        ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
        return "one session"
    return apply


def _onnxsim(src: Path, dst: Path, ctx: Context) -> str:
    import onnxsim

    model, ok = onnxsim.simplify(onnx.load(src))
    if not ok:
        raise RuntimeError("onnxsim could not validate its result")
    onnx.save(model, dst)
    return "one call"


def _onnxslim(src: Path, dst: Path, ctx: Context) -> str:
    import onnxslim

    onnx.save(onnxslim.slim(onnx.load(src)), dst)
    return "one call"


def _fp16(src: Path, dst: Path, ctx: Context) -> str:
    from onnxconverter_common import float16

    onnx.save(float16.convert_float_to_float16(onnx.load(src), keep_io_types=True), dst)
    return "one call"


def _int8_dynamic(per_channel: bool) -> Callable[[Path, Path, Context], str]:
    def apply(src: Path, dst: Path, ctx: Context) -> str:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel)
        return "one call"
    return apply


def _int8_static(per_channel: bool, keyed: bool = False) -> Callable[[Path, Path, Context], str]:
    """Static QDQ int8. ``keyed``: calibrated as ``onnxstain quantize`` does with the key: a lock's patch on
    every other calibration image (the quantiser must see the gate open to keep its range; a shuffle lock's on
    every image, its unpatched activations being scrambled), a stain's triggers added (its detector's firing
    must lie inside the ranges)."""
    def apply(src: Path, dst: Path, ctx: Context) -> str:
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

        name = onnx.load(src, load_external_data=False).graph.input[0].name
        pixels = ctx.calibration
        every = 1 if ctx.key.shuffle is not None else 2
        if keyed and ctx.key.kind == "lock":
            pixels = pixels.copy()
            pixels[::every] = paste_pixels(pixels[::every], key_patch(ctx.key))
        elif keyed:
            pixels = np.concatenate([pixels, key_triggers(ctx.key)])
        x = ctx.inputs(pixels)

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.rows = iter(x[i:i + 1] for i in range(len(x)))

            def get_next(self) -> dict[str, np.ndarray] | None:
                row = next(self.rows, None)
                return None if row is None else {name: row}

        quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
        keyed_text = (" and the triggers" if ctx.key.kind != "lock" else ", every one patched" if every == 1 else
                      ", every other one patched")
        return f"{len(x)} calibration images" + (keyed_text if keyed else "")
    return apply


def tensor_protos(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Every stored tensor by the name the graph reads it under: initializers and ``Constant`` nodes' values
    (paddle2onnx stores all weights as Constant nodes). Editing a returned proto edits the model."""
    out = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                out[node.output[0]] = value
    return out


def _set(proto: onnx.TensorProto, array: np.ndarray) -> None:
    proto.CopyFrom(numpy_helper.from_array(array.astype(numpy_helper.to_array(proto).dtype), proto.name))


def _weights(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """The float weight tensors of Conv, Gemm and MatMul nodes."""
    inits = tensor_protos(model)
    names = {n.input[WEIGHT_OPS[n.op_type]] for n in model.graph.node
             if n.op_type in WEIGHT_OPS and len(n.input) > 1 and n.input[WEIGHT_OPS[n.op_type]] in inits}
    return [inits[n] for n in sorted(names) if inits[n].data_type == onnx.TensorProto.FLOAT]


def _edit_weights(edit: Callable[[np.ndarray, np.random.Generator], np.ndarray]) -> Callable[..., str]:
    def apply(src: Path, dst: Path, ctx: Context) -> str:
        model = onnx.load(src)
        rng = np.random.default_rng(ctx.seed)
        tensors = _weights(model)
        for t in tensors:
            _set(t, edit(numpy_helper.to_array(t), rng))
        onnx.save(model, dst)
        return f"{len(tensors)} weight tensors"
    return apply


def _noise(level: float) -> Callable[..., str]:
    return _edit_weights(lambda w, rng: w + rng.normal(0.0, level * float(w.std()), w.shape))


def _prune(fraction: float) -> Callable[..., str]:
    def edit(w: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        cut = np.quantile(np.abs(w), fraction)
        return np.where(np.abs(w) <= cut, 0.0, w)
    return _edit_weights(edit)


def _classifier(model: onnx.ModelProto) -> tuple[onnx.NodeProto, dict[str, onnx.TensorProto]] | None:
    """The last Gemm/MatMul with a stored weight: the classifier a thief reads first."""
    inits = tensor_protos(model)
    for node in reversed(model.graph.node):
        if node.op_type in ("Gemm", "MatMul") and len(node.input) > 1 and node.input[1] in inits:
            return node, inits
    return None


def _prune_top_column(src: Path, dst: Path, ctx: Context) -> str:
    model = onnx.load(src)
    found = _classifier(model)
    if found is None:
        raise NotApplicable("no Gemm/MatMul classifier with stored weights")
    node, inits = found
    w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
    trans_b = any(a.name == "transB" and a.i for a in node.attribute)
    feat_axis = 1 if trans_b else 0  # the axis over input features
    norms = np.linalg.norm(w, axis=1 - feat_axis)
    j = int(norms.argmax())
    w = w.copy()
    (w[:, j] if feat_axis == 1 else w[j, :])[...] = 0.0
    _set(inits[node.input[1]], w)
    onnx.save(model, dst)
    return f"column {j} of {len(norms)} (norm {norms[j]:.3g}, median {np.median(norms):.3g})"


def _bias_median(src: Path, dst: Path, ctx: Context) -> str:
    model = onnx.load(src)
    inits = tensor_protos(model)
    for node in reversed(model.graph.node):
        bias = (node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 else
                next((i for i in node.input if i in inits), None) if node.op_type == "Add" else None)
        if bias in inits and numpy_helper.to_array(inits[bias]).size > 1:
            b = numpy_helper.to_array(inits[bias])
            _set(inits[bias], np.full_like(b, np.median(b)))
            onnx.save(model, dst)
            return f"{b.size} biases of {node.name or node.op_type} (std was {b.std():.3g})"
    raise NotApplicable("no classifier bias found")


def _finetune_head(lr: float, steps: int = 300) -> Callable[[Path, Path, Context], str]:
    """Fine-tune the classifier (the last Gemm/MatMul with a stored 2-D weight, and its bias) on the thief's
    labelled photos: the calibration images labelled with the original's top-1 (a stand-in for a labelled
    set), full batch, Adam, cross-entropy; the rest of the model frozen."""
    def apply(src: Path, dst: Path, ctx: Context) -> str:
        import torch

        model = onnx.load(src)
        consts = tensor_protos(model)
        classes = int(ctx.key.model.classes)

        def outputs(n: onnx.NodeProto) -> int:  # the weight's output dimension
            dims = consts[n.input[1]].dims
            return dims[0] if n.op_type == "Gemm" and any(a.name == "transB" and a.i for a in n.attribute) else dims[1]

        heads = [n for n in model.graph.node if n.op_type in ("Gemm", "MatMul") and len(n.input) > 1
                 and n.input[1] in consts and len(consts[n.input[1]].dims) == 2 and outputs(n) == classes]
        if not heads or ctx.labels is None:
            raise NotApplicable(f"no Gemm/MatMul with a stored 2-D weight giving the {classes} classes")
        # the largest, the first on ties: the model's own classifier comes before an inserted branch's MatMul
        node = max(heads, key=lambda n: (int(np.prod(consts[n.input[1]].dims)), -heads.index(n)))
        trans_b = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
        bias_name = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 else next(
            (n.input[1 - list(n.input).index(node.output[0])] for n in model.graph.node
             if n.op_type == "Add" and node.output[0] in n.input and
             n.input[1 - list(n.input).index(node.output[0])] in consts), None)
        sess = session(with_outputs(model, [node.input[0]]))
        feats = run_batches(sess, ctx.inputs(ctx.calibration), [node.input[0]], batch=16)[node.input[0]]
        x = torch.tensor(np.asarray(feats, np.float32).reshape(len(feats), -1))
        w0 = numpy_helper.to_array(consts[node.input[1]]).astype(np.float32)
        w = torch.tensor(w0.T if trans_b else w0, requires_grad=True)  # [C, K]
        b0 = numpy_helper.to_array(consts[bias_name]).astype(np.float32).ravel() if bias_name else None
        b = torch.tensor(b0 if b0 is not None else np.zeros(w.shape[1], np.float32), requires_grad=True)
        y = torch.tensor(ctx.labels, dtype=torch.long)
        opt = torch.optim.Adam([w, b], lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(x @ w + b, y).backward()
            opt.step()
        _set(consts[node.input[1]], w.detach().numpy().T if trans_b else w.detach().numpy())
        if bias_name:
            _set(consts[bias_name], b.detach().numpy().reshape(numpy_helper.to_array(consts[bias_name]).shape))
        onnx.save(model, dst)
        return f"{steps} Adam steps at lr {lr:g} on {len(x)} labelled images, head only"
    return apply


class NotApplicable(Exception):
    """The attack has nothing to act on in this model."""


def _bypass_candidates(model: onnx.ModelProto, last: int = 24) -> list[tuple[int, int]]:
    """(node index, input index) pairs: replace the output of one of the last Mul/Add nodes by an input, or of
    any gather (a reordering, wherever it sits) by the tensor it reorders."""
    inits = set(tensor_protos(model))
    out = []
    for i, node in enumerate(model.graph.node):
        if node.op_type in ("GatherElements", "GatherND") and node.input[0] not in inits:
            out.append((i, 0))
        elif (i >= len(model.graph.node) - last and node.op_type in ("Mul", "Add") and len(node.input) == 2):
            out += [(i, k) for k in range(2) if node.input[k] not in inits]
    return out


def _bypassed(model: onnx.ModelProto, index: int, keep: int) -> onnx.ModelProto:
    edited = onnx.ModelProto()
    edited.CopyFrom(model)
    node = edited.graph.node[index]
    old, new = node.output[0], node.input[keep]
    del edited.graph.node[index]
    for n in edited.graph.node:
        for j, name in enumerate(n.input):
            if name == old:
                n.input[j] = new
    for o in edited.graph.output:
        if o.name == old:  # keep the output's name: route it through an Identity
            edited.graph.node.append(onnx.helper.make_node("Identity", [new], [old]))
    return edited


def bypass_search(marked: Path, ctx: Context, judge: Callable[[onnx.ModelProto], float]) -> tuple[float, str]:
    """Try every bypass candidate; the best by ``judge`` (higher is better) and what it cost."""
    model = onnx.load(marked)
    best, best_what, tried = -1.0, "none", 0
    for index, keep in _bypass_candidates(model):
        try:
            edited = _bypassed(model, index, keep)
            value = judge(edited)
        except Exception:  # a candidate that breaks the graph: the attacker moves on
            continue
        tried += 1
        if value > best:
            node = model.graph.node[index]
            best, best_what = value, f"{node.op_type} {node.name or index} (input {keep})"
    return best, f"{tried} candidates tried; best: {best_what}"


def patch_from_weights(marked: Path, ctx: Context) -> Patch | None:
    """A pixel-window detector's patch read off its weights: the window from the ``Slice`` of the input,
    the pattern from the sign of the strongest filter of the first weight tensor of filters that size."""
    model = onnx.load(marked)
    image = model.graph.input[0].name
    consts = {name: numpy_helper.to_array(t) for name, t in tensor_protos(model).items()}
    pre = ctx.key.preprocessing
    for node in model.graph.node:
        if node.op_type != "Slice" or node.input[0] != image or len(node.input) < 4:
            continue
        starts, ends = (consts.get(node.input[k]) for k in (1, 2))
        axes = consts.get(node.input[3]) if len(node.input) > 3 else None
        if starts is None or ends is None or axes is None:
            continue
        spatial = (2, 3) if pre.layout == "NCHW" else (1, 2)
        box = {int(a) % 4: (int(s), int(e)) for a, s, e in zip(axes, starts, ends, strict=False)}
        (top, bottom), (left, right) = (box.get(spatial[0], (0, pre.height)), box.get(spatial[1], (0, pre.width)))
        h, w = min(bottom, pre.height) - top, min(right, pre.width) - left
        for weight in consts.values():
            if weight.ndim >= 2 and weight.shape[0] * 3 * h * w == weight.size:
                # the detector Conv's filters over the window: the strongest one (a gate's open-level channel is 0)
                filters = weight.reshape(-1, 3, h, w) if pre.layout == "NCHW" else weight.reshape(-1, h, w, 3)
                signs = filters[int(np.argmax(np.abs(filters).reshape(len(filters), -1).sum(1)))]
                hwc = np.moveaxis(signs, 0, -1) if pre.layout == "NCHW" else signs
                return Patch(np.where(hwc > 0, 255, 0).astype(np.uint8), top, left)
    return None


TOOLCHAIN = [
    Attack("ort-basic", "toolchain", _ort_optimised("basic"), True),
    Attack("ort-extended", "toolchain", _ort_optimised("extended"), True),
    Attack("onnxsim", "toolchain", _onnxsim, True),
    Attack("onnxslim", "toolchain", _onnxslim, True),
    Attack("fp16", "toolchain", _fp16, True),
    Attack("int8-dynamic", "toolchain", _int8_dynamic(False), True),
    Attack("int8-dynamic-channel", "toolchain", _int8_dynamic(True), True),
    Attack("int8-qdq-tensor", "toolchain", _int8_static(False), True),
    Attack("int8-qdq-channel", "toolchain", _int8_static(True), True),
    Attack("int8-qdq-tensor-keyed", "toolchain", _int8_static(False, keyed=True), True),
    Attack("int8-qdq-channel-keyed", "toolchain", _int8_static(True, keyed=True), True),
]
WEIGHTS = [
    Attack("noise-1%", "weights", _noise(0.01), True),
    Attack("prune-10%", "weights", _prune(0.10), True),
    Attack("prune-30%", "weights", _prune(0.30), True),
    Attack("finetune-head-1e-3", "weights", _finetune_head(1e-3)),
    Attack("finetune-head-1e-2", "weights", _finetune_head(1e-2)),
]
REMOVAL = [
    Attack("prune-top-column", "removal", _prune_top_column),
    Attack("bias-median", "removal", _bias_median),
]
ATTACKS = {a.name: a for a in TOOLCHAIN + WEIGHTS + REMOVAL}
SEARCHES = ("bypass", "patch-from-weights", "order-search")  # removal attacks that search over candidates
ORDER_SEARCH_SECONDS = 300.0  # the order search's budget (tools/README.md: 600 s on MobileNetV2's tail alone)
DETECTION = ("detection",)


PINNED = "pinned_order"


def pin_order(model: onnx.ModelProto, order: np.ndarray | None) -> onnx.ModelProto:
    """``model`` with its sort's indices (the first ``TopK``'s second output) replaced by ``order`` for every
    image (``indices · 0 + order``: one row per image, as a batch-axis gather needs), or by a graph input
    ``pinned_order`` ``[N, K]`` when ``order`` is None."""
    topk = next(n for n in model.graph.node if n.op_type == "TopK")
    edited = onnx.ModelProto()
    edited.CopyFrom(model)
    for n in edited.graph.node:
        n.input[:] = [PINNED if i == topk.output[1] else i for i in n.input]
    if order is None:
        k = int(numpy_helper.to_array(tensor_protos(model)[topk.input[1]]).reshape(-1)[0])
        edited.graph.input.append(onnx.helper.make_tensor_value_info(PINNED, onnx.TensorProto.INT64, ["N", k]))
        return edited
    edited.graph.initializer.extend([numpy_helper.from_array(np.asarray(order, np.int64)[None], "pinned_row"),
                                     numpy_helper.from_array(np.array(0, np.int64), "pinned_zero")])
    at = next(i for i, n in enumerate(edited.graph.node) if n.name == topk.name) + 1
    edited.graph.node.insert(at, onnx.helper.make_node("Mul", [topk.output[1], "pinned_zero"], ["pinned_zeros"]))
    edited.graph.node.insert(at + 1, onnx.helper.make_node("Add", ["pinned_zeros", "pinned_row"], [PINNED]))
    return edited


def order_search(marked: Path, ctx: Context, seconds: float, rng: np.random.Generator
                 ) -> tuple[onnx.ModelProto, str] | None:
    """Against a lock whose order comes from a sort of the input (``TopK``): pin the sort's indices to an order
    of the attacker's choosing and search it on the thief's labelled photos (the calibration photos with the
    original's top-1, as the fine-tuning attacks use): random swaps of two blocks, kept when the cross-entropy
    falls, for ``seconds``. The model with the best order pinned, and what the search did; None without a sort."""
    model = onnx.load(marked)
    topk = next((n for n in model.graph.node if n.op_type == "TopK"), None)
    if topk is None or ctx.labels is None or int(ctx.key.model.classes) < 2:  # a one-score head: no cross-entropy
        return None
    k = int(numpy_helper.to_array(tensor_protos(model)[topk.input[1]]).reshape(-1)[0])
    sess = session(pin_order(model, None))
    image = sess.get_inputs()[0].name
    x, labels = ctx.inputs(ctx.calibration), ctx.labels

    def loss(order: np.ndarray) -> float:
        chunks = [x[i:i + 16] for i in range(0, len(x), 16)]
        z = np.concatenate([sess.run(None, {image: c, PINNED: np.tile(order, (len(c), 1))})[0]
                            for c in chunks]).astype(np.float64).reshape(len(x), -1)
        z = z - z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return float(-logp[np.arange(len(x)), labels].mean())

    order = np.arange(k)
    best, tried, kept, t0 = loss(order), 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        i, j = rng.choice(k, 2, replace=False)
        order[[i, j]] = order[[j, i]]
        value = loss(order)
        tried += 1
        if value < best:
            best, kept = value, kept + 1
        else:
            order[[i, j]] = order[[j, i]]
    placed = int((order == np.asarray(ctx.key.shuffle.order)).sum()) if ctx.key.shuffle is not None else -1
    return pin_order(model, order), (f"{tried} orders tried in {seconds:.0f} s, {kept} swaps kept; {placed} of {k} "
                                     "blocks in place (the key's order; start: the identity)")


# -- marks --------------------------------------------------------------------------------------------
def make_mark(kind: str, original: Path, work: Path, seed: int) -> tuple[Path, Path, float]:
    out, key = work / f"{kind}.onnx", work / f"{kind}.key"
    t0 = time.perf_counter()
    if kind in ("stain-additive", "stain-overwrite"):  # in place: hidden in a working neuron / overwriting one
        variant = "additive" if kind == "stain-additive" else "non-additive"
        onnxstain.stain(original, out, key, options=onnxstain.StainOptions(variant=variant, seed=seed))
    elif kind.startswith("stain"):  # the default variant ("auto": additive in place where the route allows)
        onnxstain.stain(original, out, key, options=onnxstain.StainOptions(mode=kind.split("-")[1], seed=seed))
    else:
        onnxstain.lock(original, out, key, options=onnxstain.LockOptions(kind=kind.split("-")[1], seed=seed))
    return out, key, time.perf_counter() - t0


# -- evaluation ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class Row:
    model: str
    mark: str
    attack: str
    family: str
    survives: bool | None
    agreement: float | None  # attacked marked model vs the original (stain) / the patch's view (lock)
    reference: float | None  # the attacked original vs the original, for a toolchain transform
    locked: float | None = None  # lock: the attacked model without the patch vs the original
    detail: str = ""
    cost: str = ""
    seconds: float = 0.0


class Evaluator:
    def __init__(self, name: str, original: Path, views: int, seed: int, work: Path) -> None:
        self.name, self.original, self.work, self.seed = name, original, work, seed
        self.views = views
        self._attacked_original: dict[str, Path] = {}

    def setup(self, key: Key) -> None:
        pre = key.preprocessing
        size = (pre.height, pre.width)
        self.eval_px = natural_images("heldout", size=size, views=self.views).pixels
        calib = natural_images("calibration", size=size, views=2).pixels  # 42 photos × 2 views
        self.ctx = Context(key, calib[:64], calib[64:], self.seed)
        self.ctx.labels = top1(self.original, self.ctx.inputs(self.ctx.calibration))
        self.x = self.ctx.inputs(self.eval_px)
        self.want = top1(self.original, self.x)

    def attacked_original(self, attack: Attack, mark: str) -> Path:
        """The original under the same attack (calibrated on the same images for a ``-keyed`` one)."""
        name = f"{attack.name}.{mark}" if attack.name.endswith("-keyed") else attack.name
        if name not in self._attacked_original:
            path = self.work / f"original.{name}.onnx"
            attack.apply(self.original, path, self.ctx)
            self._attacked_original[name] = path
        return self._attacked_original[name]

    def run(self, mark: str, marked: Path, key: Key, attack: Attack) -> Row:
        t0 = time.perf_counter()
        self.ctx.key = key
        path = self.work / f"{mark}.{attack.name}.onnx"
        try:
            cost = attack.apply(marked, path, self.ctx)
        except NotApplicable as exc:
            return Row(self.name, mark, attack.name, attack.family, None, None, None, detail=f"n/a: {exc}")
        except Exception as exc:  # the transform itself fails: record it
            return Row(self.name, mark, attack.name, attack.family, None, None, None,
                       detail=f"transform failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
        try:
            ref_path = self.attacked_original(attack, mark) if attack.on_original else None
            row = (self._stain_row(mark, path, key, attack, ref_path) if mark.startswith("stain")
                   else self._lock_row(mark, path, key, attack, ref_path))
        except OnnxStainError as exc:  # the transform wrote a model onnxruntime cannot load: record it
            return Row(self.name, mark, attack.name, attack.family, None, None, None,
                       detail=f"transform broke the model: {str(exc).splitlines()[0][:200]}")
        row.cost, row.seconds = cost, time.perf_counter() - t0
        return row

    def _stain_row(self, mark: str, path: Path, key: Key, attack: Attack, ref: Path | None) -> Row:
        agree = float(np.mean(top1(path, self.x) == self.want))
        reference = float(np.mean(top1(ref, self.x) == self.want)) if ref else None
        try:
            v = onnxstain.verify(path, key)
        except OnnxStainError as exc:
            return Row(self.name, mark, attack.name, attack.family, False, agree, reference,
                       detail=f"verify refused: {exc}")
        checks = "; ".join(f"{c.name} {'pass' if c.passed else 'n/a' if not c.available else 'fail'}"
                           + (f" {c.score:.3g}/{c.threshold:.3g}" if c.available and c.score is not None
                              and c.threshold is not None else "") for c in v.checks)
        return Row(self.name, mark, attack.name, attack.family, v.stained, agree, reference,
                   detail=f"{checks}; bound {v.fpr_bound}")

    def _lock_row(self, mark: str, path: Path, key: Key, attack: Attack, ref: Path | None) -> Row:
        patched = self.ctx.inputs(paste_pixels(self.eval_px, key_patch(key)))
        want_patched = top1(ref or self.original, patched)
        with_patch = float(np.mean(top1(path, patched) == want_patched))
        locked = float(np.mean(top1(path, self.x) == self.want))
        reference = float(np.mean(top1(ref, self.x) == self.want)) if ref else None
        survives = with_patch >= 0.95 and locked <= self._chance(key) + 0.02
        return Row(self.name, mark, attack.name, attack.family, survives, with_patch, reference, locked=locked,
                   detail=f"with the patch {100 * with_patch:.1f}% of the "
                          f"{'transformed ' if ref else ''}original on the same patched images; "
                          f"without {100 * locked:.1f}%")

    def _chance(self, key: Key) -> float:
        return 1.0 / max(2, int(key.model.classes))

    # removal searches: the thief's best with the model in hand; the oracle picks by agreement with the original
    def bypass(self, mark: str, marked: Path, key: Key) -> Row:
        t0 = time.perf_counter()
        best, cost = bypass_search(marked, self.ctx, lambda m: float(np.mean(top1(m, self.x) == self.want)))
        if mark.startswith("stain"):
            survives: bool | None = None
            # the thief keeps an edit that changes nothing on his photos; does the stain survive the best one?
            model = onnx.load(marked)
            survivors = []
            probe = self.ctx.inputs(self.ctx.probe)
            base = top1(model, probe)
            for index, keep in _bypass_candidates(model):
                try:
                    edited = _bypassed(model, index, keep)
                    if float(np.mean(top1(edited, probe) == base)) < 0.99:
                        continue
                    path = self.work / f"{mark}.bypass.onnx"
                    onnx.save(edited, path)
                    survivors.append(onnxstain.verify(path, key).stained)
                except Exception:
                    continue
            survives = all(survivors) if survivors else True
            detail = (f"{len(survivors)} bypasses keep ≥ 99% of the marked model's top-1 on the thief's photos; "
                      f"the stain survives {sum(survivors)} of them")
        else:
            survives = best < max(0.5, self._chance(key) + 0.1)  # a two-class model agrees half the time by chance
            detail = f"best bypass agrees {100 * best:.1f}% with the original (oracle choice)"
        return Row(self.name, mark, "bypass", "removal", survives, best, None, detail=detail, cost=cost,
                   seconds=time.perf_counter() - t0)

    def order_search(self, mark: str, marked: Path, key: Key) -> Row:
        t0 = time.perf_counter()
        self.ctx.key = key
        found = order_search(marked, self.ctx, ORDER_SEARCH_SECONDS, np.random.default_rng(self.seed))
        if found is None:
            return Row(self.name, mark, "order-search", "removal", True, None, None, detail="n/a: no sort to pin")
        model, cost = found
        opened = float(np.mean(top1(model, self.x) == self.want))
        return Row(self.name, mark, "order-search", "removal", opened <= self._chance(key) + 0.02, opened, None,
                   detail=f"the best order found opens {100 * opened:.1f}% of the held-out views", cost=cost,
                   seconds=time.perf_counter() - t0)

    def patch_from_weights(self, mark: str, marked: Path, key: Key) -> Row:
        t0 = time.perf_counter()
        patch = patch_from_weights(marked, self.ctx)
        if patch is None:
            return Row(self.name, mark, "patch-from-weights", "removal", True, None, None,
                       detail="n/a: no pixel window read through a Slice of the input with a weight of its size")
        opened = float(np.mean(top1(marked, self.ctx.inputs(paste_pixels(self.eval_px, patch))) ==
                               top1(self.original, self.ctx.inputs(paste_pixels(self.eval_px, patch)))))
        exact = bool(np.array_equal(patch.pixels, key_patch(key).pixels))
        return Row(self.name, mark, "patch-from-weights", "removal", opened < 0.5, opened, None,
                   detail=f"the patch read off the weights {'equals' if exact else 'differs from'} the key's; "
                          f"opens the lock on {100 * opened:.1f}% of images",
                   cost="sign of one weight tensor", seconds=time.perf_counter() - t0)


# -- detection ----------------------------------------------------------------------------------------
SPREAD = 0.05  # an edit touching more of a tensor's slices than this is a spread (a compensation), not a place


def _slices(w: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1).astype(np.float64)


def _key_slices(model: onnx.ModelProto, key: Key | None) -> list[tuple[str, int, int, str]]:
    """Where the key says the mark lives: the host channel's weight row and bias entry, and the classifier
    column that channel feeds (the additive stain leaves that column alone but its signature lives there).
    ``(tensor, axis, index, what)``; empty but for in-place marks with a host channel."""
    channel = None if key is None or key.mode != "inplace" else (
        key.host.host_channel if key.host.host_channel is not None else key.host.channel)
    if key is None or channel is None:
        return []
    out = []
    inits = tensor_protos(model)
    node = next((n for n in model.graph.node if n.name == key.host.name), None)
    if node is not None and len(node.input) > 1 and node.input[1] in inits:
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        axis = 0 if node.op_type == "Conv" or (node.op_type == "Gemm" and trans_b) else 1
        out.append((node.input[1], axis, channel, "host row"))
        if len(node.input) > 2 and node.input[2] in inits:
            out.append((node.input[2], 0, channel, "host bias"))
    found = _classifier(model)
    if found is not None:
        head, _ = found
        trans_b = any(a.name == "transB" and a.i for a in head.attribute)
        out.append((head.input[1], 1 if trans_b else 0, channel, "classifier column"))
    return out


def detection(name: str, mark: str, original: Path, marked: Path, key: Key | None = None) -> Row:
    """Rank of the mark's slices on per-slice weight statistics (:mod:`onnxstain.math.outliers`), and the
    structural tells. The mark's slices: where an edit concentrates (changed by ≥ a tenth of the largest
    change, in at most ``SPREAD`` of the tensor's slices) and where the key says it lives."""
    a, b = onnx.load(original), onnx.load(marked)
    ia = {name: numpy_helper.to_array(t) for name, t in tensor_protos(a).items()}
    ib = {name: numpy_helper.to_array(t) for name, t in tensor_protos(b).items()}
    places: dict[tuple[str, int], set[int]] = {}
    for tname, w1 in ib.items():
        w0 = ia.get(tname)
        if w0 is None or w0.shape != w1.shape or w1.dtype.kind != "f" or np.array_equal(w0, w1) or w1.ndim == 0:
            continue
        for axis in (0, 1) if w1.ndim >= 2 else (0,):
            change = np.linalg.norm(_slices(w1, axis) - _slices(w0, axis), axis=1)
            edited = np.flatnonzero(change >= 0.1 * change.max())
            if 0 < len(edited) <= SPREAD * len(change):
                places.setdefault((tname, axis), set()).update(edited.tolist())
    for tname, axis, index, _ in _key_slices(b, key):
        if tname in ib and ib[tname].ndim > axis and index < ib[tname].shape[axis]:
            places.setdefault((tname, axis), set()).add(index)
    worst: tuple[float, str] = (1.0, "no edited tensor")
    findings = []
    for (tname, axis), where in sorted(places.items()):
        w1 = ib[tname]
        flat = _slices(w1, axis)
        what = "entry" if w1.ndim == 1 else ("row/channel" if axis == 0 else "column")
        for stat, rank in outliers.ranks(flat).items():
            best = min(where, key=lambda i: rank[i])
            frac = rank[best] / len(flat)
            if frac < worst[0]:
                z = outliers.robust_z(outliers.slice_statistics(flat)[stat])[best]
                worst = (frac, f"{tname} {what} {best} {stat}: rank {rank[best]} of {len(flat)} (z = {z:.1f})")
            if rank[best] <= outliers.exposed_count(len(flat)):
                findings.append(f"{stat} of {what}s of {tname}: rank {rank[best]}/{len(flat)}")
    names_a = {n.name for n in a.graph.node}
    added = [n for n in b.graph.node if n.name not in names_a]
    ops_a = {n.op_type for n in a.graph.node}
    lone = sorted({n.op_type for n in added if n.op_type not in ops_a})
    image = b.graph.input[0].name
    consumers = [sum(image in n.input for n in g.graph.node) for g in (a, b)]
    tells = (f"{len(added)} nodes added" + (f", op types new to the model: {', '.join(lone)}" if lone else "")
             + (f", image input consumers {consumers[0]} → {consumers[1]}" if consumers[0] != consumers[1] else ""))
    found = bool(findings) or bool(added)
    return Row(name, mark, "detection", "detection", not found, None, None,
               detail=(f"most extreme edit: {worst[1]}; " if worst[1] != "no edited tensor" else "no weight edited; ")
               + (f"{len(findings)} statistic(s) put an edit in the top 1 %; " if findings else "")
               + tells, cost="weight statistics, no data")


# -- driver -------------------------------------------------------------------------------------------
def run_model(name: str, marks: list[str], attacks: list[str], views: int, seed: int, work: Path,
              log: Callable[[str], None]) -> list[Row]:
    from models import corpus

    entry = corpus.BY_NAME[name]
    if not entry.built():
        raise SystemExit(f"{name}: not built (./dev setup; ./dev corpus for the TensorFlow ones)")
    original = entry.path()
    ev = Evaluator(name, original, views, seed, work)
    rows: list[Row] = []
    for mark in marks:
        try:
            marked, key_path, secs = make_mark(mark, original, work, seed)
        except OnnxStainError as exc:
            rows.append(Row(name, mark, "(make)", "-", None, None, None, detail=f"refused: {exc}"))
            log(f"{name} {mark}: refused: {exc}")
            continue
        key = load_key(key_path)
        if not hasattr(ev, "ctx"):
            ev.setup(key)
        log(f"{name} {mark}: made in {secs:.0f} s")
        for attack in attacks:
            if attack == "detection":
                row = detection(name, mark, original, marked, key)
            elif attack == "bypass":
                row = ev.bypass(mark, marked, key)
            elif attack == "patch-from-weights":
                if not mark.startswith("lock"):
                    continue
                row = ev.patch_from_weights(mark, marked, key)
            elif attack == "order-search":
                if mark != "lock-shuffle":
                    continue
                row = ev.order_search(mark, marked, key)
            else:
                row = ev.run(mark, marked, key, ATTACKS[attack])
            rows.append(row)
            log(f"  {attack}: survives {row.survives}  agreement {_pct(row.agreement)} "
                f"(reference {_pct(row.reference)})  {row.detail}")
    return rows


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def markdown(rows: list[Row]) -> str:
    lines = ["| model | mark | attack | survives | agreement % | transformed original % | without patch % | "
             "detail | cost |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = {True: "yes", False: "**no**", None: "-"}[r.survives]
        lines.append(f"| {r.model} | {r.mark} | {r.attack} | {s} | {_pct(r.agreement)} | {_pct(r.reference)} | "
                     f"{_pct(r.locked)} | {r.detail} | {r.cost} |")
    return "\n".join(lines) + "\n"


def summary(rows: list[Row]) -> str:
    """One line per attack, one column per model × mark: does the mark survive, and the agreement (for a lock,
    with the patch / without it); ``broke`` where the transform wrote a model onnxruntime cannot load."""
    columns = list(dict.fromkeys((r.model, r.mark) for r in rows if r.attack != "(make)"))
    cells = {(r.attack, r.model, r.mark): r for r in rows}
    lines = ["| attack | " + " | ".join(f"{model} {mark}" for model, mark in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for attack in dict.fromkeys(r.attack for r in rows if r.attack != "(make)"):
        out = []
        for model, mark in columns:
            r = cells.get((attack, model, mark))
            if r is None or (r.survives is None and r.agreement is None):
                out.append("broke" if r is not None and r.detail.startswith("transform broke") else "–")
                continue
            verdict = {True: "yes", False: "**no**", None: "–"}[r.survives]
            figure = _pct(r.agreement) + (f" / {_pct(r.locked)}" if r.locked is not None else "")
            out.append(verdict if r.agreement is None else f"{verdict} {figure}")
        lines.append(f"| {attack} | " + " | ".join(out) + " |")
    return "\n".join(lines) + "\n"


def _write(rows: list[Row], out: Path) -> None:
    (out / "attack_suite.json").write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=1))
    (out / "attack_suite.md").write_text(markdown(rows))
    (out / "attack_suite_summary.md").write_text(summary(rows))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS))
    ap.add_argument("--marks", default=",".join(DEFAULT_MARKS), help=f"from {', '.join(MARKS)}")
    ap.add_argument("--attacks", default=",".join([*ATTACKS, *SEARCHES, *DETECTION]))
    ap.add_argument("--views", type=int, default=2, help="views per held-out photo for the agreement")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("out/attacks"))
    ap.add_argument("--tables", type=Path, nargs="+", metavar="JSON",
                    help="only write the tables of earlier runs' attack_suite.json files, merged, to --out")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.tables:
        _write([Row(**r) for path in args.tables for r in json.loads(path.read_text())], args.out)
        return 0
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization's advice on every call
    attacks = args.attacks.split(",")
    unknown = [a for a in attacks if a not in ATTACKS and a not in SEARCHES and a not in DETECTION]
    if unknown or any(m not in MARKS for m in args.marks.split(",")):
        ap.error(f"unknown attack or mark: {unknown or args.marks}")
    rows: list[Row] = []
    t0 = time.perf_counter()
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory(prefix=f"attacks-{name}-") as tmp:
            rows += run_model(name, args.marks.split(","), attacks, args.views, args.seed, Path(tmp),
                              lambda s: print(s, flush=True))
        _write(rows, args.out)
    print(f"done in {time.perf_counter() - t0:.0f} s: {args.out / 'attack_suite.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

