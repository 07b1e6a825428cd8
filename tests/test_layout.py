"""The package's structure: modules in layers (no import circle), imports inside functions only
where they are deliberately lazy, and one module that knows the experiment folder's layout."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "raysc"
HEAVY = ("ray", "optuna", "matplotlib", "torch", "torchaudio")  # seconds to import: may be imported lazily
# Names inside an experiment folder; only raysc/experiment.py may join them onto a path.
EXPERIMENT_NAMES = {
    "pipeline.json",
    "trials.csv",
    "search.json",
    "space.yaml",
    "study.journal",
    "tune",
    "tune-state",
    "train",
    "trials",
    "search.log",
    "record.json",
    "train.log",
    "ensembles",
    "ensemble.json",
    "pseudo",
    "candidates.csv",
    "summary.csv",
    "plots",
    "submission",
    ".in-use",
}


def _modules() -> dict[str, tuple[Path, ast.Module]]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(("raysc", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
        out[name] = (path, ast.parse(path.read_text()))
    return out


def _target(module: str, path: Path, node: ast.ImportFrom | ast.Import, alias: ast.alias) -> str:
    if isinstance(node, ast.Import):
        return alias.name
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
    return base


def _imports(modules: dict) -> list[tuple[str, str, ast.AST, bool]]:
    """(importer, imported module, node, inside a function) for every import statement."""
    found = []
    for name, (path, tree) in modules.items():
        inner = {
            id(n)
            for f in ast.walk(tree)
            if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
            for n in ast.walk(f)
            if isinstance(n, ast.Import | ast.ImportFrom)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                for alias in node.names:
                    target = _target(name, path, node, alias)
                    if f"{target}.{alias.name}" in modules:  # from . import models
                        target = f"{target}.{alias.name}"
                    found.append((name, target, node, id(node) in inner))
    return found


def test_no_import_circle():
    modules = _modules()
    edges: dict[str, set[str]] = {}
    for importer, target, _, _ in _imports(modules):
        if target in modules and target != importer and not target.startswith(importer + "."):
            edges.setdefault(importer, set()).add(target)
    state: dict[str, int] = {}
    circles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == 1:
                circles.append(" -> ".join([*stack[stack.index(n) :], n]))
            elif not state.get(n):
                visit(n, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(modules):
        if not state.get(m):
            visit(m, [])
    assert circles == []


def test_imports_inside_functions_are_deliberately_lazy():
    modules = _modules()
    # Our own modules that import Ray at their top: importing them is as heavy as importing Ray.
    heavy_own = {m for m, t, _, inner in _imports(modules) if not inner and t.split(".")[0] in ("ray", "matplotlib")}
    problems = []
    for importer, target, node, inner in _imports(modules):
        if not inner or importer == "raysc.cli":  # the CLI imports each subcommand's module when it runs
            continue
        if target.split(".")[0] not in HEAVY and target not in heavy_own:
            problems.append(f"{importer}:{node.lineno}: {target} imported inside a function")
    for name, (path, tree) in modules.items():
        lines = path.read_text().splitlines()
        for f in ast.walk(tree):
            if not isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef) or name == "raysc.cli":
                continue
            first = next((n for n in f.body if isinstance(n, ast.Import | ast.ImportFrom)), None)
            if first and not any("lazy" in line for line in lines[first.lineno - 2 : first.lineno]):
                problems.append(f"{name}:{first.lineno}: a lazy import without its reason (# lazy: ...)")
    assert problems == []


def test_only_the_experiment_module_spells_paths_inside_an_experiment():
    problems = []
    for name, (path, tree) in _modules().items():
        if name == "raysc.experiment":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
                part = node.right
                if isinstance(part, ast.Constant) and part.value in EXPERIMENT_NAMES:
                    problems.append(f"{path.name}:{node.lineno}: / {part.value!r}")
            head = node.values[0] if isinstance(node, ast.JoinedStr) and node.values else None
            if isinstance(head, ast.Constant) and str(head.value).startswith("round-"):
                problems.append(f"{path.name}:{node.lineno}: f'round-...'")
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") in ("glob", "rglob") and node.args:
                pattern = node.args[0]
                if isinstance(pattern, ast.Constant) and any(p in pattern.value for p in ("round-", "ensembles/")):
                    problems.append(f"{path.name}:{node.lineno}: glob({pattern.value!r})")
    assert problems == []


# The layers, top to bottom: a module imports only from its own layer or those below it. The
# library is plain Python and PyTorch: it never imports Ray, so that a test can train a model
# without starting Ray (DESIGN.md: Ray at the edges).
LAYERS = {
    "command line": ["raysc.cli"],
    "stages": [
        "raysc.pipeline",  # and its modules
        "raysc.demo",
        "raysc.search",
        "raysc.crossfit",
        "raysc.refit",
        "raysc.pseudo_candidates",
        "raysc.submission",
        "raysc.leaderboard",
        "raysc.plots",
    ],
    "launch": ["raysc.distributed", "raysc.inference", "raysc.asha", "raysc.sampler", "raysc.live", "raysc.tunestate"],
    "library": ["raysc"],  # everything else
}


def _layer(module: str) -> int:
    """The layer's depth (0 = top) of a raysc module: its own entry, or its package's."""
    for depth, (_, names) in enumerate(LAYERS.items()):
        if any(module == n or module.startswith(n + ".") for n in names if n != "raysc"):
            return depth
    return len(LAYERS) - 1


def test_modules_import_only_from_their_layer_or_below():
    problems = []
    for importer, target, node, _ in _imports(_modules()):
        if target.split(".")[0] != "raysc" or target == importer:
            continue
        if _layer(target) < _layer(importer):
            names = list(LAYERS)
            problems.append(
                f"{importer}:{node.lineno} ({names[_layer(importer)]}) imports {target} ({names[_layer(target)]})"
            )
    assert problems == []


def test_the_library_never_imports_ray():
    library = len(LAYERS) - 1
    ray_users = sorted(
        f"{importer}:{node.lineno}"
        for importer, target, node, _ in _imports(_modules())
        if target.split(".")[0] == "ray" and _layer(importer) == library
    )
    assert ray_users == []


def test_every_layer_names_modules_that_exist():
    modules = _modules()
    named = [n for names in LAYERS.values() for n in names]
    assert all(n in modules for n in named), sorted(set(named) - set(modules))


def test_no_function_is_longer_than_a_screenful_or_two():
    longest = 120  # lines, decorators and docstring included: one job per function
    long = [
        f"{path.name}:{f.lineno} {f.name} ({f.end_lineno - f.lineno + 1} lines)"
        for path, tree in _modules().values()
        for f in ast.walk(tree)
        if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef) and f.end_lineno - f.lineno + 1 > longest
    ]
    assert long == []
