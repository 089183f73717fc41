"""The package structure: imports point down (train -> model -> kernels), the network (model/'s own
modules) never reaches up into its file formats (model/io) or its serving (model/serve), serving
may read runs but not the reverse, the training stages are siblings that never import one another,
no module imports itself back through others, and files stay short enough to read."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("kernels", "model", "train")               # each may import only the ones before it
STAGES = ("pretrain", "sft", "dpo")
# Inside model/: the network's modules (model/*.py) may import neither subpackage, except the
# one-line command modules that keep `python -m model.X` working; io may not import serve.
# model/io/files.py (atomic writes) imports nothing of the project, so any module may use it.
MODEL_COMMANDS = {"chat", "web", "hf", "quantize"}
LEAF = "model.io.files"


def modules(package: str) -> dict[str, Path]:
    """{dotted module name: path} for every module of a top-level package, subpackages included."""
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


ALL = {name: path for package in LAYERS for name, path in modules(package).items()}


def written_imports(path: Path) -> set[str]:
    """Every module name an import in path names, as written, at any depth (late imports count too)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def imported_modules(path: Path) -> set[str]:
    """The modules path imports, our kernels under their folder's name (tritongpt.kernels.x -> kernels.x)."""
    return {name.removeprefix("tritongpt.") for name in written_imports(path) if name != "tritongpt"}


def test_nothing_imports_the_bare_name_kernels():
    """kernels/ imports as tritongpt.kernels: the bare name is Hugging Face's package (tritongpt/__init__.py)."""
    offenders = [f"{path.relative_to(ROOT)} imports {name}"
                 for path in sorted(ROOT.rglob("*.py")) if path.relative_to(ROOT).parts[0] not in (".git", "data", "runs")
                 for name in sorted(written_imports(path)) if name == "kernels" or name.startswith("kernels.")]
    assert not offenders, offenders


def project_imports(path: Path) -> set[str]:
    """The project's modules that path imports (a `from pkg import name` of a function counts as pkg)."""
    return {name for name in imported_modules(path) if name in ALL}


@pytest.mark.parametrize("package", LAYERS[:-1])
def test_lower_layers_never_import_higher_ones(package):
    higher = LAYERS[LAYERS.index(package) + 1:]
    offenders = [f"{path.relative_to(ROOT)} imports {name}"
                 for path in modules(package).values() for name in sorted(imported_modules(path))
                 if name.split(".")[0] in higher]
    assert not offenders, offenders


def test_the_network_never_imports_its_formats_or_serving():
    offenders = []
    for name, path in modules("model").items():
        parts = name.split(".")
        where = parts[1] if len(parts) > 1 and parts[1] in ("io", "serve") else None
        if where == "serve":
            continue                                     # serving sits on top: it may read runs (io)
        allowed = {"io"} if where == "io" else {"io", "serve"} if parts[-1] in MODEL_COMMANDS else set()
        offenders += [f"{path.relative_to(ROOT)} imports {imported}" for imported in sorted(imported_modules(path))
                      if imported.split(".")[:1] == ["model"] and imported.split(".")[1:2] in (["io"], ["serve"])
                      and imported.split(".")[1] not in allowed and not imported.startswith(LEAF)]
    assert not offenders, offenders


def test_the_leaf_stays_a_leaf():
    assert not project_imports(ALL[LEAF]), project_imports(ALL[LEAF])


def test_training_stages_are_siblings():
    offenders = [f"train/{stage}.py imports {name}" for stage in STAGES
                 for name in sorted(imported_modules(ROOT / "train" / f"{stage}.py"))
                 if name in {f"train.{other}" for other in STAGES if other != stage}]
    assert not offenders, offenders


def find_circles(graph: dict[str, set[str]]) -> list[str]:
    """Each import circle of graph {module: modules it imports} found by a depth-first walk, as
    'a -> b -> a'. A package importing its own modules (model/__init__'s lazy __getattr__) is no circle."""
    circles, state = [], {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if nxt.startswith(node + "."):
                continue
            if state.get(nxt) == "open":
                circles.append(" -> ".join(trail[trail.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return circles


def test_no_import_circles():
    graph = {name: project_imports(path) - {name} for name, path in ALL.items()}
    assert not find_circles(graph), find_circles(graph)


def test_the_circle_check_finds_a_late_import_circle(tmp_path):
    (tmp_path / "a.py").write_text("import model.gpt\n")
    (tmp_path / "b.py").write_text("def f():\n    from model.config import ModelConfig\n")
    assert project_imports(tmp_path / "a.py") == {"model.gpt"}
    assert project_imports(tmp_path / "b.py") == {"model.config"}
    assert find_circles({"x": {"y"}, "y": {"z"}, "z": {"x"}, "w": {"x"}}) == ["x -> y -> z -> x"]
    assert find_circles({"p": {"p.m"}, "p.m": {"p"}}) == []


def test_files_stay_short():
    limits = {"kernels": 700, "model": 400, "train": 400}
    too_long = [f"{path.relative_to(ROOT)}: {n} lines" for package, limit in limits.items()
                for path in modules(package).values()
                if (n := len(path.read_text().splitlines())) > limit]
    assert not too_long, too_long


PLACEHOLDERS = {"kernels/triton_X.py", "kernels/X.py", "bench/test_other.py"}   # names in examples, not citations


def test_cited_files_exist():
    """Every repository file or folder that a docstring, comment or the README names
    (kernels/reference.py, tests/model/test_gpt.py, bench/results/) exists."""
    cited = re.compile(r"(?<![\w/.])((?:kernels|model|train|bench|tests)/[\w/.*-]*(?:\.py|\.md|\.json|\.sh|/))")
    missing = set()
    for path in [ROOT / "README.md", *sorted(p for d in (*LAYERS, "bench", "tests") for p in (ROOT / d).rglob("*.py"))]:
        for name in set(cited.findall(path.read_text())) - PLACEHOLDERS:
            if not list(ROOT.glob(name)):
                missing.add(f"{path.relative_to(ROOT)} cites {name}")
    assert not missing, sorted(missing)
