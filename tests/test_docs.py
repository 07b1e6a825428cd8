"""The docs: the README a short front door whose links resolve, the site built strictly (a broken
link or anchor fails), the generated reference pages current, and the guide's code runnable."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from raysc.metadata import CLASSES, parse_metadata

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250


def _generate_module():
    spec = importlib.util.spec_from_file_location("docs_generate", ROOT / "docs" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_is_a_front_door_whose_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    assert any(link.startswith("docs/") for link in links)
    missing = [link for link in links if "://" not in link and not (ROOT / link).exists()]
    assert not missing, missing


def test_the_generated_reference_pages_are_current(tmp_path, monkeypatch, capsys):
    generate = _generate_module()
    assert generate.main(["--check"]) == 0, capsys.readouterr().err
    # A page left behind by a change to the parser or to TrainConfig is named, with the fix.
    for name in generate.PAGES:
        shutil.copy(generate.REFERENCE / name, tmp_path / name)
    (tmp_path / "cli.md").write_text((tmp_path / "cli.md").read_text().replace("--time-budget", "--budget"))
    monkeypatch.setattr(generate, "REFERENCE", tmp_path)
    assert generate.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert f"out of date (run python docs/generate.py): {tmp_path / 'cli.md'}" in err
    assert "configuration.md" not in err


def test_the_reference_pages_hold_every_command_and_training_key():
    generate = _generate_module()
    cli, config = generate.cli_reference(), generate.configuration_reference()
    for command in ("prepare", "pipeline", "search", "submit", "check-submission", "import-weights"):
        assert f"## `raysc {command}`" in cli
    assert "--time-budget" in cli and "--smoke-test" in cli
    for key in ("lr", "pseudo_threshold", "freeze_low_level", "city_dropout"):
        assert re.search(rf"^\| `{key}` \| `[^`]+` \| `[^`]+` \| \S", config, flags=re.M), key


def _build(config: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "--site-dir", str(site)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def test_the_docs_site_builds_strictly_and_a_broken_link_fails_it(tmp_path):
    built = _build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert built.returncode == 0, built.stderr
    assert (tmp_path / "site" / "reference" / "cli" / "index.html").is_file()
    # The same site with one link to a page that does not exist.
    copy = tmp_path / "copy"
    shutil.copytree(ROOT / "docs", copy / "docs")
    shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
    page = copy / "docs" / "guides" / "recipes.md"
    page.write_text(page.read_text() + "\nSee [the missing page](missing.md).\n")
    broken = _build(copy / "mkdocs.yml", tmp_path / "site2")
    assert broken.returncode != 0 and "missing.md" in broken.stderr


def test_the_guides_metadata_snippet_writes_files_prepare_accepts(tmp_path, monkeypatch):
    guide = (ROOT / "docs" / "guides" / "your-data.md").read_text()
    (snippet,) = re.findall(r"```python\n(.*?)```", guide, flags=re.S)
    rows = [
        ("clips/a/r1_0.wav", "bus", "Lyon", "2024-03-01 08:15:00", "train"),
        ("clips/a/r1_1.wav", "bus", "Lyon", "2024-03-01 08:15:00", "train"),
        ("clips/b/r2_0.wav", "beach", "Lyon", "2024-03-02 17:00:00", "train"),  # no counterpart
        ("clips/b/r3_0.wav", None, "Xi'an", "2024-03-03 21:30:00", "unlabelled"),
        ("clips/c/r4_0.wav", "pub", "Xi'an", "2024-03-04 23:05:00", "train"),
        ("clips/d/r5_0.wav", "park", "Oslo", "2024-03-05 10:00:00", "test"),
    ]
    table = pd.DataFrame(rows, columns=["path", "scene", "site", "start", "split"])
    table.to_csv(tmp_path / "my_meta.csv", index=False)
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "your-data.md", "exec"), {})
    dev, problems = parse_metadata(tmp_path / "dev.csv", subset="dev")
    assert problems == []
    assert list(dev["filename"]) == ["r1_0", "r1_1", "r3_0", "r4_0"]  # the beach clip left out
    assert list(dev["label"].fillna("")) == ["Bus", "Bus", "", "Bar"] and set(dev["label"].dropna()) <= set(CLASSES)
    assert list(dev["city"]) == ["Lyon", "Lyon", "Xi'an", "Xi'an"]  # unquoted, as the challenge writes it
    ev, problems = parse_metadata(tmp_path / "eval.csv", subset="eval")
    assert problems == [] and list(ev["filename"]) == ["r5_0"] and ev["label"].isna().all()


@pytest.mark.parametrize("page", sorted(p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")))
def test_every_page_is_in_the_sites_navigation(page):
    assert page in (ROOT / "mkdocs.yml").read_text()
