"""The stain pipeline (private): prepare a job, calibrate, search a trigger, edit, check, write the key.

The public entry points are :func:`onnxstain.stain` and :class:`onnxstain.StainOptions`."""
