"""The directory of a multi-process start (shared/multiprocess.py): shared by the workers of
one start, new for each start, and those of gone supervisors removed, never a running one's;
only ever a directory of this user's that no one else may write. Only a worker of uvicorn's
supervisor uses one. Killed processes' live gauges leave the totals at the next scrape; a port
is shared by the processes of one start only."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from shared.multiprocess import (
    MARKER,
    MULTIPROC_DIR_VARIABLE,
    dead_processes,
    default_base,
    live_gauge_pid,
    port_of_this_start,
    process_identity,
    remove_stale,
    several_processes,
    share_metrics_across_processes,
    start_directory,
)
from tests.support.processes import ROOT

NOBODY = 65534


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

    def test_a_directory_it_could_not_remove_is_not_reported(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        gone = tmp_path / f"campaign_service-{gone_pid()}-1"
        gone.mkdir()
        (gone / MARKER).write_text("")
        monkeypatch.setattr(shutil, "rmtree", lambda *_, **__: None)

        assert remove_stale(tmp_path) == []
        assert gone.exists()

    def test_a_gone_supervisor_has_no_identity(self) -> None:
        assert process_identity(gone_pid()) is None


class TestOnlyAPrivateDirectory:
    """Another local user must not be able to plant a directory, files or links the service then
    writes through."""

    def test_both_are_created_for_this_user_alone(self, tmp_path: Path) -> None:
        base = tmp_path / "metrics"
        previous = os.umask(0)  # even when the umask would let anyone write
        try:
            directory = start_directory(base, "campaign_service", os.getpid())
        finally:
            os.umask(previous)

        for path in (base, directory):
            assert stat.S_IMODE(path.stat().st_mode) == 0o700
            assert path.stat().st_uid == os.geteuid()

    def test_a_base_that_is_a_symbolic_link_is_refused(self, tmp_path: Path) -> None:
        target = tmp_path / "elsewhere"
        target.mkdir(mode=0o700)
        base = tmp_path / "metrics"
        base.symlink_to(target)

        with pytest.raises(RuntimeError, match=f"{base} is a symbolic link"):
            start_directory(base, "campaign_service", os.getpid())
        assert list(target.iterdir()) == []

    def test_a_dangling_symbolic_link_is_refused(self, tmp_path: Path) -> None:
        base = tmp_path / "metrics"
        base.symlink_to(tmp_path / "not-yet")

        with pytest.raises(RuntimeError, match=f"{base} is a symbolic link"):
            start_directory(base, "campaign_service", os.getpid())
        assert not (tmp_path / "not-yet").exists()

    def test_a_base_another_user_owns_is_refused(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        base = tmp_path / "metrics"
        base.mkdir(mode=0o700)
        if os.geteuid() == 0:
            os.chown(base, NOBODY, NOBODY)
        else:  # no way to give a directory away: be another user instead
            monkeypatch.setattr(os, "geteuid", lambda: NOBODY)

        with pytest.raises(RuntimeError, match=f"{base} belongs to uid"):
            start_directory(base, "campaign_service", os.getpid())
        assert list(base.iterdir()) == []

    @pytest.mark.parametrize("mode", [0o770, 0o1777])
    def test_a_base_others_may_write_is_refused(self, tmp_path: Path, mode: int) -> None:
        base = tmp_path / "metrics"
        base.mkdir()
        base.chmod(mode)

        with pytest.raises(RuntimeError, match=f"{base} may be written by others"):
            start_directory(base, "campaign_service", os.getpid())
        assert list(base.iterdir()) == []

    def test_a_planted_start_directory_is_refused(self, tmp_path: Path) -> None:
        base = tmp_path / "metrics"
        base.mkdir(mode=0o700)
        planted = tmp_path / "planted"
        planted.mkdir(mode=0o700)
        directory = base / f"campaign_service-{process_identity(os.getpid())}"
        directory.symlink_to(planted)

        with pytest.raises(RuntimeError, match=f"{directory} is a symbolic link"):
            start_directory(base, "campaign_service", os.getpid())

        directory.unlink()
        directory.mkdir()
        directory.chmod(0o777)
        with pytest.raises(RuntimeError, match=f"{directory} may be written by others"):
            start_directory(base, "campaign_service", os.getpid())

    def test_the_default_is_this_users_own(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
        assert default_base() == Path("/run/user/1000/campaign-platform-metrics")

        monkeypatch.delenv("XDG_RUNTIME_DIR")
        expected = Path(tempfile.gettempdir()) / f"campaign-platform-metrics-{os.geteuid()}"
        assert default_base() == expected


class FakeParent:
    """What ``multiprocessing.parent_process()`` answers in a child: the parent's pid."""

    def __init__(self, pid: int) -> None:
        self.pid = pid


def share_in_child(service: str, result: Path) -> None:
    """Run in a child that ``multiprocessing`` spawned, as uvicorn starts its workers."""
    result.write_text(str(share_metrics_across_processes(service)))


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

    def test_web_concurrency_alone_is_one_process(self, tmp_path: Path) -> None:
        # A command run in the service's container inherits WEB_CONCURRENCY (docker exec: its
        # parent pid is 0), as does a start whose --workers 1 overrides it.
        base = tmp_path / "metrics"
        imported = subprocess.run(
            [
                sys.executable,
                "-c",
                "import campaign_service.main\n"
                "from shared.multiprocess import multiprocess_directory\n"
                "print(multiprocess_directory())",
            ],
            cwd=ROOT,
            env={
                **os.environ,
                "ENVIRONMENT": "test",
                "WEB_CONCURRENCY": "2",
                "METRICS_MULTIPROCESS_DIR": str(base),
            },
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        )

        assert imported.stdout.splitlines()[-1] == "None"
        assert not base.exists()

    def test_a_spawned_worker_shares_its_supervisors_directory(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        base = tmp_path / "metrics"
        monkeypatch.delenv("WEB_CONCURRENCY", raising=False)  # --workers 2 sets none
        monkeypatch.setenv("METRICS_MULTIPROCESS_DIR", str(base))
        child = multiprocessing.get_context("spawn").Process(
            target=share_in_child, args=("campaign_service", tmp_path / "result")
        )
        child.start()
        child.join(timeout=60)

        assert child.exitcode == 0
        expected = base / f"campaign_service-{process_identity(os.getpid())}"
        assert (tmp_path / "result").read_text() == str(expected)

    @pytest.mark.parametrize(
        ("parent", "ppid"),
        [(None, 4321), (4321, 1), (4321, 0), (4321, 9999)],
        ids=["not a child", "orphaned to init", "no parent", "parent gone, another one's child"],
    )
    def test_only_a_child_of_its_living_parent_is_a_worker(
        self, parent: int | None, ppid: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        process = None if parent is None else FakeParent(parent)
        monkeypatch.setattr(multiprocessing, "parent_process", lambda: process)
        monkeypatch.setattr(os, "getppid", lambda: ppid)
        monkeypatch.setenv("WEB_CONCURRENCY", "2")
        monkeypatch.setenv("METRICS_MULTIPROCESS_DIR", str(tmp_path / "metrics"))

        assert share_metrics_across_processes("campaign_service") is None
        assert not (tmp_path / "metrics").exists()

    def test_a_supervisor_that_is_pid_1_has_workers(self, monkeypatch: pytest.MonkeyPatch) -> None:
        # `exec uvicorn ...` as a container's command: the supervisor is the container's pid 1.
        monkeypatch.setattr(multiprocessing, "parent_process", lambda: FakeParent(1))
        monkeypatch.setattr(os, "getppid", lambda: 1)

        assert several_processes()

    def test_too_late_once_prometheus_client_is_imported(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # This test process has imported it, as an app that imported it first would have.
        assert "prometheus_client" in sys.modules
        supervisor = os.getpid()  # any running process
        monkeypatch.setattr(multiprocessing, "parent_process", lambda: FakeParent(supervisor))
        monkeypatch.setattr(os, "getppid", lambda: supervisor)
        monkeypatch.setenv("METRICS_MULTIPROCESS_DIR", str(tmp_path))

        with pytest.raises(RuntimeError, match="imported before"):
            share_metrics_across_processes("campaign_service")
        assert list(tmp_path.iterdir()) == []


class TestKilledProcesses:
    """A process killed with SIGKILL cannot mark itself dead: a scrape does it for it."""

    def test_the_pid_is_read_from_live_gauge_files_only(self) -> None:
        assert live_gauge_pid("gauge_livesum_1234.db") == 1234
        assert live_gauge_pid("gauge_livemostrecent_7.db") == 7
        for other in ("gauge_all_1234.db", "counter_1234.db", "histogram_1234.db", MARKER):
            assert live_gauge_pid(other) is None
        assert live_gauge_pid("gauge_livesum_1234.db.tmp") is None

    def test_a_scrape_forgets_the_live_gauges_of_processes_that_no_longer_run(
        self, tmp_path: Path
    ) -> None:
        # Not at the top: a worker spawned from this module must import no prometheus_client.
        from shared.metrics import forget_killed_processes

        killed, running = gone_pid(), os.getpid()
        files = [
            f"gauge_livesum_{killed}.db",
            f"gauge_livemax_{killed}.db",
            f"gauge_livesum_{running}.db",
            f"gauge_all_{killed}.db",
            f"counter_{killed}.db",
            MARKER,
        ]
        for name in files:
            (tmp_path / name).write_bytes(b"")

        assert dead_processes(tmp_path) == {killed}
        forget_killed_processes(tmp_path)

        assert sorted(path.name for path in tmp_path.iterdir()) == sorted(files[2:])
        assert dead_processes(tmp_path) == set()


class TestPortOfThisStart:
    def start(self, base: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
        """Be a process of the start ``name``."""
        directory = base / name
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        monkeypatch.setenv(MULTIPROC_DIR_VARIABLE, str(directory))

    def test_the_processes_of_one_start_share_it_another_start_fails(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # Each entry opens the lock anew, as a process of its own would: flock locks of
        # separate opens conflict even within one process.
        self.start(tmp_path, "gateway-100-1", monkeypatch)
        with port_of_this_start(9080), port_of_this_start(9080):  # two processes of the start
            self.start(tmp_path, "gateway-200-1", monkeypatch)
            refused = pytest.raises(RuntimeError, match=r"port 9080 is in use by another start \(")
            with refused, port_of_this_start(9080):
                pass
            with port_of_this_start(9081):  # another port is another lock
                pass

        with port_of_this_start(9080):  # no process of the first start holds it any more
            self.start(tmp_path, "gateway-100-1", monkeypatch)
            with pytest.raises(RuntimeError, match="gateway-200-1"), port_of_this_start(9080):
                pass
