"""Reports (private): the evaluation of a stain, the audit of a lock, their records (JSON) and HTML pages.

The public entry points are :func:`onnxstain.evaluate` and :func:`onnxstain.audit_lock`."""
