"""A library, not an application: what ``pip install celery-adaptive`` adds, and what the
``celery`` command imports from it.

The wheel is built from a copy of the repository's tracked files (a fresh clone, not this
working tree's build leftovers) with ``pip wheel --no-deps``; its contents are read as pip
would install them.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.support import ROOT


def _fresh_clone(dest: Path) -> Path:
    """The tracked files of the repository (or the whole tree outside a git checkout)."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, timeout=60)
    if listed.returncode != 0:
        shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info"))
        return dest
    for name in filter(None, listed.stdout.decode().split("\0")):
        source = ROOT / name
        if source.is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return dest


def _setuptools_is_new_enough() -> bool:
    try:
        import setuptools
    except ImportError:
        return False
    return int(setuptools.__version__.split(".")[0]) >= 77


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    clone = _fresh_clone(tmp_path_factory.mktemp("clone") / "celery-adaptive")
    out = tmp_path_factory.mktemp("wheel")
    # The test extra pins setuptools>=77 (what pyproject's build-system asks for), so the build
    # needs no index; without it pip fetches the build requirements in an isolated env.
    flags = ["--no-build-isolation"] if _setuptools_is_new_enough() else []
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", *flags, "-q", str(clone), "-w", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    wheels = list(out.glob("celery_adaptive-*.whl"))
    assert len(wheels) == 1, wheels
    return zipfile.ZipFile(wheels[0])


def test_wheel_installs_only_the_celery_adaptive_package(wheel):
    names = wheel.namelist()
    tops = {name.split("/")[0] for name in names}
    dist_info = {t for t in tops if t.endswith(".dist-info")}
    assert len(dist_info) == 1 and dist_info.pop().startswith("celery_adaptive-")
    assert tops - {t for t in tops if t.endswith(".dist-info")} == {"celery_adaptive"}, sorted(tops)
    assert "celery_adaptive/py.typed" in names and "celery_adaptive/pool.py" in names
    meta = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
    assert wheel.read(meta).decode().split() == ["celery_adaptive"]
    entry_points = wheel.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert "adaptive = celery_adaptive.cli:adaptive" in entry_points


def test_celery_command_imports_no_subcommand_of_the_plugin():
    """``celery inspect``, ``celery worker``, ...: the plugin hook imports only cli.py."""
    probe = (
        "import sys\n"
        "import celery.bin.celery  # loads every celery.commands entry point, as the CLI does\n"
        "print(sorted(m for m in sys.modules if m.startswith('celery_adaptive')))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['celery_adaptive', 'celery_adaptive.cli']"
    listed = subprocess.run([sys.executable, "-m", "celery", "adaptive", "--help"],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert listed.returncode == 0, listed.stderr
    for command in ("demo", "health", "settings", "top"):
        assert f"  {command} " in listed.stdout, listed.stdout
