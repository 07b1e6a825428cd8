"""What an install holds: the wheel and the sdist carry every module and every built-in search
space, and a raysc installed from either (not run from the source tree) finds every space by name."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SPACES = sorted(p.name for p in (ROOT / "search_spaces").glob("*.yaml"))
MODULES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "raysc").rglob("*.py"))

# Run in an installed copy: every built-in space resolves inside it and loads.
RESOLVE = (
    "import os, sys\n"
    "from raysc.search_space import SPACES_DIR, load_search_space, space_path\n"
    "names = sys.argv[1:]\n"
    "assert SPACES_DIR.is_relative_to(os.environ['PYTHONPATH']), SPACES_DIR\n"
    "for name in names:\n"
    "    assert load_search_space(name).path == space_path(name) == SPACES_DIR / (name + '.yaml')\n"
    "print('resolved', len(names))\n"
)


def _build(kind: str, out: Path) -> Path:
    """Build the project's wheel or sdist into ``out`` with setuptools' own backend, from a copy
    of what the project tracks (a build leaves its own folders behind)."""
    source = out.parent / "source"
    source.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("raysc", "search_spaces"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    script = f"from setuptools import build_meta; print(build_meta.build_{kind}({str(out)!r}))"
    done = subprocess.run([sys.executable, "-c", script], cwd=source, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / done.stdout.strip().splitlines()[-1]


def _install_and_resolve(artefact: Path, target: Path, tmp_path: Path) -> None:
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
    done = subprocess.run([*pip, "--target", str(target), str(artefact)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": str(target)}
    names = [Path(s).stem for s in SPACES]
    # From a folder outside the checkout: nothing of the source tree is on the path.
    run = subprocess.run(
        [sys.executable, "-c", RESOLVE, *names], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0 and f"resolved {len(names)}" in run.stdout, run.stderr[-3000:]


@pytest.mark.slow
def test_the_wheel_holds_every_module_and_space_and_an_install_from_it_resolves_them(tmp_path):
    wheel = _build("wheel", tmp_path / "dist")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"raysc/search_spaces/{s}" for s in SPACES} <= names
    assert set(MODULES) <= names, sorted(set(MODULES) - names)
    _install_and_resolve(wheel, tmp_path / "site", tmp_path)


@pytest.mark.slow
def test_the_sdist_holds_the_top_level_spaces_and_an_install_from_it_resolves_them(tmp_path):
    sdist = _build("sdist", tmp_path / "dist")
    with tarfile.open(sdist) as tar:
        top = tar.getnames()[0].split("/")[0]
        names = {n.removeprefix(f"{top}/") for n in tar.getnames()}
    assert {f"search_spaces/{s}" for s in SPACES} <= names  # the published layout, kept
    assert set(MODULES) <= names
    _install_and_resolve(sdist, tmp_path / "site", tmp_path)
