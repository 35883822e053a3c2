"""A small, real inference endpoint for an ONNX model (onnxruntime behind the standard library's HTTP server),
to test ``onnxstain identify --endpoint`` against on 127.0.0.1.

Protocol (:mod:`onnxstain.fleet.queries`): ``POST /predict`` with a ``.npy`` body of preprocessed inputs
``[N, ...]`` (float32); the answer is a ``.npy`` of the model's first output. Anything else: 400/404 with a
one-line reason. ``GET /health`` answers ``ok``.

    python tools/serve_model.py dist/globex.onnx --port 8000
    onnxstain identify --endpoint http://127.0.0.1:8000/predict --registry fleet.db
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MAX_BODY = 1 << 30


def make_server(model: str | Path, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """An HTTP server serving ``model`` (``port=0``: a free port, see ``server.server_address``)."""
    from onnxstain.runtime import session

    sess = session(str(model))
    lock = threading.Lock()  # one run at a time: onnxruntime's session is thread-safe, the CPU is not bigger

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, code: int, body: bytes, kind: str = "text/plain") -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # the standard library's names
            if self.path == "/health":
                self._answer(200, b"ok\n")
            else:
                self._answer(404, b"not found\n")

        def do_POST(self) -> None:
            if self.path != "/predict":
                self._answer(404, b"not found\n")
                return
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 < length <= MAX_BODY:
                self._answer(400, b"a .npy body is needed\n")
                return
            try:
                x = np.load(io.BytesIO(self.rfile.read(length)), allow_pickle=False).astype(np.float32)
                with lock:
                    y = sess.run(None, {sess.get_inputs()[0].name: x})[0]
            except Exception as exc:  # a bad request is the client's: say why in one line
                self._answer(400, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}\n".encode())
                return
            buf = io.BytesIO()
            np.save(buf, np.asarray(y), allow_pickle=False)
            self._answer(200, buf.getvalue(), "application/x-npy")

        def log_message(self, format: str, *args: object) -> None:  # quiet: one line per request is noise
            pass

    return ThreadingHTTPServer((host, port), Handler)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    args = ap.parse_args(argv)
    server = make_server(args.model, args.host, args.port)
    host, port = server.server_address[:2]
    print(f"serving {args.model} at http://{host}:{port}/predict", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
