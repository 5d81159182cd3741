"""An experiment: several ordinary runs (training seeds, control networks), then their aggregate.

    python ResNet.py --seeds="[0, 1]" --controls="['pseudo_task', 'resolution_matched']"

The backbone scripts call `main` here. Without `seeds` and `controls` it is one run into out_dir, as before.
With them, every run is an ordinary run of dualtask.py in its own folder under out_dir (its own config.json,
checkpoint, lesion sweep and report), listed with its role and seed in out_dir/experiment.json; when all are
finished, aggregate.py writes out_dir/summary.csv, accuracy.csv and report.html. A rerun skips finished runs.
Runs go one after another in this process (launcher="local"), or as SLURM jobs through submitit
(launcher="slurm"; "submitit_local" runs the same jobs as local processes, to try the path on one machine).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from dualtask.config import settings
from dualtask.core.common import StageFailed, UsageError, format_seconds, read_json, report_bugs, write_text
from dualtask.data import loading as vggface2
from dualtask.data.taskdata import DataError
from dualtask.experiment import aggregate, branching, preflight
from dualtask.experiment import pipeline as dualtask
from dualtask.stats import multiple_testing

EXPERIMENT_FILE = "experiment.json"
DONE_FILE = "run_done.json"  # written into a run's folder when the run finished every stage it was asked for
CONTROLS = tuple(r for r in settings.ROLES if r != "real")
LAUNCHERS = ("local", "slurm", "submitit_local")
# settings of the experiment, not of its runs
EXPERIMENT_KEYS = ("seeds", "controls", "launcher", "slurm", "branch_points")
# settings that do not change what a finished run holds: a rerun that changes only these skips it
NOT_RESULTS = ("device", "compile", "retrain", "out_dir", "health_check")


def is_experiment(config: dict) -> bool:
    return config.get("seeds") is not None or bool(config.get("controls")) or config.get("branch_points") is not None


def check_experiment(config: dict, launching: bool = False) -> None:
    """The experiment's own settings (seeds, controls, branch_points, launcher, slurm), checked before anything is
    written; `launching`: the runs are about to be launched (an experiment, not one run), so the launcher must be
    able to start them here (SLURM's commands for launcher='slurm')."""
    seeds = config.get("seeds")
    if seeds is not None and not (isinstance(seeds, list) and seeds and len(set(seeds)) == len(seeds) and all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        raise UsageError(f"seeds={seeds!r}; expected None or a list of distinct integers of at least 0, e.g. [0, 1, 2]")
    controls = config.get("controls", [])
    if not (isinstance(controls, list) and all(c in CONTROLS for c in controls)):
        raise UsageError(f"controls={controls!r}; expected a list of names from {list(CONTROLS)}")
    twice = next((c for k, c in enumerate(controls) if c in controls[:k]), None)
    if twice is not None:
        raise UsageError(f"controls={controls!r}: {twice!r} is named twice; expected each control once, from "
                         f"{list(CONTROLS)}")
    if "pseudo_task" in controls:
        shared = [g for g in vggface2.source_groups(settings.task_specs(config)) if len(g) > 1]
        if shared:
            raise UsageError(f"controls={controls!r}: the pseudo_task control splits the tasks' classes into two tasks "
                             f"over their images, and tasks {' and '.join('+'.join(g) for g in shared)} read the same "
                             f"images, so an image would carry two labels in one pseudo-task; expected controls "
                             f"without pseudo_task, or tasks that read their own images")
    points = config.get("branch_points")
    if points is not None and not (isinstance(points, list) and points and len(set(map(repr, points))) == len(points)
                                   and all(p is None or settings.SETTINGS["branch_at"][0](p) for p in points)):
        raise UsageError(f"branch_points={points!r}; expected None or a list of distinct branch points (None = fully "
                         f"shared, a site depth or module path), e.g. [None, 4, 8, 12]")
    if points is not None and any(p is not None for p in points) and config.get("head", "split") != "split":
        raise UsageError(f"branch_points={points!r} with head={config.get('head')!r}: a branched network gives each "
                         f"task its own copy of the trunk after the branch point, and a joint output layer would read "
                         f"every copy; expected head='split', or branch_points=None")
    if points is not None:  # every branch point names a site of this backbone, each once, before anything is trained
        seen = {}
        for p in points:
            site = None if p is None else preflight.branch_point(config["backbone"], config.get("batch_norm", True), p,
                                                                "branch_points")
            if site in seen:
                raise UsageError(f"branch_points={points!r}: {seen[site]!r} and {p!r} both branch after "
                                 f"{site or 'no site'}; expected each branch point once")
            seen[site] = p
    launcher = config.get("launcher", "local")
    if launcher not in LAUNCHERS:
        raise UsageError(f"launcher={launcher!r}; expected one of {', '.join(LAUNCHERS)}")
    check_slurm(config.get("slurm", {}))
    if launching and launcher == "slurm":
        missing = [c for c in ("sbatch", "srun", "sinfo") if shutil.which(c) is None]
        if missing:
            raise UsageError(f"launcher='slurm', but this machine has no {' and no '.join(missing)} (SLURM's "
                             f"commands): expected a machine of a SLURM cluster, or launcher='local' or "
                             f"'submitit_local' to run the jobs here")
        said = _cluster_silence()
        if said:
            raise UsageError(f"launcher='slurm', but SLURM's commands reach no cluster here (sinfo: {said}): "
                             f"expected a machine whose SLURM commands reach a cluster (sinfo lists its partitions), "
                             f"or launcher='local' or 'submitit_local' to run the jobs here")
    if launching and launcher != "local" and importlib.util.find_spec("submitit") is None:
        raise UsageError(f"launcher={launcher!r} needs the submitit package, which is not installed: pip install -r "
                         f"requirements.txt, or launcher='local'")


def _cluster_silence() -> str | None:
    """Why SLURM's commands reach no cluster from here (sinfo's last line), or None when sinfo answers."""
    try:
        p = subprocess.run(["sinfo", "--noheader", "--summarize"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        return f"{type(e).__name__}: {e}"
    if p.returncode == 0:
        return None
    lines = [line.strip() for line in (p.stderr or p.stdout).splitlines() if line.strip()]
    return lines[-1] if lines else f"exit status {p.returncode}"


SLURM_FORM = "a dict of submitit parameters, e.g. {'slurm_partition': 'gpu', 'gpus_per_node': 1, 'timeout_min': 1440}"
# submitit's parameters shared by every cluster, and their types (submitit.AutoExecutor)
GENERIC_PARAMETERS = {"name": str, "timeout_min": int, "mem_gb": (int, float), "nodes": int, "cpus_per_task": int,
                      "gpus_per_node": int, "tasks_per_node": int, "stderr_to_stdout": bool}


def check_slurm(slurm) -> None:
    """The `slurm` setting under every launcher: a dict of submitit's shared parameters (of their types) and of
    SLURM's own, prefixed slurm_ (submitit.SlurmExecutor's); a misspelled key is refused, not dropped."""
    if not (isinstance(slurm, dict) and all(isinstance(k, str) for k in slurm)):
        raise UsageError(f"slurm={slurm!r}; expected {SLURM_FORM}")
    try:
        import submitit

        own = set(submitit.SlurmExecutor._valid_parameters())  # what AutoExecutor checks slurm_ keys against
    except ImportError:  # checked when a launcher that needs it is asked for
        own = None
    for key, value in slurm.items():
        if key in GENERIC_PARAMETERS:
            kind = GENERIC_PARAMETERS[key]
            if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
                names = " or ".join(t.__name__ for t in (kind if isinstance(kind, tuple) else (kind,)))
                raise UsageError(f"slurm: {key}={value!r}; expected a value of type {names} ({SLURM_FORM})")
        elif not key.startswith("slurm_") or (own is not None and key[len("slurm_"):] not in own
                                                 and key[len("slurm_"):] not in GENERIC_PARAMETERS):
            raise UsageError(f"slurm: unknown parameter {key!r}; expected submitit's shared parameters "
                             f"({', '.join(GENERIC_PARAMETERS)}) or SLURM's own prefixed slurm_ (e.g. slurm_partition)"
                             f" in {SLURM_FORM}")


def plan(config: dict) -> list:
    """The experiment's runs: [{'role', 'seed', 'task' (single_task only), 'folder', 'config'}]. Folders under
    out_dir: seed_<N>/ (the real tasks), branch_<point>/seed_<N>/ (the real tasks at another branch point, marked
    'branch_point'), pseudo_task/seed_<N>/, resolution_matched/seed_<N>/ and
    single_task_<task>/seed_<N>/ (trained only: a lesion sweep needs two tasks)."""
    out = Path(config["out_dir"])
    seeds = config["seeds"] if config.get("seeds") is not None else [config["seed"]]
    base = {k: v for k, v in config.items() if k not in EXPERIMENT_KEYS}
    base["random_repeats"] = multiple_testing.random_repeats(base)  # every run the same number, as its files say
    runs = []

    def add(role, seed, folder, **extra):
        run_config = dict(base, seed=seed, role=role, out_dir=str(out / folder), **extra)
        runs.append({"role": role, "seed": seed, "task": extra.get("single_task"), "folder": folder,
                     "config": run_config})

    for seed in seeds:
        add("real", seed, f"seed_{seed}")
    # the branching-point experiment (branching.py): the real tasks once more at every other branch point
    for point in [p for p in config.get("branch_points") or [] if p != config.get("branch_at")]:
        for seed in seeds:
            add("real", seed, f"branch_{branching.label(point)}/seed_{seed}", branch_at=point)
            runs[-1]["branch_point"] = True
    for control in [c for c in CONTROLS if c in config.get("controls", [])]:
        for seed in seeds:
            if control == "single_task":
                for task in settings.task_specs(config):
                    stages = [s for s in base["stages"] if s == "train"] or ["train"]
                    add(control, seed, f"single_task_{task}/seed_{seed}", single_task=task, stages=stages)
            else:
                add(control, seed, f"{control}/seed_{seed}")
    return runs


def what_counts(run_config: dict) -> dict:
    return {k: v for k, v in run_config.items() if k not in NOT_RESULTS}


def finished(run: dict) -> bool:
    """True when the run's folder holds DONE_FILE written under the same settings (and retrain is not asked)."""
    path = Path(run["config"]["out_dir"]) / DONE_FILE
    if run["config"].get("retrain") or not path.exists():
        return False
    done = read_json(path, lambda d: isinstance(d, dict) and isinstance(d.get("config"), dict), "a finished run's "
                     "settings ({'config': {...}})")
    return done["config"] == json.loads(json.dumps(what_counts(run["config"])))


def run_one(run_config: dict) -> str:
    """One run of the experiment (the job a SLURM node runs): the pipeline, then DONE_FILE. Returns its folder."""
    out = Path(run_config["out_dir"])
    (out / DONE_FILE).unlink(missing_ok=True)  # until this run finishes again, it is not finished
    dualtask.run(run_config)
    write_text(out / DONE_FILE, json.dumps({"config": what_counts(run_config),
                                             "finished": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=1))
    return str(out)


def _describe(run: dict) -> str:
    task = f" ({run['task']} alone)" if run["task"] else ""
    return f"{run['role']}{task}, seed {run['seed']} -> {run['config']['out_dir']}"


def write_plan(config: dict, runs: list, status: dict) -> Path:
    path = Path(config["out_dir"]) / EXPERIMENT_FILE
    listing = [{"role": r["role"], "seed": r["seed"], "task": r["task"], "folder": r["folder"],
                **status.get(r["folder"], {"status": "pending"})} for r in runs]
    settings = {k: v for k, v in config.items() if k not in ("retrain",)}
    write_text(path, json.dumps({"settings": settings, "runs": listing}, indent=1))
    return path


def _earlier_status(config: dict) -> dict:
    path = Path(config["out_dir"]) / EXPERIMENT_FILE
    if not path.exists():
        return {}
    earlier = read_json(path, lambda e: isinstance(e, dict) and isinstance(e.get("runs"), list),
                        "an experiment listing ({'settings': {...}, 'runs': [...]})")
    return {r["folder"]: {k: v for k, v in r.items() if k in ("status", "job_id", "error")}
            for r in earlier["runs"] if isinstance(r, dict) and isinstance(r.get("folder"), str)}


def launch_local(runs: list, status: dict, save) -> None:
    for k, run in enumerate(runs):
        print(f"\n== run {k + 1}/{len(runs)}: {_describe(run)}", flush=True)
        start = time.perf_counter()
        try:
            run_one(run["config"])
        except (StageFailed, DataError, UsageError) as e:
            status[run["folder"]] = {"status": "failed", "error": str(e).splitlines()[0]}
            print(f"error: run {run['folder']} failed: {e}", file=sys.stderr, flush=True)
        else:
            status[run["folder"]] = {"status": "done"}
            print(f"== run {run['folder']} finished in {format_seconds(time.perf_counter() - start)}", flush=True)
        save()


def _executor(config: dict, folder: Path):
    import submitit

    cluster = "slurm" if config["launcher"] == "slurm" else "local"
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    params = dict(config.get("slurm", {}))
    if cluster != "slurm":  # the local executor takes only the parameters that mean something on one machine
        params = {k: v for k, v in params.items() if k in ("timeout_min", "gpus_per_node", "cpus_per_task")}
    try:
        executor.update_parameters(name="dualtask", **params)
    except (TypeError, ValueError) as e:
        raise UsageError(f"slurm={config.get('slurm')!r}: submitit refuses it ({e}); expected submitit's "
                         f"parameters, e.g. {{'slurm_partition': 'gpu', 'gpus_per_node': 1, 'timeout_min': 1440}}")
    return executor


def _still_queued(config: dict, folder: Path, job_id: str):
    """The SLURM job of an earlier launch when it is still queued or running (so it is waited for, not
    submitted twice); None otherwise."""
    if config["launcher"] != "slurm" or not job_id:
        return None
    import submitit

    job = submitit.SlurmJob(folder=str(folder), job_id=str(job_id))
    return job if job.state in ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING") else None


def job_error(job, error: Exception) -> str:
    """Why a job did not finish, in one line read from what it left: the exception that ended its run (the last
    one of the traceback submitit hands back, module path dropped), else the state SLURM gave the job
    (CANCELLED, TIMEOUT, OUT_OF_MEMORY...) and the line of its error log that says why."""
    lines = str(error).splitlines()
    rules = [k for k, line in enumerate(lines) if line.strip() == "-" * 22]  # submitit's frame of the trace
    if "failed during processing with trace:" in str(error) and len(rules) >= 2:
        trace = lines[rules[0] + 1:rules[-1]]
        files = [k for k, line in enumerate(trace) if line.startswith('  File "')]
        rest = [line for line in trace[files[-1] + 1 if files else 0:] if line.strip() and not line.startswith("    ")]
        if rest:  # the line after the last frame (its code and carets indented by 4): "module.Error: message"
            name, sep, message = rest[0].partition(": ")
            name = name.rsplit(".", 1)[-1]
            return message if sep and name in ("UsageError", "DataError", "StageFailed") else f"{name}{sep}{message}"
    try:
        state = job.state
        log = [line.strip() for line in (job.stderr() or "").splitlines() if line.strip()]
    except Exception:  # the log or the state cannot be read: what submitit said is all there is
        state, log = "UNKNOWN", []
    # slurmstepd's own line first ("*** JOB 7 ON node CANCELLED AT ... [DUE TO TIME LIMIT] ***"), else an error
    said = ([line for line in log if "*** JOB" in line] or [line for line in log if "***" in line] or
            [line for line in log if "error" in line.lower()][-1:] or log[-1:])
    if said or state != "UNKNOWN":
        return f"the job ended without a result (state {state})" + (f": {said[0]}" if said else "")
    return lines[-1].strip() if lines else repr(error)


def launch_submitit(config: dict, runs: list, status: dict, save) -> None:
    """Each run a job (SLURM, or local processes): submit what is missing, wait for all, record each outcome.
    Ctrl-C stops the waiting, not the jobs: a rerun waits for them again."""
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    folder = Path(config["out_dir"]) / "jobs"
    executor = _executor(config, folder)
    # a job imports this package wherever it runs: the same Python environment, where `pip install -e .` put it
    jobs = {}
    for run in runs:
        job = _still_queued(config, folder, status.get(run["folder"], {}).get("job_id"))
        if job is None:
            try:
                job = executor.submit(run_one, run["config"])
            except (FailedJobError, FailedSubmissionError) as e:  # sbatch refused it: the cluster, not this tool
                save()
                said = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
                raise StageFailed(f"launcher={config['launcher']!r}: submitting {run['folder']} failed ({said[-1]}); "
                                  f"the jobs submitted before it go on; rerun the same command once the cluster "
                                  f"takes jobs") from None
            print(f"submitted job {job.job_id}: {_describe(run)}", flush=True)
        else:
            print(f"waiting for job {job.job_id} submitted earlier: {_describe(run)}", flush=True)
        jobs[run["folder"]] = job
        status[run["folder"]] = {"status": "submitted", "job_id": str(job.job_id)}
    save()
    print(f"waiting for {len(jobs)} job(s); their logs are in {folder}" + (
        " (Ctrl-C stops waiting, not the jobs; rerun the same command to wait again)"
        if config["launcher"] == "slurm" else ""), flush=True)
    try:
        for run in runs:
            job = jobs[run["folder"]]
            try:
                job.result()
            except Exception as e:  # submitit re-raises the job's error, or reports a job that died
                status[run["folder"]] = {"status": "failed", "job_id": str(job.job_id), "error": job_error(job, e),
                                         "log": str(job.paths.stderr)}
                print(f"error: job {job.job_id} ({run['folder']}) failed: {status[run['folder']]['error']} "
                      f"(log: {job.paths.stderr})", file=sys.stderr, flush=True)
            else:
                status[run["folder"]] = {"status": "done", "job_id": str(job.job_id)}
                print(f"job {job.job_id} finished: {run['folder']}", flush=True)
            save()
    except KeyboardInterrupt:
        save()
        if config["launcher"] == "slurm":
            print("stopped waiting; the jobs go on. Rerun the same command to wait for them and aggregate.",
                  file=sys.stderr)
        else:  # local jobs are this process's children: Ctrl-C reached them too
            print("stopped; the local jobs were interrupted too. Rerun the same command: finished runs are kept, "
                  "the others resume.", file=sys.stderr)
        sys.exit(130)


def check(config: dict) -> list:
    """The one check of a whole configuration before anything is read, trained or written: an experiment's own
    settings and every run it launches (each seed, control and branch point: preflight.check_run), or the one run
    it is. A UsageError names the setting. Returns the runs (`plan`; for one run, [{'config': its settings}])."""
    if not is_experiment(config):
        check_experiment(config)
        runs = [{"config": {k: v for k, v in config.items() if k not in EXPERIMENT_KEYS}}]
    else:
        check_experiment(config, launching=True)
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:
            raise UsageError("seeds/controls under torchrun: an experiment does not run its runs across processes "
                             "yet; run it without torchrun (launcher='slurm' gives each run its own job), or run "
                             "each seed's command under torchrun (e.g. --seed=1 --out_dir=.../seed_1)")
        # what every run shares, and the experiment's own out_dir, which holds the runs' folders
        preflight.check_run({k: v for k, v in config.items() if k not in EXPERIMENT_KEYS})
        runs = plan(config)
    for run in runs:
        preflight.check_run(run["config"])
    return runs


def run_experiment(config: dict) -> None:
    runs = check(config)  # every run's settings and paths, before anything is written or trained
    out = Path(config["out_dir"])
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"out_dir={str(out)!r} cannot be created ({e.strerror}); expected a writable folder path")
    status = _earlier_status(config)
    for run in runs:
        if finished(run):
            status[run["folder"]] = {"status": "done"}
        elif status.get(run["folder"], {}).get("status") == "done":
            status[run["folder"]] = {"status": "pending"}

    def save():
        write_plan(config, runs, status)

    save()
    todo = [r for r in runs if not finished(r)]
    print(f"experiment of {len(runs)} runs in {out}: {len(runs) - len(todo)} finished earlier, {len(todo)} to run "
          f"({EXPERIMENT_FILE} lists them)", flush=True)
    if todo:
        if config.get("launcher", "local") == "local":
            launch_local(todo, status, save)
        else:
            launch_submitit(config, todo, status, save)
    failed = [r["folder"] for r in runs if status.get(r["folder"], {}).get("status") != "done"]
    if failed:
        raise StageFailed(f"experiment: {len(failed)} run(s) did not finish ({', '.join(failed)}); "
                          f"{out / EXPERIMENT_FILE} says why; the aggregate waits for them (rerun to go on)")
    written = aggregate.aggregate(out, runs)
    for path in written:
        print(f"wrote {path}")


def main(script_globals: dict, argv: list | None = None) -> None:
    """Entry point of the backbone scripts: settings from the script and the command line, then one run or an
    experiment. Bad input exits with status 2 and one line naming the culprit; nothing in out_dir is lost."""
    argv = sys.argv[1:] if argv is None else argv
    defaults = settings.hyperparameters(script_globals)
    if any(a in ("-h", "--help") for a in argv):
        settings.print_help(defaults, script_globals.get("__file__", "script.py"))
        return
    try:
        with report_bugs(DataError):
            config = settings.network_run(settings.parse_overrides(defaults, argv))
            if is_experiment(config):
                run_experiment(config)
            else:
                (run,) = check(config)
                dualtask.run(run["config"])
    except (UsageError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except StageFailed as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
