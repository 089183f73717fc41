"""The package structure: imports point down (train -> model -> kernels), the training stages are
siblings that never import one another, and files stay short enough to read."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("kernels", "model", "train")               # each may import only the ones before it
STAGES = ("pretrain", "sft", "dpo")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("package", LAYERS[:-1])
def test_lower_layers_never_import_higher_ones(package):
    higher = LAYERS[LAYERS.index(package) + 1:]
    offenders = [f"{path.relative_to(ROOT)} imports {name}"
                 for path in sorted((ROOT / package).glob("*.py")) for name in sorted(imported_modules(path))
                 if name.split(".")[0] in higher]
    assert not offenders, offenders


def test_training_stages_are_siblings():
    offenders = [f"train/{stage}.py imports {name}" for stage in STAGES
                 for name in sorted(imported_modules(ROOT / "train" / f"{stage}.py"))
                 if name in {f"train.{other}" for other in STAGES if other != stage}]
    assert not offenders, offenders


def test_files_stay_short():
    limits = {"kernels": 700, "model": 400, "train": 400}
    too_long = [f"{path.relative_to(ROOT)}: {n} lines" for package, limit in limits.items()
                for path in sorted((ROOT / package).glob("*.py"))
                if (n := len(path.read_text().splitlines())) > limit]
    assert not too_long, too_long
