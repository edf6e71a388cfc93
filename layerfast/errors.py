"""The one exception type for bad input.

Everything a user can get wrong (a missing or truncated checkpoint, a pickle that wants to run
code, shape mismatches, an unknown arch, broken data, an unwritable out dir) raises
`LayerfastError` with one clear message. The CLI prints that message on one line and exits
with status 2; any other exception is an internal error (exit 1).

What is not wrong but changes how the results read (a cut-short training run, a chance-level
baseline) goes through `warn`: one stderr line, and kept in run.json by `analyze`.
"""

from __future__ import annotations

import errno
import functools
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar


class LayerfastError(Exception):
    """Bad input or usage. `str(err)` is a complete, user-facing message."""


def say(line: str) -> None:
    """One line on stderr that must never end the run: a closed stderr (`2>&-`: None) or one
    that refuses writes (`2>/dev/full`) loses the line, not the work."""
    stream = sys.stderr
    if stream is None:
        return
    try:
        print(line, file=stream, flush=True)
    except (OSError, ValueError):  # ValueError: a closed file object
        pass


class _QuietStream:
    """stderr for a progress bar, with `say`'s guarantee: its writes never raise."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except (OSError, ValueError):
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except (OSError, ValueError):
            pass

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding: tqdm's layout
        return getattr(self._stream, name)


def progress_stream() -> Any:
    """Where progress bars write: stderr behind `_QuietStream`, or None when there is no
    stderr (then the caller shows no bar)."""
    return None if sys.stderr is None else _QuietStream(sys.stderr)


#: Seconds between a progress bar's redraws when stderr is not a terminal (a CI log, `2> log`).
LOG_PROGRESS_INTERVAL = 30.0


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, OSError, ValueError):
        return False


def progress_bar(enabled: bool = True, auto: bool = False, **kwargs: Any) -> Any:
    """A tqdm bar on `progress_stream()` (disabled when not `enabled` or there is no stderr).

    On a terminal tqdm redraws in place up to 10 times a second. Into a file or a CI log each
    redraw is another carriage-return-separated line: a bar updated per batch or per training
    step wrote thousands of them over a long run. There it redraws at most every
    `LOG_PROGRESS_INTERVAL` seconds (and at its start and end), which still shows the rate and
    the time left. `auto`: tqdm.auto's class (a widget in a notebook), as `train` has used."""
    if auto:
        from tqdm.auto import tqdm
    else:
        from tqdm import tqdm

    stream = progress_stream()
    # a notebook's widget redraws in place (its stderr is no terminal either). tqdm.auto's
    # class there is defined in tqdm.auto (`class tqdm(notebook_tqdm, asyncio_tqdm)`), so
    # the widget shows in its bases, not in its own __module__
    widget = any(c.__module__.startswith("tqdm.notebook") for c in tqdm.__mro__)
    if stream is not None and not widget and not _is_tty(stream):
        kwargs.setdefault("mininterval", LOG_PROGRESS_INTERVAL)
    return tqdm(file=stream, disable=not enabled or stream is None, **kwargs)


#: The lists `collect_warnings` is filling, innermost last.
_COLLECTORS: list[list[str]] = []
#: The messages said inside each open `warnings_once` block.
_ONCE: list[set[str]] = []
#: How many `quiet_warnings` blocks are open: inside one, `warn` keeps but does not print.
_QUIET: list[bool] = []
#: The rewrites of each open `renamed_warnings` block, applied innermost first.
_RENAMES: list[Callable[[str], str]] = []


def warn(message: str) -> None:
    """Say `message` on stderr as one `layerfast: warning:` line and keep it for run.json.

    Why not `warnings.warn`: its filters show each message once per place and hide it under
    `-W ignore`, while a warning here is about the user's input (θ⁰ not drawn from the init
    rule, a chance-level baseline) and must reach them every run. Why also collect it: stderr
    is gone when a cluster job's log rotates; run.json is what is read later to judge a run.
    Silenced only when asked for by name (`quiet_warnings`, `analyze(quiet=True)`).
    """
    for rename in reversed(_RENAMES):
        message = rename(message)
    if any(message in said for said in _ONCE):
        return
    for said in _ONCE:
        said.add(message)
    if not any(_QUIET):
        say(f"layerfast: warning: {message}")
    for sink in _COLLECTORS:
        sink.append(message)


@contextmanager
def quiet_warnings(quiet: bool = True) -> Iterator[None]:
    """Inside the block (when `quiet`), `warn` prints nothing; its messages are still kept
    (run.json's and a training manifest's `warnings`). For a study that runs hundreds of
    analyses in a loop: stderr was the only place the same lines could not be turned off,
    since they do not go through Python's `warnings` filters (see `warn`)."""
    _QUIET.append(bool(quiet))
    try:
        yield
    finally:
        _QUIET.pop()


@contextmanager
def renamed_warnings(rename: Callable[[str], str]) -> Iterator[None]:
    """Inside the block, `warn` says `rename(message)`, printed and kept alike: how
    `inputs.named_as_passed` names in-memory inputs as the caller passed them, not by the temp
    files they were written to, in warnings as in errors."""
    _RENAMES.append(rename)
    try:
        yield
    finally:  # by identity, as collect_warnings' sinks
        del _RENAMES[next(i for i, r in enumerate(_RENAMES) if r is rename)]


@contextmanager
def collect_warnings() -> Iterator[list[str]]:
    """The messages `warn` is given inside the block, in order (nested blocks each get them)."""
    sink: list[str] = []
    _COLLECTORS.append(sink)
    try:
        yield sink
    finally:  # by identity: `list.remove` compares by value, and two sinks can be equal
        del _COLLECTORS[next(i for i, c in enumerate(_COLLECTORS) if c is sink)]


@contextmanager
def warnings_once() -> Iterator[None]:
    """Inside the block `warn` says each message once: a repeat is neither printed nor collected.

    For a command that does the same thing several times over: `layerfast bench` builds an
    Evaluator per warm-up and per timed mode, and one that warns on construction (tf32 on the
    CPU) printed the same line once for each while the JSON and the text's count kept one."""
    said: set[str] = set()
    _ONCE.append(said)
    try:
        yield
    finally:  # by identity, as collect_warnings' sinks
        del _ONCE[next(i for i, s in enumerate(_ONCE) if s is said)]


#: A write that cannot be done: a full disk or quota, an I/O error, a file over the size limit.
_NO_WRITE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG})

#: A path the system refuses to look at: a directory on the way the user may not search
#: (`--ckpts ~other/ck`), a name over the file system's limit, a symbolic-link loop, a
#: read-only file system. `Path.exists()` and `is_dir()` raise these (they answer False only
#: for ENOENT, ENOTDIR, EBADF and ELOOP), so every check of a user's path can meet them.
_PATH_REFUSED = frozenset({errno.EACCES, errno.EPERM, errno.ENAMETOOLONG, errno.ELOOP,
                           errno.EROFS})


F = TypeVar("F", bound=Callable[..., Any])


def refused_paths_are_input(fn: F) -> F:
    """`fn` raising a LayerfastError for a path the system refuses to look at (`_PATH_REFUSED`,
    naming the file): the Python API's bad input is one exception type, as the CLI's is one
    line (`output_failed`). Otherwise the first `Path.exists()` of an `out` or `ckpts` with a
    name over NAME_MAX, or under a directory the user may not search, raised a bare OSError."""

    @functools.wraps(fn)
    def checked(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except OSError as exc:
            if exc.errno in _PATH_REFUSED and exc.filename is not None:
                raise LayerfastError(
                    f"cannot access {exc.filename}: {exc.strerror or exc}") from None
            raise

    return checked  # type: ignore[return-value]


def output_failed(exc: OSError) -> int | None:
    """The exit status for an OSError that reached the command line, or None to re-raise it.

    A closed pipe (`layerfast info | head -1`) is the reader's choice: status 0, silently. A
    write the system refuses (stdout on a full disk or `/dev/full`) is the one-line exit 2 that
    every other full disk gives. Either way, unless the error names a file, stdout is pointed at
    /dev/null, so that Python's flush at exit does not fail again ("Exception ignored"). A path
    the system refuses to look at (`_PATH_REFUSED`: no permission, a name too long) is bad
    input, also one line and exit 2.
    """
    if isinstance(exc, BrokenPipeError):
        status = 0
    elif exc.errno in _NO_WRITE:
        where = exc.filename or "the output"
        say(f"layerfast: error: cannot write {where} ({exc.strerror or exc})")
        status = 2
    elif exc.errno in _PATH_REFUSED and exc.filename is not None:
        # bad input (a path the user named, or one under it), not an internal error; without
        # a file name the error is not about a path and stays a traceback, exit 1
        say(f"layerfast: error: cannot access {exc.filename}: {exc.strerror or exc}")
        return 2
    else:
        return None
    if exc.filename is None:  # a file's own error names it; stdout's names none
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):  # no real stdout (captured, closed)
            pass
    return status
