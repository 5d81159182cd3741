"""The documentation against the code: every column of every CSV a run writes is explained in docs/outputs.md,
docs/settings.md is what `python -m dualtask.config.settings_doc` makes, and every setting `--help` lists is in it."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = ROOT / "docs" / "outputs.md"
SETTINGS_DOC = ROOT / "docs" / "settings.md"


def _csv_columns() -> dict:
    """{file name: its columns, as the code that writes it defines them}."""
    from dualtask.analysis import inspection
    from dualtask.config import settings
    from dualtask.experiment import aggregate, branching
    from dualtask.lesion import dissociation, subgroups
    from dualtask.report import compare, probes_report

    return {"lesion_results.csv": dissociation.LESION_COLUMNS,
            "dissociation.csv": dissociation.DISSOCIATION_COLUMNS,
            "lesion_per_class.csv": dissociation.PER_CLASS_COLUMNS,
            "lesion_subgroups.csv": subgroups.SUBGROUP_COLUMNS,
            "probes.csv": probes_report.PROBE_COLUMNS,
            "train_log.csv": settings.TRAIN_LOG_COLUMNS,
            "gradcam_overlap.csv": inspection.OVERLAP_COLUMNS,
            "decoding.csv": _literal_columns(Path(inspection.__file__), "decoding.csv"),
            "summary.csv": aggregate.SUMMARY_COLUMNS,
            "accuracy.csv": aggregate.ACCURACY_COLUMNS,
            "single_task.csv": aggregate.SINGLE_COLUMNS,
            "branching.csv": branching.BRANCHING_COLUMNS,
            "compare.csv": compare.COLUMNS}


def _literal_columns(path: Path, file_name: str) -> tuple:
    """The columns of a CSV whose write_csv call spells them out: write_csv(<... "file_name" ...>, (columns), rows)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "write_csv" and len(node.args) >= 2:
            names = {n.value for n in ast.walk(node.args[0]) if isinstance(n, ast.Constant)}
            if file_name in names and isinstance(node.args[1], (ast.Tuple, ast.List)):
                return tuple(ast.literal_eval(node.args[1]))
    raise AssertionError(f"{path}: no write_csv call of {file_name} with its columns spelled out")


def _section(text: str, file_name: str) -> str:
    """The part of a markdown text under the heading that names `file_name`, up to the next heading of its level
    or above."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^(#+)\s+(.*)$", line)
        if m and file_name in m.group(2).replace("`", "").replace(",", " ").split():
            level = len(m.group(1))
            end = next((j for j in range(i + 1, len(lines))
                        if re.match(rf"^#{{1,{level}}}\s", lines[j])), len(lines))
            return "\n".join(lines[i + 1:end])
    return ""


def _documented(section: str) -> set:
    """The names in backticks that open a table row's first cell: | `name` | ..."""
    return {m.group(1) for m in re.finditer(r"^\|\s*`([^`]+)`\s*\|", section, re.MULTILINE)}


@pytest.mark.parametrize("file_name", sorted(_csv_columns()))
def test_every_column_is_explained(file_name):
    section = _section(OUTPUTS.read_text(), file_name)
    assert section, f"docs/outputs.md has no heading naming {file_name}"
    missing = [c for c in _csv_columns()[file_name] if c not in _documented(section)]
    assert not missing, (f"docs/outputs.md, under {file_name}: no table row for the column(s) "
                         f"{', '.join(missing)}; add a row | `name` | what | for each")


def test_every_file_a_run_writes_is_listed():
    from dualtask.core import names

    text = OUTPUTS.read_text()
    wanted = list(names.SWEEP_FILES.values()) + ["config.json", "train_log.csv", names.HEALTH_FILE, "checkpoint.pt",
                                                  "report.html", "figures_status.json", "experiment.json",
                                                  "run_done.json", *names.READOUT_DIRS.values()]
    missing = [f for f in wanted if f"`{f}" not in text]
    assert not missing, f"docs/outputs.md does not name {', '.join(missing)}"


def test_settings_doc_is_generated():
    from dualtask.config import settings_doc

    assert SETTINGS_DOC.read_text() == settings_doc.markdown(), (
        "docs/settings.md differs from what the settings make: run "
        "`python -m dualtask.config.settings_doc docs/settings.md`")


def test_every_setting_of_help_is_in_settings_doc():
    out = subprocess.run([sys.executable, "vgg16.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    listed = re.findall(r"^\s+--(\w+)=", out.stdout, re.MULTILINE)
    assert len(listed) > 40, out.stdout
    rows = _documented(SETTINGS_DOC.read_text())
    missing = [name for name in listed if name not in rows]
    assert not missing, f"docs/settings.md has no row for the setting(s) {', '.join(missing)}"


def test_every_setting_of_each_script_is_in_settings_doc():
    from dualtask.config import settings, settings_doc

    rows = _documented(SETTINGS_DOC.read_text())
    for script in settings_doc.SCRIPTS:
        names = settings.hyperparameters(vars(settings.load_script(ROOT / script)))
        missing = [n for n in names if n not in rows]
        assert not missing, f"docs/settings.md has no row for {script}'s setting(s) {', '.join(missing)}"


def test_architecture_names_every_module_of_the_package():
    text = (ROOT / "docs" / "architecture.md").read_text()
    package = ROOT / "dualtask"
    modules = [p.relative_to(package).as_posix() for p in sorted(package.rglob("*.py"))
               if p.name not in ("__init__.py", "__main__.py")]
    missing = [m for m in modules if f"`{m}`" not in text]
    assert not missing, f"docs/architecture.md does not name: {missing}"
