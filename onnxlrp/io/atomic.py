"""Atomic files: a destination either keeps its old content or gets the complete new one, never a partial file --
also on an error, Ctrl-C or SIGTERM.

:func:`write_files_atomic` is the one writer every output of onnxlrp goes through (models and their ``.data`` files,
heatmaps, relevance arrays, results, plots); :func:`sigterm_guard` is the one SIGTERM handler, also used around the
apps' whole runs.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import signal
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from onnxlrp.errors import OnnxlrpError
from onnxlrp.messages import reason, show

__all__ = ["SigtermReceived", "check_destination", "sigterm_guard", "umask_mode", "write_all", "write_atomic",
           "write_files_atomic"]

#: Bytes handed to one ``os.write`` call.
WRITE_CHUNK = 8 * 2**20

Writer = Callable[[Path], object]


class SigtermReceived(BaseException):
    """Raised where the program is when SIGTERM arrives inside :func:`sigterm_guard`, so that every ``finally`` on
    the way out runs (a BaseException: ``except Exception`` does not swallow it)."""


@contextlib.contextmanager
def sigterm_guard(what: str) -> Iterator[None]:
    """While active, SIGTERM raises :class:`SigtermReceived` instead of ending the process on the spot.

    When the guard is left with it, the previous handler is restored and SIGTERM is handed to it: by default the
    process then ends by SIGTERM (exit status 143 in a shell); the handler of an enclosing guard raises again, so
    nested guards unwind in turn.  Should the previous handler return, ``OnnxlrpError("WHAT was interrupted by
    SIGTERM")`` is raised.  Outside the main thread, and when SIGTERM is ignored or handled outside Python, the
    guard does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous in (signal.SIG_IGN, None):
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise SigtermReceived

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    except SigtermReceived:
        signal.signal(signal.SIGTERM, previous)
        os.kill(os.getpid(), signal.SIGTERM)  # by default this ends the process here
        raise OnnxlrpError(f"{what} was interrupted by SIGTERM") from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def umask_mode() -> int:
    """``0o666`` minus the umask (read without changing it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o644


def check_destination(path: Path) -> None:
    """Refuse (one line) a missing or unwritable folder, and a symbolic link, folder or special file at ``path``."""
    shown = show(path)
    parent = path.parent
    try:
        pst = os.stat(parent)
    except FileNotFoundError:
        raise OnnxlrpError(f"cannot write {shown}: folder {show(parent)} does not exist") from None
    except NotADirectoryError:
        raise OnnxlrpError(f"cannot write {shown}: {show(parent)} is not a folder") from None
    except OSError as err:
        raise OnnxlrpError(f"cannot write {shown}: {reason(err)}") from None
    if not stat.S_ISDIR(pst.st_mode):
        raise OnnxlrpError(f"cannot write {shown}: {show(parent)} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OnnxlrpError(f"cannot write {shown}: folder {show(parent)} is not writable")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as err:
        raise OnnxlrpError(f"cannot write {shown}: {reason(err)}") from None
    if stat.S_ISLNK(st.st_mode):
        raise OnnxlrpError(f"refusing to write {shown}: it is a symbolic link")
    if stat.S_ISDIR(st.st_mode):
        raise OnnxlrpError(f"cannot write {shown}: it is a folder")
    if not stat.S_ISREG(st.st_mode):
        raise OnnxlrpError(f"refusing to write {shown}: it exists and is not a regular file")


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write all of ``data`` to ``fd``, in chunks."""
    view = memoryview(data)
    pos = 0
    while pos < len(view):
        pos += os.write(fd, view[pos : pos + WRITE_CHUNK])


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _new_temp(target: Path, pending: list[tuple[str, Path]]) -> int:
    """Create a hidden temp file ``.NAME.XXXXXXXX.tmp`` (mode 0o600) next to ``target`` and return its descriptor.

    Its name is added to ``pending`` *before* the file exists, so that a SIGTERM arriving at any moment finds it
    there (``tempfile.mkstemp`` would leave a window between creating the file and handing back its name).
    """
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = os.path.join(target.parent, f".{target.name}.{secrets.token_hex(4)}.tmp")
        pending.append((tmp, target))
        try:
            return os.open(tmp, flags, 0o600)
        except FileExistsError:
            pending.pop()
    raise FileExistsError(errno.EEXIST, "no unused temporary file name", os.fspath(target.parent))


def write_files_atomic(files: Sequence[tuple[str | os.PathLike[str], Writer]]) -> list[Path]:
    """Write several files so that each destination is either untouched or holds its complete new content.

    For each ``(path, write)`` in turn, ``write(tmp)`` fills a hidden temp file in ``path``'s folder
    (``.NAME.XXXXXXXX.tmp``), which is then fsynced.  Only when all are written are they renamed over their
    destinations (``os.replace``), in the order given; an existing file keeps its permission bits, a new one gets
    ``0o666`` minus the umask.

    - Every destination is checked first (:func:`check_destination`): its folder must exist and be writable, and a
      symbolic link (or a folder, or anything but a regular file) is refused -- a link is never written through.
    - Any error, Ctrl-C or SIGTERM removes the temp files (SIGTERM then goes on as :func:`sigterm_guard` says,
      KeyboardInterrupt propagates).  OSErrors become one-line OnnxlrpErrors naming the file.

    Returns the paths written.
    """
    targets = [Path(p) for p, _ in files]
    for target in targets:
        check_destination(target)
    pending: list[tuple[str, Path]] = []  # (temp file, final name), in rename order
    current = targets[0]
    try:
        with sigterm_guard(f"writing {show(targets[-1])}"):
            try:
                for target, (_, write) in zip(targets, files, strict=True):
                    current = target
                    fd = _new_temp(target, pending)
                    tmp = pending[-1][0]
                    try:
                        write(Path(tmp))
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                for tmp, target in pending:
                    current = target
                    try:
                        mode = stat.S_IMODE(os.stat(target).st_mode)
                    except FileNotFoundError:
                        mode = umask_mode()
                    os.chmod(tmp, mode)
                while pending:
                    tmp, target = pending[0]
                    current = target
                    check_destination(target)
                    os.replace(tmp, target)
                    pending.pop(0)
                for folder in dict.fromkeys(t.parent for t in targets):
                    _fsync_dir(folder)
            finally:
                for tmp, _target in pending:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise OnnxlrpError(f"cannot write {show(current)}: no space left on the device") from None
        raise OnnxlrpError(f"cannot write {show(current)}: {reason(err)}") from None
    return targets


def write_atomic(path: str | os.PathLike[str], write: Writer) -> Path:
    """Call ``write(tmp)`` on a hidden temp file next to ``path``, then rename it to ``path``: one file of
    :func:`write_files_atomic`."""
    return write_files_atomic([(path, write)])[0]
