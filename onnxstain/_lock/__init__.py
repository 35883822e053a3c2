"""The lock pipeline (private): the gate and in-place locks of classifiers and detectors, the dense
output gate, and their stages (job, site, calibration, patch search, edit, key).

The public entry points are :func:`onnxstain.lock` and :class:`onnxstain.LockOptions`."""
