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
supervisor is gone, never one of a running start. A worker that stops marks itself dead
(:func:`mark_dead_on_shutdown`): its live gauges leave the totals, its counts stay.

One process (no ``WEB_CONCURRENCY``, or 1): nothing changes, each app serves its own registry.
This module imports no prometheus_client at import time, so ``<service>.main`` can call it first.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI

# prometheus_client's own variable: set by the services themselves, one from outside is ignored.
MULTIPROC_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
BASE_VARIABLE = "METRICS_MULTIPROCESS_DIR"
DEFAULT_BASE = Path(tempfile.gettempdir()) / "campaign-platform-metrics"
# Written into a start's directory: only a directory holding it is ever removed.
MARKER = "supervisor"
START_DIRECTORY = re.compile(r"(?P<service>[a-z_]+)-(?P<identity>\d+(?:-\d+)?)")


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
    base = Path(os.environ.get(BASE_VARIABLE) or DEFAULT_BASE)
    directory = start_directory(base, service, os.getppid())
    os.environ[MULTIPROC_DIR_VARIABLE] = str(directory)
    return directory


def several_processes() -> bool:
    """A worker of uvicorn's supervisor (a child process of ``multiprocessing``), or a start
    with ``WEB_CONCURRENCY`` over 1 (as gunicorn reads it too)."""
    try:
        concurrency = int(os.environ.get("WEB_CONCURRENCY") or 1)
    except ValueError:
        concurrency = 1
    return concurrency > 1 or multiprocessing.parent_process() is not None


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
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory = base / f"{service}-{identity}"
    try:
        directory.mkdir(mode=0o700)  # atomic: exactly one worker of the start creates it
    except FileExistsError:
        return directory
    (directory / MARKER).write_text(identity)
    remove_stale(base)
    return directory


def remove_stale(base: Path) -> list[Path]:
    """Remove the start directories under ``base`` whose supervisor no longer runs (or whose pid
    another process has taken since); return them."""
    removed = []
    for entry in base.iterdir():
        match = START_DIRECTORY.fullmatch(entry.name)
        if match is None or not (entry / MARKER).is_file():
            continue
        identity = match["identity"]
        pid = int(identity.split("-", 1)[0])
        if process_identity(pid) != identity:
            shutil.rmtree(entry, ignore_errors=True)  # a sibling start may be removing it too
            removed.append(entry)
    return removed


def process_identity(pid: int) -> str | None:
    """``<pid>-<start time>`` of a running process (Linux: its start in clock ticks after boot,
    so a pid used again is another identity), ``<pid>`` where there is no /proc; None when no
    such process runs."""
    if not Path("/proc/self/stat").exists():
        return str(pid) if _alive(pid) else None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no such process (or it ended while read)
        return None
    # Field 22 is the start time; field 2, the name in parentheses, may hold spaces.
    started = stat.rsplit(")", 1)[1].split()[19]
    return f"{pid}-{started}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    return True


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
