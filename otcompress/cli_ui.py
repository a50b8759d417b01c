"""What the command line shows and how its process behaves: rich output on
stderr (plain text when not a terminal), result tables and the one JSON
object on stdout, the library's warnings routed through the running
command's UI, SIGINT/SIGTERM handling and the one-line failure."""
from __future__ import annotations

import errno
import json
import math
import os
import signal
import sys
import threading
import warnings
from pathlib import Path

import click

_SHOWN_BY = None  # the UI of the command that runs (`route_warnings` sends warnings to it)


class UI:
    """Everything the CLI shows: rich on stderr (plain text when not a terminal),
    tables or exactly one JSON object on stdout."""

    def __init__(self, quiet=False, as_json=False):
        from rich.console import Console
        self.quiet, self.as_json = quiet, as_json
        # soft_wrap: a log line is one line, also in a pipe (rich's width is 80 there).
        self.err = Console(stderr=True, quiet=quiet, soft_wrap=True)
        self.out = Console(stderr=as_json)  # with --json, tables go to stderr too
        global _SHOWN_BY
        _SHOWN_BY = self  # `main` routes the library's warnings here: one line each, silenced by -q

    def log(self, msg):
        self.err.print(msg, highlight=False)

    def _warning(self, message, category, *_args, **_kw):
        self.err.print(f"[yellow]warning:[/yellow] {str(message).removeprefix('otcompress: ')}",
                       highlight=False)

    def progress(self):
        return _Progress(self.err, self.quiet)

    def table(self, title, columns, rows, left=1):
        """The result: on stdout even with -q (which silences logs and progress);
        with --json on stderr, where -q silences it. The first `left` columns
        are text (left-aligned), the others numbers."""
        from rich.table import Table
        t = Table(title=title)
        # The first column names the rows: fold it onto more lines rather than cut it.
        for i, c in enumerate(columns):
            t.add_column(c, justify="left" if i < left else "right", overflow="fold" if i == 0 else "ellipsis")
        for r in rows:
            t.add_row(*[_cell(v) for v in r])
        (self.err if self.as_json else self.out).print(t)

    def result(self, obj):
        if self.as_json:
            from otcompress.outputs import json_safe
            click.echo(json.dumps(json_safe(obj), default=str, allow_nan=False))


class _Progress:
    """Renders the library's progress callbacks (stage, done, total)."""

    def __init__(self, console, quiet):
        self.console, self.quiet, self.tasks, self.bar = console, quiet, {}, None

    def __enter__(self):
        # Not a terminal (a pipe, a log file): no bar, whose redraws would only be noise there.
        if not self.quiet and self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), console=self.console, transient=True)
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.bar:
            self.bar.__exit__(*exc)

    def __call__(self, stage, done, total=None, *_):
        if not self.bar:
            return
        if stage not in self.tasks:
            self.tasks[stage] = self.bar.add_task(str(stage), total=total)
        self.bar.update(self.tasks[stage], completed=done, total=total)

    def finetune(self, done, total, info=None):
        self("finetune", done, total)


def _cell(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def metrics_table(ui, metrics, split=None, examples=None):
    """`split` and `examples` (the data the metrics were measured on) add columns."""
    if not metrics:
        return
    names = sorted({k for m in metrics.values() for k, v in m.items() if isinstance(v, float)})
    given = [("split", split), ("examples", examples)]
    extra = [c for c, v in given if v is not None]
    values = [v for _, v in given if v is not None]
    ui.table("metrics", ["model", *extra, *names],
             [[n, *values, *(m.get(k) for k in names)] for n, m in metrics.items()])


def flag_non_finite(ui, name, metrics: dict) -> dict:
    """A NaN/Inf loss means the model's outputs are not finite, and its other
    figures mean nothing (the argmax of NaN logits is class 0): they are
    blanked, `not_finite` names the culprits and a warning says so."""
    bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if not bad:
        return metrics
    ui.log(f"[yellow]warning:[/yellow] {name}: {', '.join(bad)} not finite: the model's outputs are NaN/Inf "
           "on this data, so no other figure is reported")
    return {**{k: None if isinstance(v, float) and k not in bad else v for k, v in metrics.items()},
            "not_finite": bad}


def short_names(paths: list[str]) -> dict[str, str]:
    """Each path's shortest trailing run of components that no other path
    shares (`runs/a/model`, `runs/b/model` -> `a/model`, `b/model`)."""
    parts = {p: Path(p).parts or (str(p),) for p in paths}
    names = {}
    for p, own in parts.items():
        for k in range(1, len(own) + 1):
            tail = own[-k:]
            if not any(q != p and parts[q][-k:] == tail for q in parts):
                names[p] = str(Path(*tail))
                break
        else:
            names[p] = str(p)
    return names


def profile_row(path, r):
    ort = r.get("latency_onnx") or {}
    disk = r.get("size_on_disk_bytes")
    return [path, r["parameters"], r["flops"]["flops"] / 1e6, r["latency_pytorch"]["median_ms"],
            ort.get("median_ms"), disk / 1e6 if disk else None]


def passive_openmp():
    # Spinning OpenMP workers wait for a core another process holds: on a shared
    # 2-core machine that made fusion 3x slower. Must be set before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def quiet_hf():
    # Hugging Face's own progress bars would interleave with ours on stderr.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if "transformers" in sys.modules:  # already imported: the env vars came too late
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


class Signalled(BaseException):
    """SIGINT or SIGTERM arrived: unwinds like Ctrl-C (staged outputs are
    removed on the way out), then the process exits 128 + the signal number.
    A BaseException of its own, so that neither `except Exception` in the
    library nor click (which turns KeyboardInterrupt into Abort) swallows it."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def _raise_signalled(signum, frame):
    raise Signalled(signum)


def handle_signals():
    """Install the SIGINT/SIGTERM handlers (main thread only); returns the
    previous handlers, for `restore_signals`."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, _raise_signalled) for sig in (signal.SIGINT, signal.SIGTERM)}


def restore_signals(previous):
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _warnings_to_ui(previous):
    """A `warnings.showwarning` that prints through the running command's UI
    (before one exists, as `previous` did)."""
    def show(message, category, filename, lineno, file=None, line=None):
        if _SHOWN_BY is None:
            return previous(message, category, filename, lineno, file, line)
        _SHOWN_BY._warning(message, category)
    return show


# The machine's state, not a bug: no space or quota left, a read-only file system.
USER_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


def internal_error(e, debug, fail):
    if debug:
        raise e
    fail(f"internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
         "(set OTCOMPRESS_DEBUG=1 for a traceback)", 1)


def failer(as_json):
    """`fail(message, code)`: the one line on stderr, with --json also one JSON
    object on stdout ({"error", "exit_code"}), then the exit."""
    def fail(message, code):
        click.echo(message, err=True)
        if as_json:
            click.echo(json.dumps({"error": message.split(": ", 1)[1], "exit_code": code}))
        sys.exit(code)
    return fail


def route_warnings():
    """Route `warnings.warn` through the running command's UI; returns the
    previous `warnings.showwarning`, for `unroute_warnings`."""
    shown = warnings.showwarning
    warnings.showwarning = _warnings_to_ui(shown)
    return shown


def unroute_warnings(shown):
    global _SHOWN_BY
    warnings.showwarning = shown
    _SHOWN_BY = None
