"""requirements.txt names every third-party package the project imports, anywhere (inside functions too), so
that a fresh machine that installs it can run every stage."""
import ast
import re
import sys
from pathlib import Path

import pytest
from conftest import ROOT

# import names whose distribution on PyPI is called otherwise
DISTRIBUTIONS = {"sklearn": "scikit-learn", "PIL": "pillow", "cv2": "opencv-python-headless", "yaml": "pyyaml",
                 "skimage": "scikit-image", "submitit": "submitit", "scipy": "scipy"}
OPTIONAL = {"timm"}  # imported only when asked for, named by an extra of pyproject.toml (pip install .[timm])
SKIPPED_FOLDERS = {"runs", "venv", "__pycache__"}  # run outputs and environments, not the project's code


def project_files(root: Path) -> list:
    return [p for p in root.rglob("*.py")
            if not any(part.startswith(".") or part in SKIPPED_FOLDERS for part in p.relative_to(root).parts)]


def third_party_imports(root: Path) -> dict:
    """{top-level import name: first file importing it} over every .py file of the project, leaving out the
    standard library and the project's own modules (any module or folder name of the project)."""
    files = project_files(root)
    own = {p.stem for p in files} | {p.parent.name for p in files}
    found = {}
    for path in sorted(files):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in own and top != "__future__":
                    found.setdefault(top, str(path.relative_to(root)))
    return found


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def required(text: str) -> set:
    """Distribution names in a requirements file's text (comments and options left out)."""
    names = set()
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        m = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)", line)
        if m and not line.startswith("-"):
            names.add(_normal(m.group(1)))
    return names


def missing(root: Path, requirements_text: str) -> list:
    """'distribution (imported in file)' for every third-party import the requirements do not name."""
    have = required(requirements_text)
    return [f"{DISTRIBUTIONS.get(name, name)} (imported in {where})"
            for name, where in sorted(third_party_imports(root).items())
            if _normal(DISTRIBUTIONS.get(name, name)) not in have and name not in OPTIONAL]


def test_optional_imports_are_extras_of_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11 on
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    named = {_normal(m.group(1)) for k, lines in extras.items() if k != "test" for line in lines
             for m in [re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)", line)] if m}
    assert {_normal(DISTRIBUTIONS.get(n, n)) for n in OPTIONAL} <= named


def test_requirements_name_every_third_party_import():
    imports = third_party_imports(ROOT)
    assert {"torch", "torchvision", "numpy", "sklearn", "matplotlib"} <= set(imports)  # the scan sees them all
    assert "dualtask" not in imports and "os" not in imports
    gaps = missing(ROOT, (ROOT / "requirements.txt").read_text())
    assert not gaps, f"requirements.txt lacks: {', '.join(gaps)}"


def test_a_missing_line_is_named():
    text = (ROOT / "requirements.txt").read_text()
    without = "\n".join(line for line in text.splitlines() if not line.lower().startswith("scikit-learn"))
    assert without != text
    gaps = missing(ROOT, without)
    assert len(gaps) == 1 and gaps[0].startswith("scikit-learn (imported in "), gaps
    named = ROOT / gaps[0].split("imported in ", 1)[1].rstrip(")")  # the first file that imports it, by path
    assert "sklearn" in named.read_text()


def test_imports_inside_functions_count(tmp_path):
    (tmp_path / "tool.py").write_text("import os\nimport helper\n\ndef f():\n    from PIL import Image\n"
                                      "    import cv2.data\n")
    (tmp_path / "helper.py").write_text("")
    assert missing(tmp_path, "pillow>=9  # images\n") == ["opencv-python-headless (imported in tool.py)"]


def requirement_lines(lines) -> set:
    """The requirement specifiers of a list of lines (comments and blanks left out), spaces removed."""
    return {line.split("#", 1)[0].replace(" ", "") for line in lines if line.split("#", 1)[0].strip()}


def test_requirements_txt_is_pyproject_dependencies_and_test_extra():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11 on
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = requirement_lines(project["dependencies"] + project["optional-dependencies"]["test"])
    have = requirement_lines((ROOT / "requirements.txt").read_text().splitlines())
    assert have == wanted, f"only in requirements.txt: {sorted(have - wanted)}; only in pyproject.toml: " \
                           f"{sorted(wanted - have)}"
