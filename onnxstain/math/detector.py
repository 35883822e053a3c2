"""Detector neurons: random directions, centring, firing margins and the weight formulas.

A detector reads φ ∈ R^m and scores ``S(x) = v · (φ(x) − c)`` with a unit direction ``v`` drawn
uniformly on the sphere and a centre ``c`` (the mean natural feature). It *fires* iff ``S > τ``,
where ``τ`` is the firing margin committed before ``v`` is drawn (see :mod:`onnxstain.math.bounds`).

* **Non-additive** (overwrite a neuron): pre-activation ``g · (S(x) − τ)`` with
  ``g = Δ / (s* − τ)``, so the trigger (score ``s*``) gives exactly ``Δ`` and natural inputs,
  whose scores stay near 0, give about ``−g τ < 0``: cut to zero by the ReLU. Under an activation
  whose exact zero starts lower (GELU, SiLU ...), the pre-activation is ``g (S − τ) + z`` with the
  activation's zero point ``z`` and ``g = (Δ − z)/(s* − τ)``.
  As weights: ``u = g v`` and bias ``−g (τ + v·c)``. This is the paper's
  ``u = (Δ − β)/(v·φ*) · v`` written with centring and an explicit margin.
* **Additive** (hide in a working neuron ``(w, β)``): ``u = w + κ v``, bias ``β − κ v·c``, i.e. the
  neuron's own pre-activation plus ``κ S(x)``; ``κ`` is chosen so the trigger reaches ``Δ`` at every
  selected position. The detector component ``κ S`` exceeds ``θ = κ τ`` only when ``S > τ``.
"""

from __future__ import annotations

import dataclasses

import numpy as np


def sample_direction(rng: np.random.Generator, m: int) -> np.ndarray:
    """A unit vector uniform on the sphere S^{m-1} (normalised standard Gaussian)."""
    while True:
        g = rng.standard_normal(m)
        norm = float(np.linalg.norm(g))
        if norm > 0:
            return g / norm


@dataclasses.dataclass(frozen=True)
class FeatureStats:
    """Centre and radii of natural features over (image, position) samples."""

    centre: np.ndarray  # c, shape [m]
    max_radius: float  # max ‖φ − c‖ over the calibration samples
    radius_quantiles: dict[str, float]
    samples: int

    @classmethod
    def from_features(cls, phi: np.ndarray, centre: np.ndarray | None = None) -> FeatureStats:
        """``phi``: ``[N, P, m]``; the centre is their mean unless given."""
        flat = phi.reshape(-1, phi.shape[-1]).astype(np.float64)
        c = flat.mean(axis=0) if centre is None else np.asarray(centre, dtype=np.float64)
        radii = np.linalg.norm(flat - c, axis=1)
        q = {f"{p:g}": float(np.quantile(radii, p / 100)) for p in (50, 99, 99.9, 100)}
        return cls(centre=c, max_radius=float(radii.max()), radius_quantiles=q, samples=len(flat))


def scores(phi: np.ndarray, v: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``v · (φ − c)`` for every sample; ``phi`` is ``[..., m]``."""
    return np.asarray(phi, np.float64) @ v - float(v @ c)


def radii(phi: np.ndarray, c: np.ndarray) -> np.ndarray:
    return np.linalg.norm(phi.astype(np.float64) - c, axis=-1)


@dataclasses.dataclass(frozen=True)
class NeuronEdit:
    """New effective weights (over φ) and bias of the host neuron."""

    weights: np.ndarray
    bias: float
    gain: float  # g (non-additive) or κ (additive): multiplier of the score S
    threshold: float  # τ: the neuron's detector part is active iff S > τ
    delta: float  # Δ: pre-activation reached on the trigger at its weakest selected position


def non_additive(v: np.ndarray, c: np.ndarray, tau: float, s_star: float, delta: float,
                 offset: float = 0.0) -> NeuronEdit:
    """Overwrite a neuron: pre-activation ``g (S − τ) + z`` with ``g = (Δ − z) / (s* − τ)``.

    ``z`` (``offset``, ≤ 0) is the activation's zero point: every ``S ≤ τ`` gives a pre-activation
    ≤ ``z``, where the activation is exactly 0 (ReLU: ``z = 0``; GELU: −6; see
    :mod:`onnxstain.math.activations`). The trigger still gives exactly ``Δ``.
    """
    if s_star <= tau:
        raise ValueError(f"trigger score {s_star:.4g} does not exceed the margin {tau:.4g}")
    if offset > 0 or offset >= delta:
        raise ValueError(f"offset {offset:.4g} must be ≤ 0 and below Δ = {delta:.4g}")
    g = (delta - offset) / (s_star - tau)
    return NeuronEdit(weights=g * v, bias=-g * (tau + float(v @ c)) + offset, gain=g, threshold=tau, delta=delta)


def additive_gains(
    rows: np.ndarray, biases: np.ndarray, v: np.ndarray, c: np.ndarray, tau: float,
    trigger_phi: np.ndarray, delta: float,
) -> np.ndarray:
    """``κ`` for hiding the detector in each neuron ``(rows[i], biases[i])`` (``rows`` ``[C, m]``): the
    smallest gain with which the trigger reaches ≥ Δ at every row of ``trigger_phi``."""
    s = scores(trigger_phi, v, c)
    if np.any(s <= tau):
        raise ValueError("the trigger does not exceed the margin at every selected position")
    own = np.asarray(trigger_phi, np.float64) @ np.atleast_2d(rows).T + biases  # [P, C]
    return np.maximum(np.max(np.maximum(delta - own, 0.0) / s[:, None], axis=0), 1e-6)


def additive(
    w: np.ndarray, beta: float, v: np.ndarray, c: np.ndarray, tau: float,
    trigger_phi: np.ndarray, delta: float,
) -> NeuronEdit:
    """Hide the detector in neuron ``(w, β)``: the trigger reaches ≥ Δ at every row of ``trigger_phi``."""
    kappa = float(additive_gains(w[None], np.array([beta]), v, c, tau, trigger_phi, delta)[0])
    return NeuronEdit(
        weights=w + kappa * v, bias=beta - kappa * float(v @ c), gain=kappa, threshold=tau, delta=delta
    )
