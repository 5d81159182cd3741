"""OpenMP's waiting threads: `import dualtask` cuts libgomp's spinning short before torch is imported, unless
the environment already says how threads wait (BENCHMARKS.md, "The CPU against its own peak")."""
import os
import subprocess
import sys

from conftest import ROOT

SHOW = "import dualtask, os, sys; print(os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules)"


def spincount(**env) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    done = subprocess.run([sys.executable, "-c", SHOW], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(clean, **env))
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_spinning_is_cut_short_unless_the_environment_says_otherwise():
    assert spincount() == "3000 False"  # set before anything imported torch
    assert spincount(GOMP_SPINCOUNT="100000") == "100000 False"
    assert spincount(OMP_WAIT_POLICY="ACTIVE") == "None False"
