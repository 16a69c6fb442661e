"""The project as an installable package: a wheel built from what the image's build context holds
(.dockerignore), with the six packages, the migration scripts and the three console scripts, and
working from outside the source tree. Offline: the build backend comes from the virtual
environment (setuptools, in the dev extra), nothing is downloaded."""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.support.processes import ROOT

PACKAGES = ("shared", "user_service", "campaign_service", "worker", "gateway", "deadletters")
CONSOLE_SCRIPTS = {
    "campaign-worker": "worker.__main__:main",
    "campaign-migrate": "shared.migrate:main",
    "deadletters": "deadletters.cli:main",
}
# What .dockerignore may exclude inside the folders it lets in.
CONTEXT_EXCLUDES = ("__pycache__", "*.pyc")


def migration_files() -> set[str]:
    folder = ROOT / "shared" / "migrations"
    return {
        path.relative_to(ROOT).as_posix()
        for path in folder.rglob("*")
        if path.suffix in (".py", ".mako") and "__pycache__" not in path.parts
    }


def copy_build_context(destination: Path) -> None:
    """Copy what `docker build .` sees: .dockerignore excludes everything, then lets paths in."""
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "the .dockerignore is an allow-list"
    for line in lines[1:]:
        if not line.startswith("!"):
            assert line.removeprefix("**/") in CONTEXT_EXCLUDES, line
            continue
        source, target = ROOT / line[1:], destination / line[1:]
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns(*CONTEXT_EXCLUDES))
        else:
            shutil.copy2(source, target)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    context = tmp_path_factory.mktemp("context")
    out = tmp_path_factory.mktemp("wheels")
    copy_build_context(context)
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--disable-pip-version-check",
            "--quiet",
            "--wheel-dir",
            str(out),
            str(context),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (path,) = out.glob("*.whl")
    return path


def dist_info_text(wheel: Path, name: str) -> str:
    with zipfile.ZipFile(wheel) as archive:
        (member,) = (n for n in archive.namelist() if n.endswith(f".dist-info/{name}"))
        return archive.read(member).decode()


def recorded_files(wheel: Path) -> set[str]:
    return {line.split(",")[0] for line in dist_info_text(wheel, "RECORD").splitlines() if line}


class TestWheel:
    def test_named_after_the_project_pure_python(self, wheel: Path) -> None:
        project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

        name, version, *_, platform = wheel.stem.split("-")
        assert (name, version) == (project["name"].replace("-", "_"), project["version"])
        assert platform == "any"

    def test_holds_the_six_packages_and_nothing_else(self, wheel: Path) -> None:
        files = recorded_files(wheel)
        top_level = {name.split("/")[0] for name in files} - {
            name.split("/")[0] for name in files if ".dist-info/" in name
        }

        assert top_level == set(PACKAGES)
        for package in PACKAGES:
            assert f"{package}/__init__.py" in files
        assert not any("__pycache__" in name for name in files)

    def test_ships_the_migration_scripts(self, wheel: Path) -> None:
        expected = migration_files()

        assert "shared/migrations/script.py.mako" in expected
        assert "shared/migrations/env.py" in expected
        assert any(name.startswith("shared/migrations/versions/") for name in expected)
        assert expected <= recorded_files(wheel)

    def test_declares_the_console_scripts(self, wheel: Path) -> None:
        entry_points = configparser.ConfigParser()
        entry_points.read_string(dist_info_text(wheel, "entry_points.txt"))

        assert dict(entry_points["console_scripts"]) == CONSOLE_SCRIPTS


def test_installed_it_runs_from_any_directory(wheel: Path, tmp_path: Path) -> None:
    """Unpacked as pip installs a pure-Python wheel, away from the source tree: the console
    scripts' functions import, and alembic finds the whole migration history next to the code."""
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    probe = """
import importlib, json, sys
from alembic.script import ScriptDirectory
import shared
from shared.migrate import alembic_config
scripts = json.loads(sys.argv[1])
for target in scripts.values():
    module, function = target.split(":")
    assert callable(getattr(importlib.import_module(module), function)), target
history = ScriptDirectory.from_config(alembic_config())
print(json.dumps({
    "shared": shared.__file__,
    "revisions": len(list(history.walk_revisions())),
    "heads": history.get_heads(),
}))
"""
    env = {**os.environ, "PYTHONPATH": str(site)}
    ran = subprocess.run(
        [sys.executable, "-c", probe, json.dumps(CONSOLE_SCRIPTS)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert ran.returncode == 0, ran.stderr
    found = json.loads(ran.stdout.splitlines()[-1])
    assert Path(found["shared"]).is_relative_to(site)
    versions = {name for name in migration_files() if "/versions/" in name}
    assert found["revisions"] == len(versions)
    assert len(found["heads"]) == 1
