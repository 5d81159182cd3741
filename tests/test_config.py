import pytest
from conftest import run_script

from dualtask.config import settings as settings_table
from dualtask.config.settings import check_config, parse_overrides, task_specs
from dualtask.core.common import UsageError
from dualtask.experiment import pipeline as dualtask

DEFAULTS = {"backbone": "vgg16", "epochs": 30, "lr": 0.02, "face_data": "demo", "object_data": "demo",
            "max_per_class": None, "lesion_fractions": [0.0, 0.2], "compile": False, "device": "auto"}


def test_literals_strings_and_lists():
    c = parse_overrides(DEFAULTS, ["--epochs=3", "--lr=1", "--face_data=/data/vggface2", "--max_per_class=16",
                                   "--lesion_fractions=[0.0, 0.1, 0.5]", "--compile=True", "--device=cpu"])
    assert c["epochs"] == 3 and c["lr"] == 1.0 and isinstance(c["lr"], float)
    assert c["face_data"] == "/data/vggface2" and c["max_per_class"] == 16
    assert c["lesion_fractions"] == [0.0, 0.1, 0.5] and c["compile"] is True and c["device"] == "cpu"
    assert DEFAULTS["epochs"] == 30  # defaults untouched


def test_string_setting_keeps_text_that_looks_like_a_number():
    assert parse_overrides(DEFAULTS, ["--face_data=2024"])["face_data"] == "2024"
    assert parse_overrides(DEFAULTS, ["--face_data='demo'"])["face_data"] == "demo"


@pytest.mark.parametrize("arg, culprit", [("--epoch=3", "epoch"), ("--epochs=3.5", "epochs"),
                                          ("--epochs=three", "epochs"), ("--compile=1", "compile"),
                                          ("--lesion_fractions=0.2", "lesion_fractions"), ("epochs=3", "epochs=3")])
def test_bad_overrides_name_the_culprit_and_valid_names(arg, culprit):
    with pytest.raises(UsageError) as e:
        parse_overrides(DEFAULTS, [arg])
    assert culprit in str(e.value) and "valid names" in str(e.value) and "backbone" in str(e.value)


def test_tasks_come_from_data_settings():
    assert task_specs({"identity_data": "a", "expression_data": "b", "epochs": 1}) == \
        {"identity": "a", "expression": "b"}


@pytest.mark.parametrize("key, value", [("lesion_fractions", [0.2, 1.5]), ("stages", ["train", "plot"]),
                                        ("device", "gpu"), ("image_size", 8), ("backbone", "alexnet")])
def test_values_that_make_no_sense_are_refused(key, value):
    import vgg16

    config = dict(settings_table.hyperparameters(vars(vgg16)), **{key: value})
    with pytest.raises(UsageError, match=key if key != "backbone" else "backbone"):
        check_config(config)


def test_importing_a_script_runs_nothing(capsys):
    import importlib

    for name in ("vgg16", "vgg19", "ResNet", "ResNeXt"):
        module = importlib.import_module(name)
        assert "face_data" in vars(module) and "lesion_fractions" in vars(module)
    assert capsys.readouterr().out == ""


def test_shell_error_exits_2_without_traceback(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("earlier work")
    for args in (["--epoch=3"], ["--epochs=three"]):
        p = run_script("vgg16.py", *args, f"--out_dir={out}")
        assert p.returncode == 2, p.stderr
        assert "Traceback" not in p.stderr and "epoch" in p.stderr and "valid names" in p.stderr
    assert (out / "keep.txt").read_text() == "earlier work" and sorted(x.name for x in out.iterdir()) == ["keep.txt"]


def test_help_lists_hyperparameters_with_comments():
    p = run_script("ResNet.py", "--help")
    assert p.returncode == 0 and "--face_data='demo'" in p.stdout and "cap on images per class" in p.stdout


def test_provenance_lists_every_library_that_shapes_the_numbers():
    import cv2
    import PIL
    import scipy
    import torch

    versions = dualtask.provenance(torch.device("cpu"))["versions"]
    expected = {"torch": torch.__version__, "scipy": scipy.__version__, "opencv": cv2.__version__,
                "pillow": PIL.__version__}
    assert {k: versions[k] for k in expected} == expected
    for library in ("python", "torchvision", "numpy", "scikit-learn", "pandas"):
        assert versions[library], library


# -- properties of the override parser -------------------------------------------------------------------
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

TYPED = {"epochs": st.integers(-10**9, 10**9), "lr": st.floats(allow_nan=False, allow_infinity=False),
         "compile": st.booleans(), "lesion_fractions": st.lists(st.floats(0, 1), max_size=5),
         "max_per_class": st.one_of(st.none(), st.integers(0, 10**6))}


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(sorted(TYPED)).flatmap(lambda name: st.tuples(st.just(name), TYPED[name])))
def test_a_value_of_the_right_type_round_trips(pair):
    name, value = pair
    assert parse_overrides(DEFAULTS, [f"--{name}={value!r}"])[name] == value


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=20))
def test_any_text_is_kept_for_a_string_setting(text):
    assert parse_overrides(DEFAULTS, [f"--face_data={text}"])["face_data"] == _literal(text)


def _literal(text):
    """What a string setting holds for a text: the string a quoted literal spells, else the text itself."""
    import ast

    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text
    return value if isinstance(value, str) else text


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(DEFAULTS)), st.text(max_size=20))
def test_any_text_either_parses_to_the_right_type_or_is_a_usage_error(name, text):
    try:
        value = parse_overrides(DEFAULTS, [f"--{name}={text}"])[name]
    except UsageError as e:
        assert name in str(e)
        return
    default = DEFAULTS[name]
    if default is not None:
        assert isinstance(value, type(default)) or (isinstance(default, list) and isinstance(value, list))


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=30))
def test_a_malformed_argument_is_a_usage_error(arg):
    if arg.startswith("--") and "=" in arg:
        return
    try:
        parse_overrides(DEFAULTS, [arg])
    except UsageError:
        return
    raise AssertionError(f"{arg!r} was accepted")
