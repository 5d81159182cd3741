"""The configuration check as a property (issue 34): settings dicts whose changed settings are drawn from each
setting's rule and from just outside it, checked by the check alone (experiment.check: no image read, nothing
trained or written). Each is either refused with a UsageError that names one of the changed settings, or
accepted; a value outside its rule is always refused; the same dict gets the same answer twice; and the check
writes nothing. At least 500 dicts per run, in well under a minute."""
import math
import tempfile
from pathlib import Path

import pytest
from conftest import tree_digest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from dualtask.config import settings
from dualtask.core import names as names_mod
from dualtask.core.common import UsageError
from dualtask.data import kdef, taskdata
from dualtask.experiment import experiment

EXAMPLES = 500

# -- the rule of each setting, and values just outside it: (strategy of (value, outside)) ---------------------
# `outside` True: refused whatever the other settings are; False: inside the setting's own rule (it may still be
# refused for another setting's sake, naming one of the settings changed).


def inside(strategy):
    return strategy.map(lambda v: (v, False))


def outside(strategy):
    return strategy.map(lambda v: (v, True))


def either(inner, outer):
    return st.one_of(inside(inner), inside(inner), outside(outer))  # two to one: more dicts near the edge pass


def integer(low, optional=False):
    inner = st.integers(low, low + 40)
    outer = st.one_of(st.integers(low - 5, low - 1), st.just(True), st.just(low + 0.5), st.just(str(low)))
    return either(st.one_of(inner, st.none()) if optional else inner,
                  outer if optional else st.one_of(outer, st.none()))


def number(low, strict, optional=False):
    inner = st.floats(low, low + 10, exclude_min=strict, allow_nan=False)
    outer = st.one_of(st.floats(low - 5, low, exclude_max=not strict, allow_nan=False), st.just(math.nan),
                      st.just(math.inf), st.just("1"), st.just(False))
    return either(st.one_of(inner, st.none()) if optional else inner,
                  outer if optional else st.one_of(outer, st.none()))


def choice(options):
    return either(st.sampled_from(options), st.one_of(st.sampled_from(options).map(lambda o: str(o).upper() + "x"),
                                                      st.none(), st.just(1)))


FLAG = either(st.booleans(), st.sampled_from([1, 0, "True", None]))


def names(options, non_empty=True):
    """A list of distinct names from `options` (the rule), or just outside: empty, an unknown name, one twice, a
    bare string."""
    inner = st.lists(st.sampled_from(options), min_size=1 if non_empty else 0, max_size=len(options), unique=True)
    outer = st.one_of(st.lists(st.sampled_from(options), min_size=1, max_size=3).map(lambda v: v + v[:1]),
                      st.lists(st.sampled_from(options), max_size=2).map(lambda v: v + ["nonsense"]),
                      st.sampled_from(options))
    return either(inner, st.one_of(outer, st.just([])) if non_empty else outer)


FRACTIONS = either(st.lists(st.floats(0, 1), min_size=1, max_size=4, unique=True)
                   .filter(lambda v: any(f > 0 for f in v)),
                   st.one_of(st.just([]), st.just([0.0]), st.just([0.2, 1.5]), st.just([-0.1, 0.2]),
                             st.just([0.2, 0.2]), st.just(0.2), st.just([0.0, math.nan])))
SITE_NAMES = ["trunk.relu", "trunk.layer1.0", "trunk.layer3.0", "trunk.features.2", "trunk.features.42",
              "trunk.layer4.2"]
SITES = either(st.one_of(st.none(), st.lists(st.integers(-17, 16), min_size=1, max_size=3),
                         st.lists(st.sampled_from(SITE_NAMES), min_size=1, max_size=2)),
               st.one_of(st.just([]), st.just(3), st.just([True]), st.just([""])))
BRANCH = either(st.one_of(st.none(), st.integers(-2, 17), st.sampled_from(SITE_NAMES)),
                st.one_of(st.just(True), st.just(""), st.just(1.5), st.just([4])))


def folder_of(kind):
    """Paths made once per run of the test (see `places`): a strategy of the named ones."""
    return st.sampled_from(kind).map(lambda k: str(PLACES[k]))


def data_setting():
    """A task's data: 'demo' or a class-folder tree (inside); empty, None, a missing path, a file or an empty folder,
    refused unless the setting goes unread (a `tasks` dict replaces it; download=True fetches into a missing or
    empty folder): outside where nothing else changed, so drawn as inside, without the guarantee."""
    return inside(st.one_of(st.just("demo"), folder_of(["data"]), st.just(""), st.none(),
                            folder_of(["missing", "file", "empty"])))


RULES = {
    "backbone": choice(settings.BACKBONES), "batch_norm": FLAG, "fc_width": integer(8),
    "head": choice(settings.HEADS), "branch_at": BRANCH,
    "init": either(st.sampled_from(["random", "imagenet"]), st.sampled_from(["", "  "])),
    "download": FLAG, "image_size": integer(16), "max_per_class": integer(1, optional=True),
    "max_classes": integer(2, optional=True), "demo_per_class": integer(3), "epochs": integer(0),
    "lr": number(0, strict=True, optional=True), "grad_clip": number(0, strict=False),
    "weight_decay": number(0, strict=False, optional=True), "optimizer": choice(settings.OPTIMIZERS),
    "seed": integer(0), "compile": FLAG, "retrain": FLAG,
    "lesion_fractions": FRACTIONS, "lesion_methods": names(list(names_mod.METHODS)),
    "random_repeats": integer(1, optional=True), "rank_images": integer(1), "refit_readout": FLAG,
    "fixed_readout": FLAG,
    "localiser_fdr": either(st.floats(0, 1, exclude_min=True, exclude_max=True),
                            st.sampled_from([0, 1, 1.5, -0.1, "0.05", None])),
    "mask_steps": integer(1), "probes": names(["inversion", "transfer"], non_empty=False),
    "mask_l1": number(0, strict=False), "readout_images": integer(2), "lesion_layers": SITES,
    "lesion_mode": choice(("zero", "mean")), "lesion_keep_only": FLAG, "lesion_per_class": FLAG,
    "lesion_inner": FLAG, "gradcam_site": either(st.one_of(st.none(), st.sampled_from(SITE_NAMES)),
                                                 st.sampled_from([5, ""])),
    "stimulus_steps": integer(1), "stages": names(list(settings.STAGES)), "health_check": choice(names_mod.ACTIONS),
    "match_accuracy": FLAG, "ranking_reliability": FLAG, "greedy_racing": FLAG, "greedy_margin": number(0, False),
    "greedy_candidates": integer(1, optional=True),
    "greedy_stop": either(st.floats(0, 1, exclude_min=True), st.sampled_from([0, 1.01, -1, None, "0.2"])),
    "ranking_precision": choice(names_mod.RANKING_PRECISIONS),
    "lesion_epochs": either(st.one_of(st.none(), st.lists(st.integers(1, 6), max_size=3, unique=True)),
                            st.sampled_from([[0], [1, 1], "1", [True], [1.5]])),
    "verdict_rankings": either(st.one_of(st.none(), st.lists(st.sampled_from([m for m in names_mod.METHODS
                                                                            if m != "random"]),
                                                             min_size=1, unique=True)),
                               st.sampled_from([[], ["random"], ["loss", "loss"], "loss", ["nonsense"]])),
    "role": choice(settings.ROLES), "kdef_views": names(list(kdef.KDEF_VIEWS)),
    "face_crop": choice(taskdata.FACE_CROPS), "lfw_crop": FLAG,
    # paths: made in a temporary folder (PLACES); the bad ones are refused where a stage reads them
    "out_dir": either(folder_of(["new", "run"]), st.one_of(st.just(""), folder_of(["file", "under_file"]))),
    "face_data": data_setting(), "object_data": data_setting(),
    "subgroups": either(st.one_of(st.none(), folder_of(["groups"])), st.just("")),
    "probe_data": either(st.one_of(st.none(), st.just("demo:objects"), folder_of(["data", "missing", "empty"])),
                         st.just("")),
    "tasks": either(st.one_of(st.none(), st.just({"face": "demo", "object": "demo"}),
                              st.just({"identity": "demo", "expression": "demo"})),
                    st.sampled_from([{"face": "demo"}, {"1face": "demo", "object": "demo"}, "demo",
                                     {"face": "", "object": "demo"}])),
    "device": either(st.sampled_from(["cpu", "auto"]), st.sampled_from(["gpu", "cuda:99", "", "CPU"])),
    "batch_size": either(st.integers(1, 64), st.sampled_from([0, -3, None, 2.0])),  # 1: enough for one task alone
    # an experiment's own settings
    "seeds": either(st.one_of(st.none(), st.lists(st.integers(0, 3), min_size=1, max_size=2, unique=True)),
                    st.sampled_from([[], [0, 0], [-1], "0", [True]])),
    "controls": either(st.lists(st.sampled_from(experiment.CONTROLS), max_size=2, unique=True),
                       st.sampled_from([["shuffled"], ["pseudo_task", "pseudo_task"], "pseudo_task"])),
    "launcher": either(st.sampled_from(["local", "submitit_local"]), st.sampled_from(["sge", "", None])),
    "slurm": either(st.sampled_from([{}, {"timeout_min": 60}, {"slurm_partition": "gpu", "gpus_per_node": 1},
                                     {"mem_gb": 8.5, "slurm_constraint": "a100"}]),
                    st.sampled_from([{"timeout_mins": 60}, {"slurm_partitoin": "gpu"}, {"timeout_min": "60"},
                                     {"partition": "gpu"}, [], {1: 2}, {"gpus_per_node": True}])),
    "branch_points": either(st.one_of(st.none(), st.lists(st.one_of(st.none(), st.integers(0, 15)), min_size=1,
                                                          max_size=3, unique=True)),
                            st.sampled_from([[], [1, 1], [None, None], "4", [True], [1.5]])),
}
ANY = st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.floats(), st.text(max_size=8),
                st.lists(st.integers(-2, 20), max_size=3))  # a setting without a rule here: judged by SETTINGS


def strategy_of(name):
    if name in RULES:
        return RULES[name]
    rule = settings.SETTINGS[name][0]
    return ANY.map(lambda v: (v, not rule(v)))


PLACES = {}


@pytest.fixture(scope="module")
def places():
    """The paths the path settings draw from, in a folder of their own; afterwards it holds what it held."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in ("run", "data/cats", "data/dogs", "empty"):
            (tmp / name).mkdir(parents=True)
        for name in ("data/cats/1.jpg", "data/dogs/1.jpg", "file.txt", "run/notes.txt"):
            (tmp / name).write_text("x")
        (tmp / "groups.csv").write_text("task,image,group\nface,0,a\n")
        PLACES.update(new=tmp / "new", run=tmp / "run", file=tmp / "file.txt", under_file=tmp / "file.txt" / "run",
                      data=tmp / "data", missing=tmp / "missing", empty=tmp / "empty", groups=tmp / "groups.csv")
        before = tree_digest(tmp)
        yield tmp
        assert tree_digest(tmp) == before  # the check read, never wrote


def base():
    """A configuration the check accepts: a backbone script's settings for a tiny run."""
    import ResNet

    config = settings.hyperparameters(vars(ResNet))
    config.update(face_data="demo", object_data="demo", image_size=32, epochs=1, max_per_class=8, device="cpu",
                  batch_size=16, out_dir=str(PLACES["run"]), lesion_layers=[0, -1], lesion_fractions=[0.0, 0.2],
                  slurm={}, seeds=None, controls=[], launcher="local", branch_points=None)
    return config


def outcome(config):
    try:
        experiment.check(config)
    except UsageError as e:
        return str(e)
    return None


@st.composite
def changed_settings(draw):
    pool = sorted(set(settings.SETTINGS) | set(RULES))
    chosen = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=3, unique=True))
    return {name: draw(strategy_of(name)) for name in chosen}


def test_the_base_configuration_is_accepted(places):
    assert outcome(base()) is None


def test_every_rule_here_is_a_setting():
    others = {"face_data", "object_data", "tasks", "device", "batch_size", *experiment.EXPERIMENT_KEYS}
    assert set(RULES) - set(settings.SETTINGS) <= others


def test_any_settings_are_refused_naming_a_changed_one_or_accepted(places):
    seen = []

    @hypothesis_settings(max_examples=EXAMPLES, deadline=None, database=None,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(changed_settings())
    def check(changes):
        seen.append(1)
        config = dict(base(), **{name: value for name, (value, _) in changes.items()})
        said = outcome(config)
        if any(out for _, out in changes.values()):
            assert said is not None, f"accepted though outside its rule: {changes}"
        if said is not None:
            assert any(name in said for name in changes), f"{said!r} names none of {sorted(changes)}"
        assert outcome(config) == said  # the same answer twice

    check()
    assert len(seen) >= EXAMPLES
