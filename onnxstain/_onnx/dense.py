"""Dense outputs: a model whose output is a map ``[B, C, H, W]`` (saliency, segmentation), not class scores.

The signature of a stain on such a model is added to the map's *logits*: the input of a final
``Sigmoid`` when there is one (the output is then still a valid probability map), else the output
itself.
"""

from __future__ import annotations

import dataclasses

from .graph import GraphView


@dataclasses.dataclass(frozen=True)
class DenseOutput:
    output: str  # graph output name
    logits: str  # tensor the signature is added to (before a final Sigmoid, if any)
    squashed: bool  # a Sigmoid follows ``logits``
    shape: tuple[int, int, int] | None  # C, H, W (None until a run shows it, when the graph does not say)


def find_dense_output(view: GraphView) -> DenseOutput | None:
    """The model's dense output: its rank-4 output, or None. With several (MTCNN's P-Net gives a face
    map and a box map), the first whose logits are not normalised across channels by a ``Softmax`` —
    a pattern added before a Softmax would be read back only up to a per-position shift — else the
    first."""
    dims = view.resolved().dims
    maps = [o for o in view.output_names if (s := dims.get(o)) is not None and len(s) == 4]
    if not maps:
        return None
    plain = [o for o in maps if (p := view.producer.get(o)) is None or p.op_type != "Softmax"]
    name = (plain or maps)[0]
    shape = dims[name]
    producer = view.producer.get(name)
    squashed = producer is not None and producer.op_type == "Sigmoid"
    logits = producer.input[0] if producer is not None and squashed else name
    c, h, w = shape[1], shape[2], shape[3]
    known = (int(c), int(h), int(w)) if isinstance(c, int) and isinstance(h, int) and isinstance(w, int) else None
    return DenseOutput(output=name, logits=logits, squashed=squashed, shape=known)
