"""How well one model's outputs match another's, image by image, as a key's model is judged (numpy only).

Top-1 equality for classifiers (a one-score head: its decision, at the output's threshold), the Pearson
correlation of output maps for dense-output keys (whose references say "correlation"), the per-image
anchor-level mAP for detectors (NaN where the reference detects nothing). Used by the lock audit and by
``quantize``'s check of a quantised model against its float one.
"""

from __future__ import annotations

import numpy as np

from ..errors import KeyMismatchError
from ..keys import Key
from ..math.agreement import decision_classes, top1, top1_agreement
from ..math.detection_agreement import per_image_anchor_map
from ..signature import map_agreement


class OutputMatch:
    """Per image, how well a prediction matches a reference: top-1 equality (classifiers), the Pearson
    correlation of output maps (dense-output locks, whose keys say "correlation"), or the per-image
    anchor-level mAP (detectors; NaN where nothing is detected)."""

    def __init__(self, key: Key, threshold: float = 0.0) -> None:
        self.dense = key.references is not None and key.references.metric == "correlation"
        self.layout = key.detection_layout()
        self.labels = key.detection_labels()
        self.key = key
        self.classes = key.model.classes
        self.threshold = threshold  # a one-score output: its decision threshold (1/2 after a Sigmoid)

    def __call__(self, pred: np.ndarray, ref: np.ndarray) -> np.ndarray:
        if self.dense:
            return map_agreement(pred, ref)
        if self.layout is not None:
            a, b = self.layout
            if ref[0].size != a * b:
                raise KeyMismatchError(f"the model gives {ref[0].size} scores per image; the key's model.layout "
                                       f"{list(self.layout)} needs {a * b}")
            return per_image_anchor_map(self.key.detection_scores(ref), self.key.detection_scores(pred), *self.labels)
        return top1_agreement(pred, ref, self.classes, self.threshold)

    @property
    def two_answers(self) -> bool:
        """A classifier with two answers (two classes, or one logit), judged by kappa (see the module doc)."""
        return not self.dense and self.layout is None and decision_classes(self.classes) == 2

    def answers(self, scores: np.ndarray) -> np.ndarray:
        """Per image, the top-1 answer at each step ``[N, T]`` (two-answer heads; empty otherwise)."""
        if not self.two_answers:
            return np.empty((len(scores), 0), np.int64)
        return top1(scores, self.classes, self.threshold)

    @property
    def metric(self) -> str:
        return "correlation" if self.dense else "anchor mAP" if self.layout is not None else "top-1"
