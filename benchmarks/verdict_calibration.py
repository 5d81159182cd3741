"""How often the report's verdict "Task-specialised filters: yes" is right: its false-positive rate and its power.

    python benchmarks/verdict_calibration.py            # the default configuration (see "Time" below)
    python benchmarks/verdict_calibration.py --quick    # a smoke test of every part
    python benchmarks/verdict_calibration.py --seeds="[0, 1, 2, 3, 4]" --epochs=6 --draws=5000
    python benchmarks/verdict_calibration.py --sim_only # the statistics layer alone (about 2 minutes)

Everything is measured with the code the report itself runs: `lesion_utils.dissociation_rows` (index, bootstrap
interval, p against random-lesion pairs), `multiple_testing.corrected_rows` (the family-wise correction over every
site x ranking at a fraction) and `report.verdict` at the headline fraction (`report.headline_fraction`, 20%): a
run's verdict is "yes" when a row there "dissociates" (interval above 0 and corrected p < 0.05), as in
`report.summary` (whose sentence is read back for every trained run and checked against it). The "uncorrected"
rates judge the same rows with p_index in place of p_corrected: the verdict before the correction.

Three parts, all on the CPU:

1. Statistics layer (the headline false-positive rate). Simulated networks with no dissociation: per draw, two
   tasks with their own intact accuracies and test images (each image's correctness a draw; each image has a
   fragility shared by every site and lesion, which couples the sites as shared test images do in a real run),
   `--sim_sites` sites (as many as the trained runs lesion) whose lesions differ in size and spread from site to
   site, and at each site the targeted lesions of each ranking (`--sim_rankings`, one per task) and `--repeats`
   random lesions drawn from ONE distribution: a lesion costs each task a share of its correct images drawn at
   random (a general part shared by the two tasks and a part of each task's own), whatever the lesion is. Targeted
   and random lesions are exchangeable, so the index has no reason to beat the random pairs: each draw is a network
   without task-specialised filters, and the share of draws whose verdict says "yes" is the false-positive rate
   (`--draws`, 2,000 by default: a Wilson interval about +-0.01 wide at 5%; at most 1/(R+2) = 0.045 is what the
   test aims for). A second scenario, `stronger` (half as
   many draws), gives the targeted lesions three times the odds of costing an image, for both tasks alike
   (top-ranked filters matter more to everything, still no dissociation): the random pairs then spread less than
   the targeted index does, which is how a real network could fool the test; it is printed as a robustness line,
   not the headline.

2. Trained null networks (`--null`, default `halves`): ResNet50 (the `--backbone` script's hyperparameters, through
   `dualtask.run`) trained with two heads on ONE task: the demo faces' identities dealt in two halves to head
   face_a and head face_b by `vggface2.same_task`, the experiments' same_task control (two cache folders written
   with `vggface2.TaskData.save`, given as the `tasks` setting, so the runs are ordinary runs of the pipeline).
   Both heads learn the same identities from the same image distribution at the same chance level; only which
   images each sees differs. Every trunk filter useful to one head is useful to the other, so the trunk has no
   reason to divide by task, and a "yes" is a false positive of the claim "the tasks split the filters".
   `--null=identical` gives both heads the very same images and labels (two identical caches): the two heads then
   differ only in their initial weights. Why not the alternatives: the `pseudo_task` role splits the union of the
   face and object classes at random, so each pseudo-task holds faces and objects in unequal shares and a split
   has a reason; `tasks={'face': 'demo', 'object': 'demo'}` (or any two demo kinds) are two different tasks. The
   trained false-positive rate is the share of these networks whose verdict is "yes"; with 3 seeds its interval
   is wide, which is why the simulation gives the headline of the statistics.

3. Known positive: the same training on the real face/object demo tasks with `branch_at` (the trunk shared up to a
   site, then one copy of the rest per task: after the branch point every filter belongs to exactly one task), and
   the fully shared network (branch_at=None) of the same seeds beside it. power = the share of post-branch lesion
   sites (over seeds) that dissociate under the corrected verdict (any ranking's row; one ranking by default);
   power_shared = the share of the same sites of the shared networks (an answer to the real question there, not a
   rate of errors).

4. Experiment level (with `null` among the kinds and `--control_seeds`): the experiment verdict
   (`aggregate.verdict`: beyond random lesions and beyond the same_task control, Holm over site x ranking x
   comparison, the hierarchical bootstrap over seeds) of (a) the null networks of `--seeds` as the real tasks with
   further null networks of `--control_seeds` as their same_task control, where "yes" is a false positive, and
   (b) the shared face/object networks with the null networks of the same seeds as their same_task control: does
   the face/object split go beyond what two heads of one task show? One verdict each (3 networks a side), a check,
   not a rate.

Defaults: ResNet50 at 32 px; 5 classes per task (max_classes=5, chance 0.2) and demo_per_class=200 (140 training,
20 validation and 40 test images per class and task; the null's face set is drawn with 400 per class and halved),
batch 32, 4 epochs (AdamW, the script's defaults); branch_at=12 (trunk.layer3.4: the copies are layer3.5 and
layer4, about a quarter more per image than the shared trunk, where branching at 8 halves the training speed);
lesion sites at depths 0, 12, 13, 15, 16 (13, 15, 16 after the branch point); the loss ranking against 20 random
orders (which let one ranking's corrected p reach 1/22 < 0.05) on 8 ranking images per task; fractions 0 and 0.2;
3 seeds each. A first probe with 10 classes x 50 images for 8 epochs (the same compute) ended with heads at 0.39
and 0.26 (chance 0.1) and a branched site whose interval included 0; 5 classes x 200 images bring the face head to
0.73-0.85 and the object head to 0.35-0.39 (chance 0.2) and give 200 test images per task.

Measured on 2026-12-04 (2-core machine; BENCHMARKS.md has the table and commands). With the closed ring of
lesions as the index's null (multiple_testing.pair_null) and 10,000 draws: false_positive_rate 0.0406 [0.0369,
0.0446] (406/10000), uncorrected 0.1809; the `stronger` scenario 0.158 (0.351 uncorrected); power 9/9 = 1.00
[0.70, 1.00] with the loss ranking; power_shared 5/9; false_positive_rate_trained 3/3 with `halves` and 3/3 with
`identical`. Experiment level (part 4): the null networks against null controls, not shown (no false positive);
the shared face/object networks against the nulls as their same_task control, not shown (2 of 5 sites beyond
random lesions, 1 beyond the control, none both). Before the closed ring (random order r against order r + 1 only) the simulated rate was 0.052
[0.048, 0.057] over 10,000 draws, above the 1/21 it aims for: that open ring uses each random lesion twice, with
both signs, and the two targeted lesions once, so an outlying lesion stands out more in the observed index than in
a null one, and the maximum over sites favours the observed (0.053 [0.050, 0.057] in 20,000 draws, 0.046 with the
ring; a test in tests/test_multiple_testing.py shows that turning the ring turns the observed index into a null
one).

The ranking decides the power, and the time. taylor (|activation x gradient|) misses what matters at the layer4
sites: in branched seed 1 its top 20% of trunk.layer4.2 (all in the face copy) cost the face head -0.015 of
accuracy, the loss ranking's top 20% 0.20 (the whole face copy 0.60), and its power was 5/9 = 0.56 [0.27, 0.81]
at sites 13, 14, 16 (the default before, with 32 ranking images). The loss ranking runs the rest of the network
once per filter and ranking image, so it ranks on 8 images and a branched network's sweep takes about 6 minutes
(trunk.layer3.5's pair of 2,048 filters alone 155 s), a shared or null network's about 2.5.

What the trained nulls show: two heads reading one trunk with their own learned weights each lean on their own
filters at the late sites, task or no task. With the loss ranking every null network (halves: indices 0.19 to
0.40; identical: 0.14 to 0.34, at trunk.layer3.4 to layer4.2, intervals well above 0) beats all 21 ring pairs,
also after the correction; with taylor the halves nulls did too (indices 0.06 to 0.10 at layer4, random 20%
lesions there costing either head -0.011 to 0.008). The random-lesion null asks whether targeted lesions differ
from random ones, not whether the difference comes from the tasks, and a single network has no second head of
either task to ask it with: a single run's verdict cannot be calibrated against this null, whatever its
statistics. The simulation's `stronger` scenario (targeted lesions costlier to both tasks than random ones) shows
the same at the statistics layer (16% "yes"). The experiments' same_task control (this null, trained beside the
real network for each seed) and the experiment verdict's p_vs_same_task answer it; the per-run report says so
whenever it says "yes".

Time: each network trains in 2 to 5 minutes (branched the slowest; more when other jobs share the cores); the
simulation 2 minutes per 2,000 draws of both scenarios; `--quick` (one seed, 1 epoch, 10 images per class, two
sites, the taylor ranking, 40 draws; its heads stay at chance, so its indices are undefined: it checks the
plumbing, not the verdict) 20 s with OMP_NUM_THREADS=1. Set OMP_NUM_THREADS=1 when other jobs share the cores
(the script sets 2 when it is unset). The runs go to
.bench/verdict_calibration/<hash of the training settings>/ (git-ignored; `--out_root` names another folder), each
with its run.log, and are reused on rerun: dualtask.run skips a finished training and finished lesion sites, and a
run swept under other lesion settings (another ranking or sites) keeps its training and sweeps again. A sweep made
before the closed ring is judged with p-values made again from its files (multiple_testing.corrected_rows).

The last lines printed (each rate with its Wilson 95% interval and counts):

    false_positive_rate_sim_stronger_targeted: ...  (simulation, robustness scenario)
    false_positive_rate_trained: ...                (trained null networks, corrected verdict)
    false_positive_rate_trained_uncorrected: ...
    power_uncorrected: ...                          (branched networks, before the correction)
    experiment_false_positive: yes/no ...           (part 4 a)
    experiment_shared: yes/no ...                   (part 4 b)
    false_positive_rate: X [lo, hi] (n/N) ...       (simulation, corrected verdict: the headline)
    false_positive_rate_uncorrected: ...            (simulation, before the correction)
    power: Y [lo, hi] ...                           (branched networks' post-branch sites, corrected verdict)
    power_shared: Z [lo, hi] ...                    (the same sites of the fully shared networks)
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
from dualtask.lesion import dissociation
from dualtask.model import sites  # noqa: E402
from dualtask.report import build as report  # noqa: E402
from dualtask.stats import multiple_testing as M  # noqa: E402
from dualtask.stats import verdict as V  # noqa: E402

BENCH_DIR = ROOT / ".bench" / "verdict_calibration"
SCRIPTS = {"resnet50": "ResNet", "resnext50": "ResNeXt", "vgg16": "vgg16", "vgg19": "vgg19"}
SCENARIOS = ("exchangeable", "stronger")  # networks without dissociation; "planted" (a known positive) for tests
YES = "dissociates"  # report.verdict of a row that passes
READOUT_KINDS = {"refit": "refitted readouts", "fixed": "fixed readouts"}  # readouts.py's, by their setting's name


# ----------------------------------------------------------------------------------------------------------
# the verdict, as the report reaches it


def run_verdict(diss_rows: list, result_rows: list, fixed: list | None = None) -> dict:
    """The statistics layer's verdict (rule 2 of verdict.py: the test, corrected) of a run's dissociation.csv and
    lesion_results.csv rows: {'yes', 'yes_uncorrected', 'fraction', 'rows': the headline fraction's rows, each
    with 'verdict' ('dissociates' where the row passes the test, through the heads and, with `fixed`, the fixed
    readouts' rows too) and 'verdict_uncorrected'}. The simulation has no rankings to check the other rules
    against: `trained_verdict` applies them all."""
    decides = tuple(dict.fromkeys(r["method"] for r in diss_rows))  # every simulated ranking decides
    diss = M.corrected_rows(diss_rows, result_rows, force=False, decides=decides)
    if not diss:
        return {"yes": False, "yes_uncorrected": False, "fraction": float("nan"), "rows": []}
    f = V.headline_fraction(r["fraction"] for r in diss)
    rows = [r for r in diss if abs(float(r["fraction"]) - f) <= 1e-6]
    through = None if fixed is None else {(r["layer"], r["method"]): r for r in
                                          M.corrected_rows(fixed, [], force=False, decides=decides)
                                          if abs(float(r["fraction"]) - f) <= 1e-6}

    def passes(r, key="p_corrected"):
        ok = V.test(dict(r, p_corrected=r[key])) is V.Test.DISSOCIATES
        other = None if through is None else through.get((r["layer"], r["method"]))
        return ok and (through is None or (other is not None and
                                           V.test(dict(other, p_corrected=other[key])) is V.Test.DISSOCIATES))

    def said(r):  # a row passing through the heads but not the readouts is not YES
        return YES if passes(r) else V.Counts.HEADS_ONLY.value if V.test(r) is V.Test.DISSOCIATES else V.test(r).value

    rows = [dict(r, verdict=said(r), verdict_uncorrected=YES if passes(r, "p_index") else "no") for r in rows]
    return {"yes": any(r["verdict"] == YES for r in rows),
            "yes_uncorrected": any(r["verdict_uncorrected"] == YES for r in rows), "fraction": f, "rows": rows}


def trained_verdict(out_dir: Path, fixed: bool = True) -> dict:
    """A trained run's verdict under every rule of verdict.py, as its report reaches it (verdict.judge_run on the
    run's files): {'yes', 'answer', 'fraction', 'rows': the headline fraction's rows, each with 'verdict' (what it
    counts as: verdict.Counts' value, YES for a split by task) and 'verdict_uncorrected' (the same rules with
    p_index in place of the corrected p)}; fixed=False: through the heads alone."""
    from dualtask.core.common import read_csv, read_json

    diss, results = read_csv(out_dir / "dissociation.csv"), read_csv(out_dir / "lesion_results.csv")
    config = read_json(out_dir / "config.json")
    rankings = read_json(out_dir / "rankings.json") if (out_dir / "rankings.json").exists() else {}
    decides = V.deciding(config)
    readout = report.read_readout(out_dir, "fixed", decides) if fixed else None
    judged = V.judge_run(diss, results, rankings, config, readout and readout["dissociation"],
                         readout and readout["results"])
    loose_rows = [dict(r, p_corrected=r["p_index"]) for r in M.corrected_rows(diss, results, decides=decides)]
    loose_fixed = readout and [dict(r, p_corrected=r["p_index"]) for r in readout["dissociation"]]
    loose = V.judge_run(loose_rows, results, rankings, config, loose_fixed, readout and readout["results"])
    uncorrected = {(f.site, f.ranking): f.counts for f in loose.findings}
    rows = [dict(f.row, verdict=YES if f.counts is V.Counts.SPLIT else f.counts.value,
                 verdict_uncorrected=YES if uncorrected[f.site, f.ranking] is V.Counts.SPLIT else "no",
                 reliability=f.reliable) for f in judged.findings]
    return {"yes": judged.answer is V.Answer.YES, "answer": judged.answer.value, "fraction": judged.fraction,
            "yes_uncorrected": loose.answer is V.Answer.YES, "rows": rows}


def rate(hits: int, n: int) -> tuple:
    """(rate, Wilson 95% low, high)."""
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    low, high = report.wilson(hits / n, n)
    return hits / n, max(0.0, low), min(1.0, high)


def fmt_rate(hits: int, n: int) -> str:
    p, low, high = rate(hits, n)
    return f"{p:.4f} [{low:.4f}, {high:.4f}] ({hits}/{n})"


# ----------------------------------------------------------------------------------------------------------
# 1. the statistics layer: simulated networks without dissociation


def _logit(p):
    return np.log(p) - np.log1p(-p)


def _expit(x):
    return 1.0 / (1.0 + np.exp(-x))


def simulate_network(rng: np.random.Generator, n_sites: int = 5, n_rankings: int = 1, repeats: int = 20,
                     n_images: int = 120, fraction: float = 0.2, scenario: str = "exchangeable",
                     n_boot: int = 1000, seed: int = 0, chance_level: float = 0.1) -> tuple:
    """One simulated run without task-specialised filters: (dissociation.csv rows, lesion_results.csv rows of
    the random lesions), made by lesion_utils.dissociation_rows and lesion_utils._result_rows from per-image
    outcomes, as the lesion stage makes them from a network's.

    Per task: intact accuracy (a in [0.6, 0.95], b in [0.4, 0.9]; chance 0.1), n_images test images, each correct
    or not, each with a fragility (standard normal) shared by every site and lesion. Per site: a typical share of
    correct images a lesion costs (log-uniform in [0.02, 0.6]) and spreads of a lesion's cost, general (both tasks)
    and per task. Per lesion (each ranking's two targeted lesions and every random one, all alike; scenario
    'stronger': the targeted ones at 3x the odds, both tasks alike; 'planted', a known positive: each task's targeted
    lesion at 20x the odds for its own task only): each task's share q of its correct images lost,
    an image lost when its fragility mixed with fresh noise (correlation 0.5) falls below q's quantile; a wrong
    image turns right with probability q x chance (a damaged head guessing)."""
    if scenario not in SCENARIOS + ("planted",):
        raise ValueError(f"scenario={scenario!r}; expected one of {SCENARIOS + ('planted',)}")
    from scipy.special import ndtr

    tasks = ["a", "b"]
    chance = {t: chance_level for t in tasks}
    accuracy = {"a": rng.uniform(0.6, 0.95), "b": rng.uniform(0.4, 0.9)}
    intact, fragility = {}, {}
    for t in tasks:
        correct = rng.random(n_images) < accuracy[t]
        if correct.all() or not correct.any():
            correct[0] = not correct[0]
        intact[t] = {"correct": correct, "loss": np.zeros(n_images)}
        fragility[t] = rng.standard_normal(n_images)
    summary = {t: dissociation.per_image_summary(intact[t]) for t in tasks}
    rho = 0.5
    rankings = list(V.IMPORTANCE[:n_rankings])  # named as rankings that decide
    diss, random_rows = [], []
    for s in range(n_sites):
        n_filters = 64 * 2 ** min(s, 5)
        site = sites.Site(f"site{s}", None, n_filters, s)
        typical = _logit(math.exp(rng.uniform(math.log(0.02), math.log(0.6))))
        spread_general, spread_task = rng.uniform(0.1, 1.0), rng.uniform(0.1, 0.8)

        def lesion(boost: float = 0.0, own: str | None = None) -> dict:
            general = rng.standard_normal()
            out = {}
            for t in tasks:
                extra = boost if own is None or t == own else 0.0
                q = _expit(typical + extra + spread_general * general + spread_task * rng.standard_normal())
                u = ndtr(rho * fragility[t] + math.sqrt(1 - rho * rho) * rng.standard_normal(n_images))
                lost = intact[t]["correct"] & (u < q)
                gained = ~intact[t]["correct"] & (rng.random(n_images) < q * chance[t])
                out[t] = {"correct": (intact[t]["correct"] & ~lost) | gained, "loss": np.zeros(n_images)}
            return out

        boost = {"exchangeable": 0.0, "stronger": math.log(3.0), "planted": math.log(20.0)}[scenario]
        chosen = np.arange(int(round(fraction * n_filters)))
        conditions, results = [], []
        for method in rankings:
            for target in tasks:
                conditions.append((method, target, 0, fraction, chosen))
                results.append(lesion(boost, target if scenario == "planted" else None))
        for r in range(repeats):
            conditions.append(("random", "random", r, fraction, chosen))
            results.append(lesion())
            random_rows += dissociation.result_rows(site, "random", "random", r, fraction, len(chosen), results[-1], summary,
                                          chance, tasks)
        diss += dissociation.dissociation_rows(site, conditions, results, intact, chance, tasks, n_boot=n_boot, seed=seed)
    return diss, random_rows


def simulate(draws: int = 2000, seed: int = 0, scenario: str = "exchangeable", n_sites: int = 5,
             n_rankings: int = 1, repeats: int = 20, n_images: int = 120, n_boot: int = 1000,
             chance_level: float = 0.1) -> dict:
    """The verdict over `draws` simulated networks without dissociation: {'draws', 'yes', 'yes_uncorrected',
    'rate', 'rate_uncorrected' ((rate, low, high) each, Wilson 95%), 'min_p_corrected': each draw's smallest
    corrected p, 'seconds', and the settings}."""
    rng = np.random.default_rng([seed, 2112])
    start = time.perf_counter()
    yes = yes_uncorrected = 0
    smallest = []
    for d in range(draws):
        diss, random_rows = simulate_network(rng, n_sites, n_rankings, repeats, n_images, scenario=scenario,
                                             n_boot=n_boot, seed=d, chance_level=chance_level)
        v = run_verdict(diss, random_rows)
        yes += v["yes"]
        yes_uncorrected += v["yes_uncorrected"]
        smallest.append(min(float(r["p_corrected"]) for r in v["rows"]))
    return {"draws": draws, "yes": yes, "yes_uncorrected": yes_uncorrected, "rate": rate(yes, draws),
            "rate_uncorrected": rate(yes_uncorrected, draws), "min_p_corrected": smallest,
            "seconds": time.perf_counter() - start, "scenario": scenario, "n_sites": n_sites,
            "n_rankings": n_rankings, "repeats": repeats, "n_images": n_images, "chance": chance_level}


def describe_simulation(sim: dict) -> str:
    return (f"simulation ({sim['scenario']}): {sim['draws']} networks without dissociation, {sim['n_sites']} sites x "
            f"{sim['n_rankings']} ranking(s), {sim['repeats']} random orders, {sim['n_images']} test images per "
            f"task (chance {sim['chance']:.2f}); verdict yes in {fmt_rate(sim['yes'], sim['draws'])} corrected, "
            f"{fmt_rate(sim['yes_uncorrected'], sim['draws'])} uncorrected ({sim['seconds']:.0f} s)")


# ----------------------------------------------------------------------------------------------------------
# 2 and 3. trained networks through the project's own pipeline


def base_config(args, seed: int, out_dir: Path) -> dict:
    """A run's settings: the backbone script's hyperparameters with the benchmark's changes."""

    from dualtask.config import settings

    config = settings.hyperparameters(vars(settings.load_script(ROOT / f"{SCRIPTS[args.backbone]}.py")))
    config.update(backbone=args.backbone, image_size=args.image_size, device="cpu", batch_size=args.batch_size,
                  epochs=args.epochs, demo_per_class=args.demo_per_class, max_per_class=None,
                  max_classes=args.classes, health_check="warn", seed=seed, out_dir=str(out_dir),
                  stages=["train", "lesion"],
                  lesion_methods=[args.ranking, "random"], lesion_layers=list(args.lesion_layers),
                  random_repeats=args.repeats, rank_images=args.rank_images, ranking_reliability=True,
                  lesion_fractions=[0.0, *args.fractions], face_data="demo", object_data="demo", tasks=None,
                  branch_at=None, retrain=False, readout_images=args.readout_images,
                  **{f"{kind}_readout": kind in args.readouts for kind in READOUT_KINDS})
    return config


def null_data(args, seed: int, folder: Path) -> dict:
    """The null's two tasks as cache folders ({task: path}): one demo face set (`--classes` identities) dealt in
    two halves to face_a and face_b by `vggface2.same_task`, the experiments' same_task control (`halves`), or the
    whole set twice (`identical`)."""
    from dualtask.data import demo, taskdata
    from dualtask.data import loading as vggface2

    paths = {t: folder / f"{args.null}_seed{seed}_{t}" for t in ("face_a", "face_b")}
    if all((p / "meta.json").exists() for p in paths.values()):
        return {t: str(p) for t, p in paths.items()}
    per_class = args.demo_per_class * (2 if args.null == "halves" else 1)
    data = demo.make_demo("faces", n_classes=args.classes, per_class=per_class, image_size=args.image_size,
                              seed=seed)
    if args.null == "halves":
        parts = list(vggface2.same_task(data, seed).values())
    else:
        parts = [data, data]
    for (task, path), part in zip(paths.items(), parts):
        taskdata.TaskData(task, list(part.classes), np.ascontiguousarray(part.images), part.labels.copy(),
                          part.split.copy(), source=f"demo:faces ({args.null} null, {task})",
                          native_size=part.native_size, label_kind="").save(path, overwrite=True)
    return {t: str(p) for t, p in paths.items()}


def settings_tag(args) -> str:
    """The folder of a configuration's runs: a short hash of every setting their training depends on. The lesion
    settings are left out: a run swept under other lesion settings keeps its training and sweeps again
    (dualtask.run starts a sweep over when its settings differ from the earlier sweep's)."""
    keys = ("backbone", "image_size", "batch_size", "epochs", "demo_per_class", "classes", "branch_at", "null")
    text = json.dumps({k: getattr(args, k) for k in keys}, sort_keys=True)
    return ("quick_" if args.quick else "") + hashlib.sha1(text.encode()).hexdigest()[:10]


def train_and_sweep(config: dict, log: Path) -> float:
    """dualtask.run(config) with its output in `log`; seconds taken (a finished run is reused)."""
    from dualtask.experiment import pipeline as dualtask

    start = time.perf_counter()
    Path(config["out_dir"]).mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        print(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')}", flush=True)
        dualtask.run(config)
    return time.perf_counter() - start


def read_run(out_dir: Path) -> dict:
    """A finished run's verdict under every rule (trained_verdict: heads and fixed readouts, where run) and its
    intact accuracies, checked against report.summary's sentence; 'heads': the same rules through the heads alone;
    'refit', 'fixed': the statistics layer's test through each kind of readout alone, where run."""
    import html
    import re

    from dualtask.core.common import read_csv, read_json

    results = read_csv(out_dir / "lesion_results.csv")
    diss = read_csv(out_dir / "dissociation.csv")
    config = read_json(out_dir / "config.json")
    readouts = {kind: report.read_readout(out_dir, kind, V.deciding(config)) for kind in READOUT_KINDS}
    v = trained_verdict(out_dir)
    rankings = read_json(out_dir / "rankings.json") if (out_dir / "rankings.json").exists() else {}
    checkup = read_json(out_dir / "train_health.json") if (out_dir / "train_health.json").exists() else {}
    page = html.unescape(re.sub(r"<[^>]+>", " ", report.summary(config, {}, results, diss, rankings, checkup,
                                                                 readouts)))
    said = re.search(r"Task-specialised filters: (yes|not shown|split by image statistics)", page)
    v["report_says"] = said.group(1) if said else "?"
    if said and (said.group(1) == "yes") != v["yes"]:
        print(f"warning: {out_dir}: report.summary says '{said.group(1)}', trained_verdict says yes={v['yes']}",
              file=sys.stderr)
    v["intact"] = {t: a for t, (a, _, _) in report.intact_accuracies(results).items()}
    v["heads"] = trained_verdict(out_dir, fixed=False)  # the heads alone, as before the fixed readouts
    for kind in READOUT_KINDS:  # the same lesions through linear readouts (readouts.py) alone, when run
        if readouts[kind] is not None:
            v[kind] = run_verdict(readouts[kind]["dissociation"], readouts[kind]["results"])
    return v


def site_line(r: dict) -> str:
    rel = r.get("reliability")
    return (f"    {r['layer']:<24} {r['method']:<10} index {float(r['index']):7.3f} "
            f"[{float(r['ci_low']):7.3f}, {float(r['ci_high']):7.3f}]  p {float(r['p_index']):.3f}  "
            f"p_corr {float(r['p_corrected']):.3f}" + (f"  split-half {rel:.2f}" if rel is not None else "") +
            f"  {r['verdict']}")


def trained(args) -> dict:
    """Trains (or reuses) and sweeps every null, branched and shared network; returns their verdicts."""
    root = Path(args.out_root).resolve() if args.out_root else BENCH_DIR / settings_tag(args)
    root.mkdir(parents=True, exist_ok=True)
    (root / "settings.json").write_text(json.dumps(vars(args), indent=1, default=str))
    print(f"trained networks in {root} (each run's output in its run.log)", flush=True)
    kinds = [(k, args.branch_at if k == "branched" else None) for k in ("branched", "shared", "null")
             if k in args.kinds]
    out = {k: [] for k in ("branched", "shared", "null")}
    for seed in args.seeds:
        for kind, branch_at in kinds:
            out_dir = root / f"{kind}_seed{seed}"
            config = base_config(args, seed, out_dir)
            if kind == "null":
                config["tasks"] = null_data(args, seed, root / "data")
            else:
                config["branch_at"] = branch_at
            seconds = train_and_sweep(config, out_dir / "run.log")
            v = read_run(out_dir)
            v.update(seed=seed, kind=kind, seconds=seconds, out_dir=str(out_dir))
            out[kind].append(v)
            acc = ", ".join(f"{t} {a:.3f}" for t, a in v["intact"].items())
            print(f"{kind} seed {seed}: {seconds:.0f} s; intact test accuracy {acc} (chance {1 / args.classes:.3f}); "
                  f"verdict {'yes' if v['yes'] else 'not shown'} (report: {v['report_says']}), uncorrected "
                  f"{'yes' if v['yes_uncorrected'] else 'no'}", flush=True)
            for r in v["rows"]:
                print(site_line(r), flush=True)
            for kind in READOUT_KINDS:
                if kind in v:
                    print(f"  {READOUT_KINDS[kind]}: verdict {'yes' if v[kind]['yes'] else 'not shown'}", flush=True)
                    for r in v[kind]["rows"]:
                        print(site_line(r), flush=True)
    out["null_control"] = []
    if "null" in args.kinds:  # more null networks: the same_task control of the experiment-level checks
        for seed in args.control_seeds:
            out_dir = root / f"null_seed{seed}"
            config = dict(base_config(args, seed, out_dir), tasks=null_data(args, seed, root / "data"))
            seconds = train_and_sweep(config, out_dir / "run.log")
            out["null_control"].append(dict(read_run(out_dir), seed=seed, kind="null", seconds=seconds,
                                            out_dir=str(out_dir)))
            print(f"null seed {seed} (a control): {seconds:.0f} s", flush=True)
    return out


def experiment_verdict(real: list, control: list, repeats: int) -> dict:
    """The experiment verdict (aggregate.judge, as an experiment's report reaches it) of the `real` runs with the
    `control` runs as their same_task control, one network per seed each: {'yes', 'answer'}."""
    from dualtask.experiment import aggregate

    rng = np.random.default_rng([0, 2022])
    stats = {}
    for role, runs in (("real", real), ("same_task", control)):
        data = [{"seed": v["seed"], "folder": v["out_dir"], "data": aggregate.read_swept_run(Path(v["out_dir"]))}
                for v in runs]
        stats[role] = aggregate.role_statistics(data, rng)
    rows = aggregate.summary_rows(stats)
    rankings = aggregate.run_rankings(Path("/"), [{"role": "real", "folder": v["out_dir"]} for v in real])
    answer, _, _, passing = aggregate.verdict(rows, {"real", "same_task"}, len(real), repeats,
                                              reliability=aggregate.reliability_across(rankings, rows),
                                              rf=aggregate.receptive_across(rankings))
    return {"yes": bool(passing), "answer": answer}


def both_rows(runs: list, kind: str) -> list:
    """Runs whose rows are 'dissociates' only where the row dissociates through the heads and through the
    readouts of `kind` (same site, ranking and fraction)."""
    out = []
    for v in runs:
        other = {(r["layer"], r["method"]): r["verdict"] for r in v.get(kind, {}).get("rows", [])}
        out.append({"rows": [dict(r, verdict=YES if r["verdict"] == YES and other.get((r["layer"], r["method"])) ==
                                  YES else "no") for r in v.get("heads", v)["rows"]]})
    return out


def both_yes(v: dict, kind: str) -> bool:
    return any(r["verdict"] == YES for r in both_rows([v], kind)[0]["rows"])


TESTED = {YES, V.Counts.IMAGE_STATISTICS.value, V.Counts.UNMEASURED.value, V.Counts.NOT_REPRODUCIBLE.value,
          V.Counts.ONE_FRACTION.value}  # trained_verdict's rows that pass the test itself (rule 2, and 1)


def site_power(runs: list, depths: set, key: str = "verdict", passing=(YES,)) -> tuple:
    """(dissociating sites, sites) over runs at the given depths: a site dissociates when any ranking's row there
    does (key: 'verdict', or 'verdict_uncorrected' for the verdict before the correction)."""
    hits = n = 0
    for v in runs:
        by_site = {}
        for r in v["rows"]:
            if int(r["depth"]) in depths:
                by_site[r["layer"]] = by_site.get(r["layer"], False) or r[key] in passing
        hits += sum(by_site.values())
        n += len(by_site)
    return hits, n


# ----------------------------------------------------------------------------------------------------------


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    literal = ast.literal_eval
    parser.add_argument("--quick", action="store_true", help="smoke test of every part (under 2 minutes)")
    parser.add_argument("--seeds", type=literal, default=None, help="training seeds, e.g. \"[0, 1, 2]\"")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--draws", type=int, default=None, help="simulated networks per scenario (2000)")
    parser.add_argument("--sim_only", action="store_true", help="the statistics layer alone")
    parser.add_argument("--sim_sites", type=int, default=None, help="sites per simulated network (as lesioned)")
    parser.add_argument("--sim_rankings", type=int, default=1, help="targeted rankings per simulated network")
    parser.add_argument("--sim_images", type=int, default=None, help="test images per task (as trained)")
    parser.add_argument("--backbone", default="resnet50", choices=sorted(SCRIPTS))
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--demo_per_class", type=int, default=None, help="demo images per class and task")
    parser.add_argument("--classes", type=int, default=None, help="classes per task (max_classes)")
    parser.add_argument("--kinds", type=literal, default=["branched", "shared", "null"],
                        help="which trained networks: branched, shared, null")
    parser.add_argument("--branch_at", type=int, default=12, help="site depth of the branch point")
    parser.add_argument("--lesion_layers", type=literal, default=None)
    parser.add_argument("--ranking", default=None, choices=["taylor", "loss", "activation"],
                        help="the targeted ranking (default loss, which has the power; taylor, --quick's, is "
                             "faster: see the module's docstring)")
    parser.add_argument("--repeats", type=int, default=None, help="random orders (20: corrected p can reach 1/22)")
    parser.add_argument("--rank_images", type=int, default=None)
    parser.add_argument("--fractions", type=literal, default=[0.1, 0.2, 0.3],
                        help="lesion fractions swept (the verdict reads 20%, or the nearest, and asks a split to hold "
                             "at its neighbours)")
    parser.add_argument("--null", default="halves", choices=["halves", "identical"])
    parser.add_argument("--control_seeds", type=literal, default=None,
                        help="seeds of the further null networks that serve as the same_task control of the "
                             "experiment-level checks (default [3, 4, 5]; [] leaves them out)")
    parser.add_argument("--readouts", type=literal, default=list(READOUT_KINDS), help="also score the lesions by "
                        "these linear readouts (refit_readout, fixed_readout), e.g. \"['fixed']\"; [] for none")
    parser.add_argument("--readout_images", type=int, default=500, help="training images per task of each readout")
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulation")
    parser.add_argument("--record", action="store_true", help="write benchmarks/results/verdict_calibration.json "
                        "even with --out_root (a full run with the default folders always writes it)")
    parser.add_argument("--out_root", default=None, help="folder of the trained runs (default: "
                        ".bench/verdict_calibration/<hash of the training settings>)")
    args = parser.parse_args(argv)
    quick = dict(seeds=[0], epochs=1, draws=40, demo_per_class=10, classes=5, lesion_layers=[12, 16], repeats=20,
                 rank_images=4, ranking="taylor", control_seeds=[])
    full = dict(seeds=[0, 1, 2], epochs=4, draws=2000, demo_per_class=200, classes=5,
                lesion_layers=[0, 12, 13, 15, 16], repeats=20, rank_images=8, ranking="loss", control_seeds=[3, 4, 5])
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.sim_sites is None:
        args.sim_sites = len(args.lesion_layers)
    if args.sim_images is None:  # a demo task's test images: 20% of each of its classes
        args.sim_images = args.classes * round(0.2 * args.demo_per_class)
    return args


def main(argv=None) -> int:
    args = parse(argv)
    start = time.perf_counter()
    print(f"verdict calibration: {'quick' if args.quick else 'full'} run; settings {vars(args)}", flush=True)
    sims = {}
    for scenario in SCENARIOS:  # the robustness scenario with half the draws
        draws = args.draws if scenario == "exchangeable" else max(1, args.draws // 2)
        sims[scenario] = simulate(draws, args.seed, scenario, args.sim_sites, args.sim_rankings, args.repeats,
                                  args.sim_images, chance_level=1.0 / args.classes)
        print(describe_simulation(sims[scenario]), flush=True)
    runs = None if args.sim_only else trained(args)

    print(f"\nwall time {time.perf_counter() - start:.0f} s", flush=True)
    sim = sims["exchangeable"]
    print("false_positive_rate_sim_stronger_targeted: " + fmt_rate(sims["stronger"]["yes"], sims["stronger"]["draws"])
          + " (simulation, targeted lesions 3x as costly to both tasks; uncorrected "
          + fmt_rate(sims["stronger"]["yes_uncorrected"], sims["stronger"]["draws"]) + ")")
    if runs is not None:
        nulls = runs["null"]
        yes = sum(v["yes"] for v in nulls)
        yes_u = sum(v["yes_uncorrected"] for v in nulls)
        print(f"false_positive_rate_trained: {fmt_rate(yes, len(nulls))} (trained null networks: {args.null}, "
              f"{args.backbone}, one verdict per network)")
        print(f"false_positive_rate_trained_uncorrected: {fmt_rate(yes_u, len(nulls))}")
        heads = [v["heads"] for v in nulls if "fixed" in v]
        if heads:  # the verdict above asked for the fixed readouts too: the heads alone, as before them
            print(f"false_positive_rate_trained_heads_only: {fmt_rate(sum(v['yes'] for v in heads), len(heads))} "
                  f"(the same networks, the heads' lesions alone)")
        post = {d for d in args.lesion_layers if isinstance(d, int) and d > args.branch_at}
        hits, n = site_power(runs["branched"], post)
        hits_s, n_s = site_power(runs["shared"], post)
        hits_u, _ = site_power(runs["branched"], post, "verdict_uncorrected")
        print(f"power_uncorrected: {fmt_rate(hits_u, n)} (branched networks, before the correction)")
        print(f"power_test_only: {fmt_rate(*site_power(runs['branched'], post, passing=TESTED))} (branched networks: "
              f"the test alone, without the reproducibility, neighbouring-fraction and early-site rules)")
        print(f"false_positive_rate_trained_test_only: "
              f"{fmt_rate(sum(any(r['verdict'] in TESTED for r in v['rows']) for v in nulls), len(nulls))} "
              f"(the null networks, the test alone)")
        heads = [v["heads"] for v in runs["branched"] if "fixed" in v]
        if heads:
            print(f"power_heads_only: {fmt_rate(*site_power(heads, post))} (branched networks, the heads' lesions "
                  f"alone)")
        for readout, what in READOUT_KINDS.items():  # the same lesions through linear readouts (readouts.py)
            read = [v for v in nulls if readout in v]
            if not read:
                continue
            print(f"false_positive_rate_trained_{readout}: {fmt_rate(sum(v[readout]['yes'] for v in read), len(read))}"
                  f" (the same null networks, lesions scored by {what})")
            print(f"false_positive_rate_trained_heads_and_{readout}: "
                  f"{fmt_rate(sum(both_yes(v, readout) for v in read), len(read))} (a site dissociating both ways)")
            for kind in ("branched", "shared"):
                runs_read = [v[readout] for v in runs[kind] if readout in v]
                if runs_read:
                    print(f"power_{kind}_{readout}: {fmt_rate(*site_power(runs_read, post))} (post-branch sites, "
                          f"{what}); both ways: {fmt_rate(*site_power(both_rows(runs[kind], readout), post))}")
        if runs["null_control"] and nulls:
            v = experiment_verdict(nulls, runs["null_control"], args.repeats)
            print(f"experiment_false_positive: {'yes' if v['yes'] else 'no'} (null networks of seeds {args.seeds} "
                  f"as the real tasks, those of seeds {args.control_seeds} as their same_task control): "
                  f"{v['answer']}")
        if runs["shared"] and nulls:
            v = experiment_verdict(runs["shared"], nulls, args.repeats)
            print(f"experiment_shared: {'yes' if v['yes'] else 'no'} (the shared face/object networks against the "
                  f"null networks of the same seeds as their same_task control): {v['answer']}")
    print(f"false_positive_rate: {fmt_rate(sim['yes'], sim['draws'])} (simulation, corrected verdict, "
          f"{sim['n_sites']} sites x {sim['n_rankings']} ranking(s), R={sim['repeats']})")
    print(f"false_positive_rate_uncorrected: {fmt_rate(sim['yes_uncorrected'], sim['draws'])} (simulation, "
          f"before the correction)")
    if runs is not None:
        print(f"power: {fmt_rate(hits, n)} (branched at depth {args.branch_at}, post-branch sites "
              f"{sorted(post)} x {len(args.seeds)} seed(s), corrected verdict)")
        print(f"power_shared: {fmt_rate(hits_s, n_s)} (the same sites of the fully shared networks)")
        if not args.quick and args.out_root is None or args.record:
            record(args, sim, nulls, (hits, n), time.perf_counter() - start)
    return 0


def record(args, sim: dict, nulls: list, power: tuple, seconds: float) -> Path:
    """benchmarks/results/verdict_calibration.json: what the report's calibration note quotes
    (first_screen.calibration_note), with the date, machine and command that measured it."""
    import platform

    from dualtask.core.common import write_text

    def entry(hits, n):
        p, low, high = rate(hits, n)
        return {"hits": hits, "n": n, "rate": p, "low": low, "high": high}

    out = {"date": time.strftime("%Y-%m-%d"), "command": "python " + " ".join(sys.argv),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores", "seconds": round(seconds),
           "networks": f"{args.backbone} at {args.image_size} px, {len(args.seeds)} seeds per kind, branched at depth "
                       f"{args.branch_at}, the {args.ranking} ranking",
           "false_positive_rate_trained": entry(sum(v["yes"] for v in nulls), len(nulls)),
           "power": entry(*power), "false_positive_rate": entry(sim["yes"], sim["draws"])}
    path = Path(__file__).resolve().parent / "results" / "verdict_calibration.json"
    write_text(path, json.dumps(out, indent=1))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    sys.exit(main())
