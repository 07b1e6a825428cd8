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

SPACES = sorted(str(p.relative_to(ROOT / "search_spaces")) for p in (ROOT / "search_spaces").rglob("*.yaml"))
RECIPES = sorted(p.name for p in (ROOT / "recipes").glob("*.yaml"))
MODULES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "raysc").rglob("*.py"))

# Run in an installed copy: every built-in space and recipe resolves inside it and loads.
RESOLVE = (
    "import os, sys\n"
    "from raysc.pipeline import RECIPES_DIR, load_pipeline, recipe_names\n"
    "from raysc.search_space import SPACES_DIR, load_search_space, space_path\n"
    "names = sys.argv[1:]\n"
    "assert SPACES_DIR.is_relative_to(os.environ['PYTHONPATH']), SPACES_DIR\n"
    "assert RECIPES_DIR.is_relative_to(os.environ['PYTHONPATH']), RECIPES_DIR\n"
    "for name in names:\n"
    "    assert load_search_space(name).path == space_path(name) == SPACES_DIR / (name + '.yaml')\n"
    "for name in recipe_names():\n"
    "    load_search_space(load_pipeline(name).space_path())\n"
    "print('resolved', len(names), 'spaces and', len(recipe_names()), 'pipelines')\n"
)


def _resolve_every_space(site: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(site)}
    names = [s.removesuffix(".yaml") for s in SPACES]
    # From a folder outside the checkout: nothing of the source tree is on the path.
    run = subprocess.run(
        [sys.executable, "-c", RESOLVE, *names], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    said = f"resolved {len(names)} spaces and {len(RECIPES) + 1} pipelines"
    assert run.returncode == 0 and said in run.stdout, run.stdout + run.stderr[-3000:]


@pytest.mark.slow
def test_the_wheel_holds_every_module_and_space_and_an_install_from_it_resolves_them(wheel, tmp_path):
    built, site = wheel
    names = set(zipfile.ZipFile(built).namelist())
    assert {f"raysc/search_spaces/{s}" for s in SPACES} | {f"raysc/recipes/{r}" for r in RECIPES} <= names
    assert set(MODULES) <= names, sorted(set(MODULES) - names)
    _resolve_every_space(site, tmp_path)


@pytest.mark.slow
def test_the_sdist_holds_the_top_level_spaces_and_an_install_from_it_resolves_them(tmp_path):
    sdist = build_artefact("sdist", tmp_path / "dist")
    with tarfile.open(sdist) as tar:
        top = tar.getnames()[0].split("/")[0]
        names = {n.removeprefix(f"{top}/") for n in tar.getnames()}
    assert {f"search_spaces/{s}" for s in SPACES} | {f"recipes/{r}" for r in RECIPES} <= names  # the layout, kept
    assert set(MODULES) <= names
    _resolve_every_space(install_artefact(sdist, tmp_path / "site"), tmp_path)
