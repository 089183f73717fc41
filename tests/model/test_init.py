"""model/__init__.py: the package imports without torch, and caps OpenMP's spinning before any
command of model/ or train/ loads torch (spinning threads on a shared CPU run several times slower)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHOW = "import sys, os, {package}; print('torch' in sys.modules, os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))"


def python(code: str, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**base, **env}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize("package", ["model", "train"])
def test_spinning_is_capped_before_torch_loads(package):
    assert python(SHOW.format(package=package)) == "False 10000 None"


@pytest.mark.parametrize("env, shown", [({"OMP_WAIT_POLICY": "ACTIVE"}, "None ACTIVE"),
                                        ({"OMP_WAIT_POLICY": "PASSIVE"}, "None PASSIVE"),
                                        ({"GOMP_SPINCOUNT": "5"}, "5 None")])
def test_what_the_user_set_is_kept(env, shown):
    assert python(SHOW.format(package="train"), **env) == f"False {shown}"
