"""The docs: the README a short front door whose links resolve, the site built strictly (a broken
link or anchor fails), the generated reference pages current, and the guide's code runnable."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
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


# ---- the Python API page: every object it renders documents exactly its parameters or fields

API_PAGE = ROOT / "docs" / "reference" / "api.md"
SECTIONS = ("Args", "Attributes", "Returns", "Yields", "Raises")


def _docstring_sections(doc: str) -> dict[str, list[str]]:
    """A Google-style docstring's sections, each with the names its entries document (``Args``:
    ``name: ...`` or ``**name: ...`` lines at the section's indent plus four)."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in inspect.cleandoc(doc).splitlines():
        if line.rstrip(":") in SECTIONS and line.endswith(":"):
            current = sections.setdefault(line.rstrip(":"), [])
        elif line and not line.startswith(" "):
            current = None  # prose after a section ends it
        elif current is not None and (entry := re.match(r" {4}\**(\w+)(?: \([^)]*\))?:", line)):
            current.append(entry[1])
    return sections


def api_problems(obj: object, name: str) -> list[str]:
    """What ``name``'s docstring lacks under the convention: a summary; for a function, ``Args``
    naming every parameter in order and ``Returns`` when it returns something; for a dataclass,
    ``Attributes`` naming every field; for another class with its own ``__init__``, ``Args``."""
    doc = getattr(obj, "__doc__", None)
    if not doc or not doc.strip():
        return [f"{name}: no docstring"]
    sections = _docstring_sections(doc)
    problems = []

    def documents(section: str, wanted: list[str], *, ordered: bool = True) -> None:
        got = sections.get(section, [])
        if (got if ordered else sorted(got)) != (wanted if ordered else sorted(wanted)):
            problems.append(f"{name}: {section} documents {got}, the signature has {wanted}")

    if inspect.isclass(obj):
        if dataclasses.is_dataclass(obj):
            fields = [f.name for f in dataclasses.fields(obj)]
            documents("Attributes", fields, ordered=False)
        elif "__init__" in vars(obj):
            documents("Args", [p for p in inspect.signature(obj).parameters])
        return problems
    signature = inspect.signature(obj)
    documents("Args", [p for p in signature.parameters if p not in ("self", "cls")])
    returns = signature.return_annotation
    if returns not in (None, "None", inspect.Signature.empty) and not {"Returns", "Yields"} & set(sections):
        problems.append(f"{name}: returns {returns} but has no Returns section")
    return problems


def _api_objects() -> list[tuple[str, object]]:
    """Every ``::: raysc.module.name[.member]`` entry of the API page, imported."""
    objects = []
    for path in re.findall(r"^::: (raysc[\w.]+)$", API_PAGE.read_text(), flags=re.M):
        parts = path.split(".")
        for cut in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ModuleNotFoundError:
                continue
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
            objects.append((path, obj))
            break
    return objects


def test_every_object_on_the_api_page_follows_the_docstring_convention():
    objects = _api_objects()
    assert len(objects) == API_PAGE.read_text().count("\n::: ") > 40
    assert [p for path, obj in objects for p in api_problems(obj, path)] == []


def test_the_convention_check_names_what_a_docstring_lacks():
    def scale(x: float, *, by: float = 2.0) -> float:
        """Multiply.

        Args:
            x: the number.
        """
        return x * by

    @dataclasses.dataclass
    class Pair:
        """Two numbers.

        Attributes:
            left: the first.
        """

        left: int
        right: int

    def undocumented(x: int) -> None:
        pass

    assert api_problems(scale, "scale") == [
        "scale: Args documents ['x'], the signature has ['x', 'by']",
        "scale: returns float but has no Returns section",
    ]
    assert api_problems(Pair, "Pair") == ["Pair: Attributes documents ['left'], the signature has ['left', 'right']"]
    assert api_problems(undocumented, "undocumented") == ["undocumented: no docstring"]


def test_the_api_pages_example_calls_the_api_as_it_is(monkeypatch, capsys):
    """The example runs against the real signatures: each call is bound to the function it
    names (a renamed or removed keyword fails), without preparing data or training."""
    import raysc.pipeline
    import raysc.prepare
    from raysc.experiment import Ensemble

    (example,) = re.findall(r"```python\n(.*?)```", API_PAGE.read_text(), flags=re.S)
    calls = []

    def bound(real, result=None):
        def call(*args, **kwargs):
            calls.append(real.__name__)
            inspect.signature(real).bind(*args, **kwargs)
            return result

        return call

    final = Ensemble("e", "topk", (), -1, "data/mine", 1.0, True, {"macro_accuracy": 0.5})
    result = raysc.pipeline.PipelineResult(final, Path("submission.csv"), pd.DataFrame(), [], 1.0)
    monkeypatch.setattr(raysc.prepare, "prepare", bound(raysc.prepare.prepare))
    monkeypatch.setattr(raysc.pipeline, "run_pipeline", bound(raysc.pipeline.run_pipeline, result))
    exec(compile(example, "api.md", "exec"), {})
    assert calls == ["prepare", "run_pipeline"]
    assert capsys.readouterr().out == "submission.csv 0.5\n"
