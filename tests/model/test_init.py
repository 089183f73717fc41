"""model/__init__.py: the package imports without torch, and sets OpenMP's wait policy before any
command of model/ or train/ loads torch (a spinning OpenMP team on a shared CPU runs several times slower)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def python(code: str, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**base, **env}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize("package", ["model", "train"])
def test_the_wait_policy_is_passive_before_torch_loads(package):
    code = f"import sys, os, {package}; print('torch' in sys.modules, os.environ.get('OMP_WAIT_POLICY'))"
    assert python(code) == "False PASSIVE"


def test_a_wait_policy_the_user_set_is_kept():
    assert python("import os, train; print(os.environ['OMP_WAIT_POLICY'])", OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"
