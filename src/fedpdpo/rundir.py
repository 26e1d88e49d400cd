"""One writer per run directory, and a run replaced only as a whole.

**Lock.** Every command that writes a run directory (``run``, ``run --resume``, ``run --overwrite``, ``compare``,
``report`` into a directory, the Flower ServerApp) holds an exclusive ``fcntl.flock`` on ``DIR/.lock`` while it
writes, with its pid in the file. A second writer stops at once with an error naming that pid. The kernel drops the
lock when its process ends, however it ends (SIGKILL included), so a killed run never leaves a stuck lock; the file
stays, and an unlocked ``.lock`` means nothing. flock keeps processes of one machine apart; on a network file system
two machines writing one directory are not detected.

**Overwrite.** ``--overwrite`` of a directory that holds a run writes the new run into the sibling
``DIR.overwrite`` and replaces ``DIR`` with it only once the new run has finished: ``DIR`` is renamed to
``DIR.replaced``, ``DIR.overwrite`` to ``DIR``, then ``DIR.replaced`` is deleted (renames within one directory, so
neither run is ever mixed with the other). Until then ``DIR`` is untouched: an overwrite that fails or is killed
leaves the old run as it was, next to the unfinished new one. ``run --resume DIR`` continues that unfinished
overwrite (the newest command given for ``DIR``) and replaces ``DIR`` when it finishes; a new ``--overwrite``
discards it and starts again. A kill between the two renames leaves no ``DIR`` and a finished ``DIR.overwrite``,
which ``--resume DIR`` completes the same way.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from fedpdpo.errors import FedPDPOError

LOCK_FILE = ".lock"
PENDING_SUFFIX = ".overwrite"
REPLACED_SUFFIX = ".replaced"
#: Files whose presence means a directory holds a run (config.toml is written first, before any other).
RUN_FILES = ("config.toml", "metrics.jsonl", "summary.json", "checkpoint.pt", "global.safetensors")


class DirectoryBusy(FedPDPOError):
    """Another process holds the directory's lock."""


def pending_dir(out: Path) -> Path:
    """Where an ``--overwrite`` of ``out`` writes the new run until it replaces ``out``."""
    return out.with_name(out.name + PENDING_SUFFIX)


def run_files(path: Path) -> list[str]:
    return [f for f in RUN_FILES if (path / f).exists()]


def is_run(path: Path) -> bool:
    return (path / "config.toml").is_file()


def resume_source(out: Path) -> Path:
    """The directory ``run --resume out`` continues: an unfinished overwrite of ``out`` if there is one."""
    pending = pending_dir(Path(out).absolute())
    return pending if is_run(pending) else Path(out)


def check_out_path(path: Path, flag: str = "--out") -> None:
    """Fail before any work where ``path`` cannot be a directory: it, or a parent, is a file (``--out afile/sub``)."""
    path = Path(path).absolute()
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                detail = "it is a file" if p == path else f"{p} is a file"
                raise FedPDPOError(f"{flag} {path} cannot be a directory: {detail}")
            return


def check_file_target(path: Path, flag: str) -> None:
    """Fail before any work where a file cannot be written at ``path``: it is a directory, or its parent is missing."""
    if path.is_dir():
        raise FedPDPOError(f"{flag} {path} is a directory; give a file name")
    if not path.absolute().parent.is_dir():
        raise FedPDPOError(f"{flag} {path}: directory {path.absolute().parent} does not exist")


def _busy(directory: Path, fd: int) -> DirectoryBusy:
    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
    return DirectoryBusy(
        f"{directory} is in use by another fedpdpo process (pid {holder}, holding {directory / LOCK_FILE}); "
        "wait for it to finish or stop it, then try again"
    )


class DirLock:
    """An exclusive lock on ``directory/.lock``, released by :meth:`release` or when the process ends."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.created = not (directory / LOCK_FILE).exists()  # ours to remove if the command fails before any output
        self.fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            error = _busy(directory, self.fd)
            os.close(self.fd)
            raise error from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):  # the directory may be gone (replaced, or removed after a failure)
            os.ftruncate(self.fd, 0)
        os.close(self.fd)  # closing drops the flock
        self.fd = -1


def ensure_free(directory: Path) -> None:
    """Fail now if another process holds ``directory`` (before minutes of loading); creates nothing."""
    path = Path(directory) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return  # no lock file (or unreadable): nobody holds it, or DirLock will say why
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _busy(Path(directory), fd) from None
    finally:
        os.close(fd)


@contextlib.contextmanager
def held(directory: Path) -> Iterator[DirLock]:
    """Hold the lock of an existing ``directory`` for the block."""
    lock = DirLock(directory)
    try:
        yield lock
    finally:
        lock.release()


@contextlib.contextmanager
def locked_dir(directory: Path, flag: str = "--out") -> Iterator[DirLock]:
    """Create ``directory`` if needed and hold its lock for the block.

    When the block fails and this call created the directory, which still holds nothing but the lock file, the
    directory (and any parent created with it) is removed again: a command that could not start leaves nothing.
    """
    directory = Path(directory).absolute()
    check_out_path(directory, flag)
    created = next((p for p in reversed((directory, *directory.parents)) if not p.exists()), None)
    directory.mkdir(parents=True, exist_ok=True)
    lock = DirLock(directory)  # when busy, the holder owns the directory (it may have created it): nothing to undo
    try:
        yield lock
    except BaseException:
        if created is not None and _only_locks(created):
            shutil.rmtree(created, ignore_errors=True)
        elif lock.created:  # an existing directory: leave it as it was, without a new lock file
            (directory / LOCK_FILE).unlink(missing_ok=True)
        raise
    finally:
        lock.release()


def _only_locks(top: Path) -> bool:
    return all(p.is_dir() or p.name == LOCK_FILE for p in top.rglob("*"))


def discard(directory: Path) -> None:
    """Delete a left-over directory (an unfinished overwrite, a replaced run) unless a process still holds it."""
    if directory.is_dir():
        with held(directory):
            shutil.rmtree(directory)


def replace_dir(out: Path, new: Path) -> None:
    """Put the finished directory ``new`` in the place of ``out`` (which may be missing or empty) in two renames."""
    from fedpdpo.client.state import fsync_dir

    aside = out.with_name(out.name + REPLACED_SUFFIX)
    shutil.rmtree(aside, ignore_errors=True)
    if out.exists():
        os.rename(out, aside)
    os.rename(new, out)
    fsync_dir(out.parent)
    shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def run_directory(out: Path, *, overwrite: bool = False, resume: bool = False) -> Iterator[Path]:
    """Hold ``out`` for this process and yield the directory the run writes into.

    That is ``out`` itself for a new run and for ``resume``; ``out.overwrite`` when ``overwrite`` replaces a run in
    ``out``, or when resuming such an unfinished overwrite. In those two cases ``out`` is replaced by it when the
    block succeeds (see the module doc). An existing run is never written unless ``overwrite`` or ``resume``.
    """
    out = Path(out).absolute()
    pending = pending_dir(out)
    if resume:
        with contextlib.ExitStack() as stack:
            if out.is_dir():
                stack.enter_context(held(out))
            if not is_run(pending):
                yield out
                return
            stack.enter_context(held(pending))
            yield pending
            replace_dir(out, pending)
        return
    with locked_dir(out):
        existing = run_files(out)
        if existing and not overwrite:
            raise _holds_run(out, existing)
        if is_run(pending) and not overwrite:
            raise FedPDPOError(
                f"{pending} holds an unfinished --overwrite of {out}; continue it with `fedpdpo run --resume {out}`, "
                "or pass --overwrite to start it again"
            )
        discard(pending)
        discard(out.with_name(out.name + REPLACED_SUFFIX))
        if not existing:
            yield out
            return
        pending.mkdir()
        with held(pending):
            yield pending
            replace_dir(out, pending)


def preflight(out: Path, overwrite: bool) -> None:
    """The checks of :func:`run_directory` that need no lock, done before the slow setup so that they fail fast."""
    out = Path(out).absolute()
    check_out_path(out)
    for directory in (out, pending_dir(out)):
        ensure_free(directory)
    if (existing := run_files(out)) and not overwrite:
        raise _holds_run(out, existing)


def _holds_run(out: Path, existing: list[str]) -> FedPDPOError:
    return FedPDPOError(
        f"--out {out} already holds a run ({', '.join(existing)}); choose a new directory, "
        "or pass --resume to continue it or --overwrite to replace it"
    )
