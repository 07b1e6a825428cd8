"""What an install holds: the wheel and the sdist carry every module and every built-in search
space, and a raysc installed from either (not run from the source tree) finds every space by name."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT, build_artefact, install_artefact

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


def _resolve_every_space(site: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(site)}
    names = [Path(s).stem for s in SPACES]
    # From a folder outside the checkout: nothing of the source tree is on the path.
    run = subprocess.run(
        [sys.executable, "-c", RESOLVE, *names], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0 and f"resolved {len(names)}" in run.stdout, run.stderr[-3000:]


@pytest.mark.slow
def test_the_wheel_holds_every_module_and_space_and_an_install_from_it_resolves_them(wheel, tmp_path):
    built, site = wheel
    names = set(zipfile.ZipFile(built).namelist())
    assert {f"raysc/search_spaces/{s}" for s in SPACES} <= names
    assert set(MODULES) <= names, sorted(set(MODULES) - names)
    _resolve_every_space(site, tmp_path)


@pytest.mark.slow
def test_the_sdist_holds_the_top_level_spaces_and_an_install_from_it_resolves_them(tmp_path):
    sdist = build_artefact("sdist", tmp_path / "dist")
    with tarfile.open(sdist) as tar:
        top = tar.getnames()[0].split("/")[0]
        names = {n.removeprefix(f"{top}/") for n in tar.getnames()}
    assert {f"search_spaces/{s}" for s in SPACES} <= names  # the published layout, kept
    assert set(MODULES) <= names
    _resolve_every_space(install_artefact(sdist, tmp_path / "site"), tmp_path)
