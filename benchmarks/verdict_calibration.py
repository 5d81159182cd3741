"""How often the report's verdict "Task-specialised filters: yes" is right: its false-positive rate and its power.

    python benchmarks/verdict_calibration.py            # the default configuration (see "Time" below)
    python benchmarks/verdict_calibration.py --quick    # a smoke test of every part
    python benchmarks/verdict_calibration.py --seeds="[0, 1, 2, 3, 4]" --epochs=6 --draws=5000
    python benchmarks/verdict_calibration.py --sim_only # the statistics layer alone (about 2 minutes)
    python benchmarks/verdict_calibration.py --pool="['runs_a', 'runs_b']"  # every finished network, pooled

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
random lesions, 1 beyond the control, none both). Before the closed ring (random order r against order r + 1
only) the simulated rate was 0.052
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
import json
import os
import sys
import time
from pathlib import Path

# before numpy and torch start their thread pools (the modules below import them)
os.environ.setdefault("OMP_NUM_THREADS", "2")

import verdict_trained as networks  # noqa: E402
from verdict_simulation import SCENARIOS, describe_simulation, fmt_rate, rate, simulate  # noqa: E402

# ----------------------------------------------------------------------------------------------------------
# the command line


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    literal = ast.literal_eval
    parser.add_argument("--quick", action="store_true", help="smoke test of every part (under 2 minutes)")
    parser.add_argument("--seeds", type=literal, default=None, help="training seeds, e.g. \"[0, 1, 2]\"")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--draws", type=int, default=None, help="simulated networks per scenario (2000)")
    parser.add_argument("--sim_only", action="store_true", help="the statistics layer alone")
    parser.add_argument("--pool", type=literal, default=None,
                        help="folders of earlier runs, e.g. \"['/data/cal_resnet50', '/data/cal_vgg16']\": judge every "
                             "finished network in them (nothing trained) and print the rates per configuration "
                             "(backbone, size, epochs, kind, branch depth), then pooled")
    parser.add_argument("--sim_sites", type=int, default=None, help="sites per simulated network (as lesioned)")
    parser.add_argument("--sim_rankings", type=int, default=1, help="targeted rankings per simulated network")
    parser.add_argument("--sim_images", type=int, default=None, help="test images per task (as trained)")
    parser.add_argument("--backbone", default="resnet50", choices=sorted(networks.SCRIPTS))
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
                        help="lesion fractions swept (the verdict reads 20%%, or the nearest, and asks a split to hold "
                             "at its neighbours)")
    parser.add_argument("--null", default="halves", choices=["halves", "identical"])
    parser.add_argument("--control_seeds", type=literal, default=None,
                        help="seeds of the further null networks that serve as the same_task control of the "
                             "experiment-level checks (default [3, 4, 5]; [] leaves them out)")
    parser.add_argument("--readouts", type=literal, default=list(networks.READOUT_KINDS),
                        help="also score the lesions by these linear readouts (refit_readout, fixed_readout), e.g. "
                             "\"['fixed']\"; [] for none")
    parser.add_argument("--readout_images", type=int, default=500, help="training images per task of each readout")
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulation")
    parser.add_argument("--record", action="store_true", help="write dualtask/report/verdict_calibration.json "
                        "even with --out_root (a full run with the default folders always writes it); with --pool, "
                        "the pooled rates (the simulated rate kept from before)")
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


def simulations(args) -> dict:
    """{scenario: simulate's result}, each described as it finishes; the robustness scenario with half the draws."""
    sims = {}
    for scenario in SCENARIOS:
        draws = args.draws if scenario == "exchangeable" else max(1, args.draws // 2)
        sims[scenario] = simulate(draws, args.seed, scenario, args.sim_sites, args.sim_rankings, args.repeats,
                                  args.sim_images, chance_level=1.0 / args.classes)
        print(describe_simulation(sims[scenario]), flush=True)
    return sims


def print_readout_rates(runs: dict, post: set) -> None:
    """The same lesions through linear readouts (readouts.py): the null networks' rates and the power, by each kind
    of readout alone and both ways (heads and readouts)."""
    nulls = runs["null"]
    for readout, what in networks.READOUT_KINDS.items():
        read = [v for v in nulls if readout in v]
        if not read:
            continue
        print(f"false_positive_rate_trained_{readout}: {fmt_rate(sum(v[readout]['yes'] for v in read), len(read))}"
              f" (the same null networks, lesions scored by {what})")
        print(f"false_positive_rate_trained_heads_and_{readout}: "
              f"{fmt_rate(sum(networks.both_yes(v, readout) for v in read), len(read))} (a site dissociating both "
              f"ways)")
        for kind in ("branched", "shared"):
            runs_read = [v[readout] for v in runs[kind] if readout in v]
            if runs_read:
                print(f"power_{kind}_{readout}: {fmt_rate(*networks.site_power(runs_read, post))} (post-branch "
                      f"sites, {what}); both ways: "
                      f"{fmt_rate(*networks.site_power(networks.both_rows(runs[kind], readout), post))}")


def print_experiment_checks(args, runs: dict) -> None:
    """Part 4: the experiment verdict of the null networks against null controls, and of the shared face/object
    networks against the null networks as their same_task control."""
    nulls = runs["null"]
    if runs["null_control"] and nulls:
        v = networks.experiment_verdict(nulls, runs["null_control"], args.repeats)
        print(f"experiment_false_positive: {'yes' if v['yes'] else 'no'} (null networks of seeds {args.seeds} "
              f"as the real tasks, those of seeds {args.control_seeds} as their same_task control): "
              f"{v['answer']}")
    if runs["shared"] and nulls:
        v = networks.experiment_verdict(runs["shared"], nulls, args.repeats)
        print(f"experiment_shared: {'yes' if v['yes'] else 'no'} (the shared face/object networks against the "
              f"null networks of the same seeds as their same_task control): {v['answer']}")


def print_trained_rates(args, runs: dict) -> tuple:
    """The trained networks' lines before the simulation's headline; (post-branch depths, (power hits, sites),
    (power_shared hits, sites)) for the lines after it."""
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
    power = networks.site_power(runs["branched"], post)
    power_shared = networks.site_power(runs["shared"], post)
    hits_u, _ = networks.site_power(runs["branched"], post, "verdict_uncorrected")
    print(f"power_uncorrected: {fmt_rate(hits_u, power[1])} (branched networks, before the correction)")
    print(f"power_test_only: {fmt_rate(*networks.site_power(runs['branched'], post, passing=networks.TESTED))} "
          f"(branched networks: the test alone, without the reproducibility, neighbouring-fraction and early-site "
          f"rules)")
    print(f"false_positive_rate_trained_test_only: "
          f"{fmt_rate(sum(any(r['verdict'] in networks.TESTED for r in v['rows']) for v in nulls), len(nulls))} "
          f"(the null networks, the test alone)")
    heads = [v["heads"] for v in runs["branched"] if "fixed" in v]
    if heads:
        print(f"power_heads_only: {fmt_rate(*networks.site_power(heads, post))} (branched networks, the heads' "
              f"lesions alone)")
    print_readout_rates(runs, post)
    print_experiment_checks(args, runs)
    return post, power, power_shared


def main_pooled(roots: list, record_it: bool = False) -> int:
    """--pool: the table of every configuration's finished networks, the pooled rates last; record_it (--record)
    writes them to dualtask/report/verdict_calibration.json, the simulated rate kept from before."""
    missing = [r for r in roots if not Path(r).is_dir()]
    if missing:
        print(f"error: --pool: no such folder {missing[0]} (expected folders of verdict_calibration runs)",
              file=sys.stderr)
        return 2
    start = time.perf_counter()
    groups = networks.pooled_runs(roots)
    print(f"verdict calibration pooled over {sum(map(len, groups.values()))} finished networks in {', '.join(roots)} "
          f"({time.perf_counter() - start:.0f} s); the verdict as the report reaches it (heads and fixed readouts)")
    (yes, nulls), (hits, sites) = networks.print_pooled(groups)
    print(f"false_positive_rate_trained: {fmt_rate(yes, nulls)} (every trained null network above, one verdict each)")
    print(f"power: {fmt_rate(hits, sites)} (every branched network's post-branch sites above)")
    if record_it:
        configs = sorted({(b, px) for b, px, _, _, _ in groups})
        depths = sorted({d for (_, _, _, kind, d) in groups if kind == "branched"})
        text = (f"{nulls} null and {sum(len(v) for k, v in groups.items() if k[3] == 'branched')} branched networks, "
                f"{', '.join(f'{b} at {px} px' for b, px in configs)}, branched at depths "
                f"{', '.join(map(str, depths))}")
        record(None, (yes, nulls), (hits, sites), time.perf_counter() - start, text)
    return 0


def main(argv=None) -> int:
    args = parse(argv)
    if args.pool is not None:
        return main_pooled([str(r) for r in args.pool], args.record)
    start = time.perf_counter()
    print(f"verdict calibration: {'quick' if args.quick else 'full'} run; settings {vars(args)}", flush=True)
    sims = simulations(args)
    runs = None if args.sim_only else networks.trained(args)

    print(f"\nwall time {time.perf_counter() - start:.0f} s", flush=True)
    sim = sims["exchangeable"]
    print("false_positive_rate_sim_stronger_targeted: " + fmt_rate(sims["stronger"]["yes"], sims["stronger"]["draws"])
          + " (simulation, targeted lesions 3x as costly to both tasks; uncorrected "
          + fmt_rate(sims["stronger"]["yes_uncorrected"], sims["stronger"]["draws"]) + ")")
    if runs is not None:
        post, (hits, n), (hits_s, n_s) = print_trained_rates(args, runs)
    print(f"false_positive_rate: {fmt_rate(sim['yes'], sim['draws'])} (simulation, corrected verdict, "
          f"{sim['n_sites']} sites x {sim['n_rankings']} ranking(s), R={sim['repeats']})")
    print(f"false_positive_rate_uncorrected: {fmt_rate(sim['yes_uncorrected'], sim['draws'])} (simulation, "
          f"before the correction)")
    if runs is not None:
        print(f"power: {fmt_rate(hits, n)} (branched at depth {args.branch_at}, post-branch sites "
              f"{sorted(post)} x {len(args.seeds)} seed(s), corrected verdict)")
        print(f"power_shared: {fmt_rate(hits_s, n_s)} (the same sites of the fully shared networks)")
        if not args.quick and args.out_root is None or args.record:
            text = (f"{args.backbone} at {args.image_size} px, {len(args.seeds)} seeds per kind, branched at depth "
                    f"{args.branch_at}, the {args.ranking} ranking")
            record(sim, (sum(v["yes"] for v in runs["null"]), len(runs["null"])), (hits, n),
                   time.perf_counter() - start, text)
    return 0


RECORD = Path(__file__).resolve().parents[1] / "dualtask" / "report" / "verdict_calibration.json"


def entry(hits: int, n: int) -> dict:
    p, low, high = rate(hits, n)
    return {"hits": hits, "n": n, "rate": p, "low": low, "high": high}


def record(sim: dict | None, nulls: tuple, power: tuple, seconds: float, networks_text: str) -> Path:
    """dualtask/report/verdict_calibration.json (package data): what the report's calibration note quotes
    (first_screen.calibration_note), with the date, machine and command that measured it. nulls: (false
    positives, null networks); sim None (--pool, which simulates nothing) keeps the simulated rate recorded
    before."""
    import platform

    from dualtask.core.common import write_text

    out = {"date": time.strftime("%Y-%m-%d"), "command": "python " + " ".join(sys.argv),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores", "seconds": round(seconds),
           "networks": networks_text, "false_positive_rate_trained": entry(*nulls), "power": entry(*power)}
    if sim is not None:
        out["false_positive_rate"] = entry(sim["yes"], sim["draws"])
    elif RECORD.exists():
        try:
            before = json.loads(RECORD.read_text())
            out["false_positive_rate"] = before["false_positive_rate"]
        except (ValueError, KeyError):
            pass
    write_text(RECORD, json.dumps(out, indent=1))
    print(f"wrote {RECORD}")
    return RECORD


if __name__ == "__main__":
    sys.exit(main())
