"""Parts 2 to 4 of benchmarks/verdict_calibration.py: trained networks (null, branched, shared) through the
project's own pipeline, each run's verdict under every rule of the report, the experiment verdict of a set of them,
and the power over post-branch sites. verdict_calibration.py's docstring describes the networks and what they
showed."""
from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
from verdict_simulation import YES, fmt_rate, run_verdict

from dualtask.report import build as report
from dualtask.stats import multiple_testing as M
from dualtask.stats import verdict as V

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / ".bench" / "verdict_calibration"
SCRIPTS = {"resnet50": "ResNet", "resnext50": "ResNeXt", "vgg16": "vgg16", "vgg19": "vgg19"}
READOUT_KINDS = {"refit": "refitted readouts", "fixed": "fixed readouts"}  # readouts.py's, by their setting's name


# ----------------------------------------------------------------------------------------------------------
# the verdict of a trained run, as its report reaches it


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
            f"p_corr {float(r['p_corrected']):.3f}" + (f"  split-half {rel.text()}" if rel is not None else "") +
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
# the calibration pooled over configurations: every finished run under several folders


def group_name(config: dict, kind: str) -> tuple:
    """A run's configuration as the pooled table's row names it: (backbone, px, epochs, kind, branch depth)."""
    backbone = config["backbone"] + ("" if config.get("batch_norm", True) else " (plain)")
    branch = config.get("branch_at") if kind == "branched" else None
    return backbone, config["image_size"], config["epochs"], kind, branch


def pooled_runs(roots: list) -> dict:
    """{group_name: [read_run's verdict, with 'post' (its post-branch depths) and 'full_rule' (judged through the
    heads and the fixed readouts, as the report judges)]} of every finished null, branched and shared run (a
    folder <kind>_seed<N> holding dissociation.csv) under the roots."""
    import re

    from dualtask.core.common import read_json

    groups = {}
    for root in roots:
        named = [(m.group(1), int(m.group(2)), p) for p in Path(root).iterdir()
                 if (m := re.fullmatch(r"(null|branched|shared)_seed(\d+)", p.name)) and p.is_dir()]
        for kind, seed, out_dir in sorted(named):
            if not (out_dir / "dissociation.csv").exists():
                continue
            config = read_json(out_dir / "config.json")
            v = read_run(out_dir)
            branch = config.get("branch_at")
            post = {d for d in config["lesion_layers"] if isinstance(d, int) and branch is not None and d > branch}
            v.update(seed=seed, kind=kind, out_dir=str(out_dir), post=post,
                     full_rule="fixed" in v)
            groups.setdefault(group_name(config, kind), []).append(v)
    return groups


def print_pooled(groups: dict) -> tuple:
    """The table of every configuration (false positives of the nulls, power of the branched networks'
    post-branch sites), and the pooled lines last; ((false positives, nulls), (hits, sites)) under the full rule."""
    print(f"{'backbone':<18} {'px':>3} {'epochs':>6} {'kind':<9} {'branch':>6} {'networks':>8}  rate [95% interval]")
    fp, power = [0, 0], [0, 0]
    for (backbone, px, epochs, kind, branch), runs in sorted(groups.items(), key=lambda kv: str(kv[0])):
        full = [v for v in runs if v["full_rule"]]
        note = "" if len(full) == len(runs) else (f"; {len(runs) - len(full)} without a finished sweep through "
                                                   f"the fixed readouts, left out")
        if kind == "null":
            yes = sum(v["yes"] for v in full)
            fp[0] += yes
            fp[1] += len(full)
            what = f"false positives {fmt_rate(yes, len(full))}"
        elif kind == "branched":
            hits = [site_power([v], v["post"]) for v in full]
            h, n = sum(a for a, _ in hits), sum(b for _, b in hits)
            power[0] += h
            power[1] += n
            what = (f"power {fmt_rate(h, n)} over post-branch sites {sorted(set().union(*[v['post'] for v in full]))}"
                    f"; networks saying yes {sum(v['yes'] for v in full)}/{len(full)}")
        else:
            what = f"verdict yes {sum(v['yes'] for v in full)}/{len(full)} (the real question, not a rate of errors)"
        print(f"{backbone:<18} {px:>3} {epochs:>6} {kind:<9} {'-' if branch is None else branch:>6} {len(full):>8}  "
              f"{what}{note}")
    return tuple(fp), tuple(power)
