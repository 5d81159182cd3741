"""The shape of the code, checked rather than described (docs/architecture.md): the root holds the design's six
modules, nothing edits the import path, no private name crosses a module, and modules and functions stay small.
The layer order itself is import-linter's contract in pyproject.toml (`lint-imports`, run by .ci/run)."""
import ast
import re

from conftest import ROOT

ROOT_MODULES = {"vgg16.py", "vgg19.py", "ResNet.py", "ResNeXt.py", "vggface2.py", "lesion_utils.py"}
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 500, 60


def code_files() -> list:
    folders = [ROOT / "dualtask", ROOT / "tests", ROOT / "benchmarks"]
    return sorted([p for f in folders for p in f.rglob("*.py")] + [ROOT / m for m in ROOT_MODULES])


def test_the_root_holds_the_design_modules_and_no_other_python_file():
    assert {p.name for p in ROOT.glob("*.py")} == ROOT_MODULES


def test_nothing_edits_the_import_path():
    edits = re.compile(r"sys\.path\.(insert|append)|\[\"PYTHON" + r"PATH\"\]|PYTHON" + r"PATH=")
    found = [f"{p.relative_to(ROOT)}:{i}" for p in code_files()
             for i, line in enumerate(p.read_text().splitlines(), 1) if edits.search(line)]
    assert not found, found


def test_no_private_name_is_imported_across_modules():
    found = []
    for p in code_files():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in (
                    "dualtask", "lesion_utils", "vggface2", "conftest"):
                found += [f"{p.relative_to(ROOT)}: {node.module}.{a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    assert not found, found


def test_modules_and_functions_stay_small():
    big = []
    for p in code_files():
        text = p.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            big.append(f"{p.relative_to(ROOT)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    big.append(f"{p.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines")
    assert not big, big
