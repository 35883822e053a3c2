"""What identify's black box queries: a model file (onnxruntime) or an HTTP inference endpoint.

Both give the model's scores for a batch of preprocessed inputs, and confirm a key whose trigger shows its
signature. The endpoint protocol (what ``tools/serve_model.py`` serves): ``POST <url>`` with the body a NumPy
``.npy`` array of preprocessed inputs ``[N, ...]`` (float32, the model's layout) and ``Content-Type:
application/x-npy``; the answer is a ``.npy`` array of the model's scores output, one row per input.
"""

from __future__ import annotations

import io
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from ..errors import BadInputError, BadModelError
from ..keys import Key

REQUEST_BATCH = 32
TIMEOUT_S = 120.0
MAX_RESPONSE = 1 << 30


class Queries(Protocol):
    confirm_queries: int  # images the last confirm sent

    def scores(self, x: np.ndarray, name: str, advance: Callable[[float], None]) -> np.ndarray:
        """The scores output (``name`` where the model has it, else its first output), one row per input."""
        ...

    def confirm(self, key: Key, unlock: Key | None = None) -> bool:
        """Whether the model carries the key, read with the controls (and, for a file, the weights); ``unlock``:
        the lock key of a stained-then-locked copy, whose patch goes into every image."""
        ...


class ModelQueries:
    """A model file: onnxruntime runs it; a key is confirmed by :func:`onnxstain.verify` on the file."""

    def __init__(self, loaded: Any, providers: list[str] | None) -> None:
        from ..runtime import session

        self.loaded, self.providers = loaded, providers
        self.sess = session(loaded.model, providers)
        self.confirm_queries = 0

    def scores(self, x: np.ndarray, name: str, advance: Callable[[float], None]) -> np.ndarray:
        from ..runtime import image_rows, run_batches

        outputs = {o.name for o in self.sess.get_outputs()}
        name = name if name in outputs else self.sess.get_outputs()[0].name
        return image_rows(run_batches(self.sess, x, [name], progress=advance)[name], name, len(x))

    def confirm(self, key: Key, unlock: Key | None = None) -> bool:
        from ..verify import verify

        res = verify(self.loaded.path, key, providers=self.providers, unlock=unlock)
        self.confirm_queries = res.images  # its triggers, the controls made from them, the natural photos
        return res.stained


class EndpointQueries:
    """An HTTP endpoint (see the module docstring); a key is confirmed by its signature on the trigger and on
    verify's controls made from it (shuffled, mirrored, grey), with the drift gate — an endpoint has no weights."""

    def __init__(self, url: str) -> None:
        if not url.startswith(("http://", "https://")):
            raise BadInputError(f"--endpoint must be an http(s) URL, not {url!r}")
        self.url = url
        self.confirm_queries = 0

    def _post(self, x: np.ndarray) -> np.ndarray:
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(x, np.float32), allow_pickle=False)
        req = urllib.request.Request(self.url, data=buf.getvalue(), method="POST",
                                     headers={"Content-Type": "application/x-npy"})
        try:
            with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
                body = resp.read(MAX_RESPONSE + 1)
        except urllib.error.HTTPError as exc:
            raise BadInputError(f"endpoint {self.url} answered HTTP {exc.code}: {exc.reason}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            raise BadInputError(f"endpoint {self.url} cannot be reached: {getattr(exc, 'reason', exc)}") from None
        try:
            out = np.load(io.BytesIO(body), allow_pickle=False)
        except (ValueError, OSError, EOFError):
            raise BadModelError(f"endpoint {self.url} did not answer with a .npy array") from None
        if out.ndim == 0 or out.shape[0] != len(x):
            raise BadModelError(f"endpoint {self.url} answered {list(out.shape)} for {len(x)} inputs; it needs one "
                                "row per input")
        return np.asarray(out).reshape(len(x), -1)

    def scores(self, x: np.ndarray, name: str, advance: Callable[[float], None]) -> np.ndarray:
        rows = []
        for i in range(0, len(x), REQUEST_BATCH):
            rows.append(self._post(x[i:i + REQUEST_BATCH]))
            advance(min(REQUEST_BATCH, len(x) - i))
        return np.concatenate(rows)

    def confirm(self, key: Key, unlock: Key | None = None) -> bool:
        from ..patch import paste_pixels
        from ..signature import synthetic_controls
        from ..verify import black_box_check, key_patch, key_triggers

        triggers = key_triggers(key)
        images = np.concatenate([triggers, synthetic_controls(triggers[0])])
        if unlock is not None:
            images = paste_pixels(images, key_patch(unlock))
        self.confirm_queries = len(images)
        raw = self.scores(key.preprocessing.to_input(images), key.model.scores, lambda n: None)
        return black_box_check(key, raw, len(triggers)).passed
