"""Metrics that add up across the processes of one start.

``uvicorn <service>.main:app`` with ``WEB_CONCURRENCY=N`` (or ``--workers N``) runs N worker
processes under a supervisor that imports nothing of the app. Each worker imports
``<service>.main``, which calls :func:`share_metrics_across_processes` before anything imports
prometheus_client: that turns on prometheus_client's multiprocess mode (it reads
``PROMETHEUS_MULTIPROC_DIR`` once, on import), so every process writes its samples to files in
one directory and ``/metrics`` (:mod:`shared.metrics`) answers the totals of all of them, from
whichever process the scrape reaches.

The directory belongs to one start: ``<METRICS_MULTIPROCESS_DIR>/<service>-<supervisor's pid>-
<its start time>``. The workers of a start find the same one (the first creates it, the others
join it, a worker the supervisor restarts too); a new start gets a new one even when its
supervisor has a pid used before. The worker that creates it removes the directories whose
supervisor is gone, never one of a running start. ``METRICS_MULTIPROCESS_DIR`` defaults to one
of this user's own (``$XDG_RUNTIME_DIR/campaign-platform-metrics``, else
``<temp dir>/campaign-platform-metrics-<uid>``); it and the start's directory are refused unless
they are directories of this user that no one else may write (:func:`private_directory`), so no
other user can plant files or links there. A worker that stops marks itself dead
(:func:`mark_dead_on_shutdown`): its live gauges leave the totals, its counts stay; one killed
(SIGKILL) cannot, so a scrape marks the processes of the directory that no longer run
(:func:`dead_processes`, used by :mod:`shared.metrics`).

A worker is told from a single process by what it is, not by ``WEB_CONCURRENCY``: a child that
uvicorn's supervisor started with ``multiprocessing`` (``--workers N`` or ``WEB_CONCURRENCY=N``).
Anything else (no workers, ``python -c "import <service>.main"``, gunicorn's forked workers) is
one process: nothing changes, each app serves its own registry.

This module imports no prometheus_client at import time, so ``<service>.main`` can call it first.
"""

from __future__ import annotations

import contextlib
import fcntl
import multiprocessing
import os
import re
import shutil
import stat
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI

# prometheus_client's own variable: set by the services themselves, one from outside is ignored.
MULTIPROC_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
BASE_VARIABLE = "METRICS_MULTIPROCESS_DIR"
# Written into a start's directory: only a directory holding it is ever removed.
MARKER = "supervisor"
START_DIRECTORY = re.compile(r"(?P<service>[a-z_]+)-(?P<identity>\d+(?:-\d+)?)")
# prometheus_client's file of a process's gauges in a "live" mode: gauge_<mode>_<pid>.db.
LIVE_GAUGE_FILE = re.compile(r"gauge_live[a-z]+_(?P<pid>\d+)\.db")


def default_base() -> Path:
    """This user's own: under ``$XDG_RUNTIME_DIR`` (private to the user) when it is set, else a
    name of this user's in the temporary directory."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "campaign-platform-metrics"
    return Path(tempfile.gettempdir()) / f"campaign-platform-metrics-{os.geteuid()}"


def share_metrics_across_processes(service: str) -> Path | None:
    """In a worker process of a multi-process start, point prometheus_client at this start's
    directory and return it; otherwise (one process) return None. Call it before anything
    imports prometheus_client."""
    if not several_processes():
        os.environ.pop(MULTIPROC_DIR_VARIABLE, None)
        return None
    if "prometheus_client" in sys.modules:
        raise RuntimeError(
            "prometheus_client was imported before share_metrics_across_processes(): "
            "its multiprocess mode can no longer be turned on"
        )
    base = Path(os.environ.get(BASE_VARIABLE) or default_base())
    directory = start_directory(base, service, os.getppid())
    os.environ[MULTIPROC_DIR_VARIABLE] = str(directory)
    return directory


def several_processes() -> bool:
    """A worker of uvicorn's supervisor: a child that ``multiprocessing`` started (uvicorn's
    workers are its spawned children) and whose parent is still its parent. ``WEB_CONCURRENCY``
    alone proves nothing (``--workers 1`` overrides it; a ``python -c`` in the container inherits
    it). An orphan, whose parent pid is now init's (1) or a subreaper's, is no worker; a
    supervisor that is itself pid 1 (``exec uvicorn`` as a container's command) is one."""
    parent = multiprocessing.parent_process()
    supervisor = os.getppid()
    return parent is not None and supervisor > 0 and parent.pid == supervisor


def multiprocess_directory() -> Path | None:
    """This process's multiprocess directory, when it writes its metrics to one."""
    value = os.environ.get(MULTIPROC_DIR_VARIABLE)
    return Path(value) if value else None


def start_directory(base: Path, service: str, supervisor: int) -> Path:
    """The directory of the start whose supervisor is ``supervisor``: created by the first of
    its workers (who then removes those of supervisors that are gone), joined by the others."""
    identity = process_identity(supervisor)
    if identity is None:
        raise RuntimeError(f"the supervisor process {supervisor} is gone")
    private_directory(base, parents=True)
    directory = base / f"{service}-{identity}"
    # Atomic: exactly one worker of the start creates it.
    if not private_directory(directory):
        return directory
    (directory / MARKER).write_text(identity)
    remove_stale(base)
    return directory


def private_directory(path: Path, *, parents: bool = False) -> bool:
    """Create ``path`` (mode 0700) or find it; True when this call created it. Refuses
    (RuntimeError) a symbolic link, anything but a directory, one another user owns, one that
    others may write: metrics files there could be planted or swapped for links by them."""
    try:
        path.mkdir(mode=0o700, parents=parents)
        created = True
    except FileExistsError:
        created = False
    info = os.lstat(path)
    problem = None
    if stat.S_ISLNK(info.st_mode):
        problem = "is a symbolic link"
    elif not stat.S_ISDIR(info.st_mode):
        problem = "is not a directory"
    elif info.st_uid != os.geteuid():
        problem = f"belongs to uid {info.st_uid}, not to this process's {os.geteuid()}"
    elif info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problem = f"may be written by others (mode {stat.S_IMODE(info.st_mode):o})"
    if problem is not None:
        raise RuntimeError(
            f"the metrics directory {path} {problem}: refusing it (set {BASE_VARIABLE} to a "
            "directory of this user's that only it may write, or remove that path)"
        )
    return created


def remove_stale(base: Path) -> list[Path]:
    """Remove the start directories under ``base`` whose supervisor no longer runs (or whose pid
    another process has taken since); return those that are gone now."""
    removed = []
    for entry in base.iterdir():
        match = START_DIRECTORY.fullmatch(entry.name)
        if match is None or entry.is_symlink() or not (entry / MARKER).is_file():
            continue
        identity = match["identity"]
        pid = int(identity.split("-", 1)[0])
        if process_identity(pid) != identity:
            shutil.rmtree(entry, ignore_errors=True)  # a sibling start may be removing it too
            if not os.path.lexists(entry):
                removed.append(entry)
    return removed


def dead_processes(directory: Path) -> set[int]:
    """The pids that have live gauges in ``directory`` and no longer run: killed processes,
    which could not mark themselves dead."""
    pids = {live_gauge_pid(entry.name) for entry in directory.iterdir()}
    return {pid for pid in pids if pid is not None and not process_running(pid)}


def live_gauge_pid(name: str) -> int | None:
    """The pid in the name of a file of live gauges (``gauge_livesum_<pid>.db``, as
    prometheus_client names them), None for any other file."""
    match = LIVE_GAUGE_FILE.fullmatch(name)
    return int(match["pid"]) if match else None


def process_identity(pid: int) -> str | None:
    """``<pid>-<start time>`` of a running process (Linux: its start in clock ticks after boot,
    so a pid used again is another identity), ``<pid>`` where there is no /proc; None when no
    such process runs."""
    if not Path("/proc/self/stat").exists():
        return str(pid) if process_running(pid) else None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no such process (or it ended while read)
        return None
    # Field 22 is the start time; field 2, the name in parentheses, may hold spaces.
    started = stat.rsplit(")", 1)[1].split()[19]
    return f"{pid}-{started}"


def process_running(pid: int) -> bool:
    """Whether a process ``pid`` runs (as any user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    return True


@contextlib.contextmanager
def port_of_this_start(port: int) -> Iterator[None]:
    """Hold ``port`` for this start's processes while the block runs. They bind it together
    (``SO_REUSEPORT``), which the kernel would grant as well to the processes of another start by
    the same user: that one fails here (RuntimeError) instead of taking a share of the port.

    A lock file per port in the base directory names the start holding it; each process holds a
    shared ``flock`` on it. Only a process that finds it held by no one (its exclusive lock
    granted) writes its start's name, and no one can while any process holds the shared lock,
    so every holder reads the same name."""
    directory = multiprocess_directory()
    if directory is None:
        raise RuntimeError("not a process of a multi-process start")
    start = directory.name
    path = directory.parent / f"port-{port}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass  # held: by the other processes of this start, or by another start
        else:
            os.ftruncate(fd, 0)
            os.pwrite(fd, start.encode(), 0)
        fcntl.flock(fd, fcntl.LOCK_SH)  # waits only for a process writing its name
        holder = os.pread(fd, 256, 0).decode(errors="replace")
        if holder != start:
            raise RuntimeError(
                f"port {port} is in use by another start ({holder}, lock {path}): stop it, or "
                "give this one another port"
            )
        yield
    finally:
        os.close(fd)


def mark_dead_on_shutdown(app: FastAPI) -> FastAPI:
    """Wrap ``app``'s lifespan: when it has stopped, this process's live gauges leave the
    totals (prometheus_client's ``mark_process_dead``). Nothing to do in a single process."""
    directory = multiprocess_directory()
    if directory is None:
        return app
    from prometheus_client import multiprocess  # after share_metrics_across_processes()

    started = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[Any]:
        try:
            async with started(app) as state:
                yield state
        finally:
            multiprocess.mark_process_dead(os.getpid(), str(directory))  # type: ignore[no-untyped-call]

    app.router.lifespan_context = lifespan
    return app
