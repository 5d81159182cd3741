import ast
import importlib.util
import os
import sys
import types
from pathlib import Path

import numpy as np

import dualtask  # noqa: F401  (before any test module imports torch: OpenMP's spin-wait cut short, see its docstring)

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
SHARED_DATA = ROOT.parent / "shared" / "data"
os.environ.setdefault("OMP_NUM_THREADS", "2")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running (minutes); run with -m slow")


def write_jpeg(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path, quality=95)


def run_script(script: str, *args, cwd=ROOT, timeout=600, env=None):
    """Run a backbone script (`ResNet.py`) or a module's command line (`dualtask.report`, run with -m) as a user
    would, from the repository root; returns the CompletedProcess."""
    import subprocess

    command = [str(ROOT / script)] if script.endswith(".py") else ["-m", script]
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, *command, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


_LOADING = []  # the benchmarks whose siblings load_benchmark is loading


def load_benchmark(name: str) -> types.ModuleType:
    """benchmarks/<name>.py as the module `name`, as `python benchmarks/<name>.py` would find its siblings: the
    benchmark modules it imports are loaded first, the same way, and each is in sys.modules under its own name
    before it runs, so that its `from sibling import ...` finds them (and no folder is added to the import
    path). Loaded once per test session."""
    path = BENCHMARKS / f"{name}.py"
    loaded = sys.modules.get(name)
    if loaded is not None:
        if Path(getattr(loaded, "__file__", "") or "").resolve() != path.resolve():
            raise ImportError(f"a module named {name!r} is already imported from elsewhere: {loaded!r}")
        return loaded
    if name in _LOADING:
        raise ImportError(f"benchmarks import each other in a circle: {' -> '.join(_LOADING + [name])}")
    _LOADING.append(name)
    try:
        for sibling in _benchmark_imports(path):
            load_benchmark(sibling)
    finally:
        _LOADING.remove(name)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _benchmark_imports(path: Path) -> list:
    """The names of the benchmarks/ modules that the file at `path` imports (absolute imports, anywhere in it)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return sorted(n for n in found if n != path.stem and (BENCHMARKS / f"{n}.py").is_file())


# a deliberately undertrained network (a few steps: its batch-norm running statistics are far from settled, so
# in eval mode whole layers can be silent); the health check would rightly stop it, so tests of everything else
# let it warn (tests/test_health.py tests the stop)
TINY = ["--face_data=demo", "--object_data=demo", "--image_size=32", "--epochs=1", "--max_per_class=16",
        "--lesion_fractions=[0.0, 0.2]", "--device=cpu", "--batch_size=32", "--health_check=warn"]
# the lesion methods of the README demo, on two sites and few images so that a test stays quick
TINY_LESION = ["--lesion_methods=['activation', 'loss', 'random']", "--lesion_layers=[0, -1]", "--random_repeats=3",
               "--rank_images=8", "--stimulus_steps=10"]


def torchrun_tiny(out_dir, port: int, *args, script: str = "ResNet.py"):
    """A tiny run (TINY, training and lesion stages, activation and random rankings) under torchrun with 2 CPU
    processes (gloo, one thread each); returns the CompletedProcess."""
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                           str(ROOT / script), *TINY, "--lesion_methods=['activation', 'random']",
                           "--random_repeats=2", "--rank_images=8", f"--out_dir={out_dir}",
                           "--stages=['train', 'lesion']", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def tree_digest(folder: Path) -> dict:
    """{relative path: sha256} of every file under folder: what a refused command must leave byte-identical."""
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def reproducible_rankings(sites, methods=("loss", "activation"), tasks=("face", "object"), overlap=1.0, share=1.0,
                          fractions=(0.1, 0.2, 0.3), filters=512) -> dict:
    """rankings.json's per-site entries the verdict reads beside the dissociation rows: every ranking's split-half
    overlap (`overlap` at every top set, of `filters` filters) and the site's receptive field (`share` of the image's
    side, or {site: share}); `sites`: names, or {name: share}."""
    shares = sites if isinstance(sites, dict) else {s: share for s in sites}
    return {s: {"reliability": {m: {t: {**{f"top{round(f * 100):g}": overlap for f in fractions}, "filters": filters}
                                    for t in tasks} for m in methods},
                "receptive_field": {"pixels": round(32 * sh), "image_size": 32, "share": sh}}
            for s, sh in shares.items()}
