"""The directory of a multi-process start (shared/multiprocess.py): shared by the workers of
one start, new for each start, and those of gone supervisors removed, never a running one's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.multiprocess import (
    MARKER,
    MULTIPROC_DIR_VARIABLE,
    process_identity,
    remove_stale,
    share_metrics_across_processes,
    start_directory,
)


def gone_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    ended = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(ended.stdout)


class TestStartDirectory:
    def test_the_workers_of_one_start_share_it(self, tmp_path: Path) -> None:
        supervisor = os.getpid()

        first = start_directory(tmp_path, "campaign_service", supervisor)
        second = start_directory(tmp_path, "campaign_service", supervisor)

        assert first == second
        assert first.name == f"campaign_service-{process_identity(supervisor)}"
        assert (first / MARKER).read_text() == process_identity(supervisor)

    def test_each_service_has_its_own(self, tmp_path: Path) -> None:
        ours = start_directory(tmp_path, "campaign_service", os.getpid())
        theirs = start_directory(tmp_path, "user_service", os.getpid())

        assert ours != theirs

    def test_the_first_worker_removes_the_directories_of_gone_supervisors(
        self, tmp_path: Path
    ) -> None:
        running = start_directory(tmp_path, "user_service", os.getppid())
        gone = tmp_path / f"campaign_service-{gone_pid()}-1"
        gone.mkdir()
        (gone / MARKER).write_text("")
        (gone / "counter_1.db").write_bytes(b"")

        new = start_directory(tmp_path, "campaign_service", os.getpid())

        assert sorted(tmp_path.iterdir()) == sorted([new, running])

    def test_a_pid_used_again_is_another_start(self, tmp_path: Path) -> None:
        identity = process_identity(os.getpid())
        assert identity is not None
        pid, started = identity.split("-")
        earlier = tmp_path / f"campaign_service-{pid}-{int(started) - 1}"
        earlier.mkdir()
        (earlier / MARKER).write_text("")

        assert remove_stale(tmp_path) == [earlier]
        assert not earlier.exists()

    def test_what_is_not_a_start_directory_is_left_alone(self, tmp_path: Path) -> None:
        unmarked = tmp_path / f"campaign_service-{gone_pid()}-1"
        unmarked.mkdir()
        other = tmp_path / "notes"
        other.mkdir()
        (other / MARKER).write_text("")

        assert remove_stale(tmp_path) == []
        assert unmarked.exists()
        assert other.exists()

    def test_a_gone_supervisor_has_no_identity(self) -> None:
        assert process_identity(gone_pid()) is None


class TestShareMetricsAcrossProcesses:
    def test_one_process_changes_nothing(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.delenv("WEB_CONCURRENCY", raising=False)
        monkeypatch.setenv("METRICS_MULTIPROCESS_DIR", str(tmp_path))
        monkeypatch.setenv(MULTIPROC_DIR_VARIABLE, str(tmp_path / "from-outside"))

        assert share_metrics_across_processes("campaign_service") is None
        assert MULTIPROC_DIR_VARIABLE not in os.environ  # the services set it, no one else
        assert list(tmp_path.iterdir()) == []

    def test_too_late_once_prometheus_client_is_imported(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # This test process has imported it, as an app that imported it first would have.
        assert "prometheus_client" in sys.modules
        monkeypatch.setenv("WEB_CONCURRENCY", "2")
        monkeypatch.setenv("METRICS_MULTIPROCESS_DIR", str(tmp_path))

        with pytest.raises(RuntimeError, match="imported before"):
            share_metrics_across_processes("campaign_service")
        assert list(tmp_path.iterdir()) == []
