"""What every onnxstain command shares: the error handler (one line per mistake, exit codes), the printer, the
progress bars and the reusable option groups (preprocessing, providers). The commands live in
:mod:`onnxstain.cli` and :mod:`onnxstain.fleet.commands`.

Exit codes: 0 success (``verify``: stained), 1 negative (``verify``: not stained), 2 error (one line
``onnxstain: error: …``), 3 internal error (a bug: one line and a "please report" line; the traceback with
``--debug`` or ``ONNXSTAIN_DEBUG=1``).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import click

from .errors import OnnxStainError

if TYPE_CHECKING:
    from .preprocess import PreprocessingRequest

EXIT_OK, EXIT_NEGATIVE, EXIT_ERROR, EXIT_INTERNAL = 0, 1, 2, 3
_LIBRARIES = ("onnx", "onnxruntime", "google")  # their exceptions on bad input are the user's to fix
_debug = False  # set by the main group's --debug (set_debug)


# -- output helpers ----------------------------------------------------------------------------------
def _console():
    from rich.console import Console

    return Console(stderr=False, highlight=False, width=None if sys.stdout.isatty() else 200)


def print_lines(renderables: list[Any]) -> None:
    """Print a result's summary (see each result's renderer) to stdout."""
    con = _console()
    for item in renderables:
        con.print(item)


class RichProgress:
    """Progress bars on stderr for work that takes more than a moment."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    @contextlib.contextmanager
    def task(self, description: str, total: float | None) -> Iterator[Any]:
        from .progress import _Silent

        if not self.enabled:
            yield _Silent()
            return
        from rich.console import Console
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn()]
        with Progress(*columns, console=Console(stderr=True), transient=True) as prog:
            tid = prog.add_task(description, total=total)

            class _Task:
                def advance(self, n: float = 1) -> None:
                    prog.advance(tid, n)

                def update(self, text: str) -> None:
                    prog.update(tid, description=text)

            yield _Task()


def _one_line(text: str) -> str:
    parts = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return " ".join(parts)[:500] or "unknown error"


def _fail(message: str) -> None:
    click.echo(f"onnxstain: error: {_one_line(message)}", err=True)
    sys.exit(EXIT_ERROR)


def _debugging() -> bool:
    return _debug or os.environ.get("ONNXSTAIN_DEBUG", "") not in ("", "0")


def _internal(exc: BaseException) -> None:
    if _debugging():
        traceback.print_exception(exc)
    click.echo(f"onnxstain: internal error: {type(exc).__name__}: {_one_line(str(exc))}", err=True)
    click.echo("onnxstain: this is a bug in onnxstain; please report it with the command line"
               + ("" if _debugging() else " and the traceback that --debug prints"), err=True)
    sys.exit(EXIT_INTERNAL)


def _from_library(exc: BaseException) -> bool:
    return (type(exc).__module__ or "").split(".")[0] in _LIBRARIES


def handle_errors(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with warnings.catch_warnings():  # numeric warnings (overflow on hostile weights) are not messages:
                warnings.simplefilter("ignore", RuntimeWarning)  # the checks after them refuse in one line
                return fn(*args, **kwargs)
        except OnnxStainError as exc:
            _fail(str(exc))
        except KeyboardInterrupt:
            _fail("interrupted")
        except MemoryError:
            _fail("out of memory")
        except OSError as exc:
            _fail(f"{exc.filename or ''}: {exc.strerror or exc}".strip(": "))
        except (SystemExit, click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:
            if _from_library(exc):
                _fail(f"{type(exc).__module__.split('.')[0]}: {exc}")
            _internal(exc)

    return wrapper


class _Group(click.Group):
    """Click's usage errors (bad option values, missing files...) as one ``onnxstain: error:`` line."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:
            click.echo(exc.ctx.get_help() if exc.ctx else str(exc), err=True)
            sys.exit(EXIT_ERROR)
        except click.ClickException as exc:
            _fail(_usage_message(exc))
        except click.exceptions.Abort:
            _fail("interrupted")
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else EXIT_OK)


def _usage_message(exc: click.ClickException) -> str:
    text = _one_line(exc.format_message())
    return text[0].lower() + text[1:] if text[:1].isupper() and not text[1:2].isupper() else text


# -- reusable option groups --------------------------------------------------------------------------
_PRE_PARAMS = ("pre_file", "size", "layout", "channel_order", "mean", "std", "scale", "resize")


def preprocessing_options(fn: Callable) -> Callable:
    """The preprocessing options, handed to the command as one ``preprocessing`` value: a
    :class:`~onnxstain.preprocess.PreprocessingRequest` that the job settles against the model it loads."""
    options = [
        click.option("--preprocessing", "pre_file", type=click.Path(dir_okay=False),
                     help="JSON file with the model's preprocessing (fields of onnxstain.Preprocessing)."),
        click.option("--size", help="Input size HxW (e.g. 224x224)."),
        click.option("--layout", type=click.Choice(["NCHW", "NHWC"]), help="Input layout."),
        click.option("--channel-order", type=click.Choice(["RGB", "BGR", "GRAY"]),
                     help="Channel order; GRAY: one channel, the luma of the pixels."),
        click.option("--mean", help="Per-channel mean, comma separated (after scaling)."),
        click.option("--std", help="Per-channel std, comma separated."),
        click.option("--scale", type=float, help="Pixel scale before mean/std (1/255 for 0..1 inputs)."),
        click.option("--resize", type=click.IntRange(min=1),
                     help="Shorter side of raw photos before the centre crop."),
    ]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        values = {name: kwargs.pop(name) for name in _PRE_PARAMS}
        return fn(*args, preprocessing=_LazyRequest(values), **kwargs)

    for opt in reversed(options):
        wrapper = opt(wrapper)
    return wrapper


class _LazyRequest:
    """The preprocessing options until the command's error handler is in place: :meth:`request` parses them
    (a bad ``--size`` or file is one error line, like any other bad input)."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values

    @property
    def file(self) -> str | None:
        return self.values["pre_file"]

    def request(self) -> PreprocessingRequest:
        from .errors import BadInputError
        from .preprocess import Preprocessing, PreprocessingRequest

        v = self.values
        overrides: dict[str, Any] = {"layout": v["layout"], "channel_order": v["channel_order"],
                                     "scale": v["scale"], "resize": v["resize"]}
        hw = _size(v["size"])
        if hw is not None:
            overrides["height"], overrides["width"] = hw
        try:
            if v["mean"]:
                overrides["mean"] = [float(x) for x in v["mean"].split(",")]
            if v["std"]:
                overrides["std"] = [float(x) for x in v["std"].split(",")]
        except ValueError:
            raise BadInputError("--mean and --std take 1 or 3 numbers (e.g. --mean 0.5 or --mean 0.485,0.456,0.406)"
                                ) from None
        given = Preprocessing.load(self.file) if self.file else None
        return PreprocessingRequest.of(given, **overrides)


def signer_key_option(fn: Callable) -> Callable:
    return click.option("--signer-key", type=click.Path(dir_okay=False),
                        help="Check the model-signing signature and signed statement beside the model "
                             "(<model>.sig, <model>.intoto.json) with this PEM public key.")(fn)


def provider_option(fn: Callable) -> Callable:
    return click.option("--providers", help="onnxruntime providers by prefix, comma separated "
                        "(default: CUDA when present, else CPU).")(fn)


def providers_list(value: str | None) -> list[str] | None:
    return [p.strip() for p in value.split(",") if p.strip()] if value else None


def _size(size: str | None) -> tuple[int, int] | None:
    from .errors import BadInputError

    if not size:
        return None
    h, _, w = size.lower().partition("x")
    try:
        hw = int(h), int(w or h)
    except ValueError:
        raise BadInputError(f"--size takes HxW in pixels (e.g. 224x224), not {size!r}") from None
    if min(hw) <= 0:
        raise BadInputError(f"--size must be positive, not {size!r}")
    return hw



def set_debug(debug: bool) -> None:
    global _debug
    _debug = debug
