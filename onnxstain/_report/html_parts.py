"""The pieces every self-contained HTML report is made of: the page's CSS, escaping, the
bound/measured tag, and matplotlib figures embedded as base64 PNG.

matplotlib is imported lazily, with the Agg canvas (no pyplot, no global backend change), and only
here: ``pip install 'onnxstain[plots]'``.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

from ..errors import BadInputError

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:980px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0;width:100%}
th,td{border:1px solid #ddd;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f4f4f4;font-weight:600;width:32%}
td.num{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;white-space:nowrap}
.tag{display:inline-block;font-size:.78em;padding:0 .4em;border-radius:3px;margin-right:.3em}
.bound{background:#e3edf9;color:#1a4d8f}.measured{background:#e6f4e6;color:#1d6b1d}
.ok{color:#1d6b1d;font-weight:600}.bad{color:#a12020;font-weight:600}
.small{font-size:.88em;color:#555}img{max-width:100%;border:1px solid #eee}
"""


def escape(x: Any) -> str:
    """``str(x)``, HTML-escaped."""
    return html.escape(str(x))


def tag(kind: str) -> str:
    """The small label that says whether a number is a ``bound`` or a measurement."""
    return f'<span class="tag {"bound" if kind == "bound" else "measured"}">{kind}</span>'


def png(fig: Any) -> str:
    """A matplotlib figure as base64 PNG (for ``<img src="data:image/png;base64,…">``)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def figure(width: float, height: float) -> Any:
    """A matplotlib figure on the Agg canvas, or ``BadInputError`` naming the extra to install."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise BadInputError("the HTML report needs matplotlib: pip install 'onnxstain[plots]'") from None
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig
