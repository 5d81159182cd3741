"""launcher="slurm" against a real SLURM: a one-node cluster on this machine (benchmarks/slurm_localhost.py, which
installs Debian's slurm-wlm, munge, slurmdbd and mariadb-server when missing). The slow tests need root; they are
skipped, saying why, where the cluster cannot be installed or started. A cluster already running is reused and
left running; one the tests started is stopped at the end, by its process ids. One quick test reads a failed
job's reason from what submitit hands back, without a cluster."""
import json
import os
import subprocess
import sys
import time

import pytest
from conftest import ROOT, load_benchmark, run_script
from helpers import FAST  # the same tiny runs as the submitit_local test: seconds per job

HELPER = ROOT / "benchmarks" / "slurm_localhost.py"
SLURM = [*FAST, "--launcher=slurm", "--slurm={'cpus_per_task': 1, 'timeout_min': 60}"]


@pytest.fixture(scope="module")
def cluster():
    """{'env': the variables that point SLURM's commands at the cluster}; skips when there is none."""
    pytest.importorskip("submitit")
    helper = load_benchmark("slurm_localhost")
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("a local SLURM needs root on Linux (benchmarks/slurm_localhost.py installs packages and runs "
                    "slurmctld, slurmd and munged as root)")
    before = helper.running()
    p = subprocess.run([sys.executable, str(HELPER), "start"], capture_output=True, text=True, timeout=1200)
    if p.returncode != 0:
        lines = (p.stderr.strip() or p.stdout.strip() or f"exit status {p.returncode}").splitlines()
        pytest.skip(f"no local SLURM: {lines[-1]}")
    started = [name for name in helper.running() if name not in before]
    env = {"SLURM_CONF": str(helper.paths(helper.DEFAULT_BASE)["conf"]), "OMP_NUM_THREADS": "1"}
    yield {"env": env}
    if started:  # what these tests started, by the process ids the script recorded
        helper.stop(helper.DEFAULT_BASE, only=started)


def _listing(out):
    return {r["folder"]: r for r in json.loads((out / "experiment.json").read_text())["runs"]}


def _sacct(job_ids, env, timeout=60):
    """{job id: SLURM's state of the job} from the accounting (as submitit reads it), once every job has ended:
    a job is still RUNNING or COMPLETING a moment after its result is written."""
    args = [a for j in job_ids for a in ("-j", str(j))]
    end = time.monotonic() + timeout
    while True:
        p = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", *args], capture_output=True, text=True,
                           env=dict(os.environ, **env), timeout=60)
        assert p.returncode == 0, p.stderr
        states = dict(line.split("|", 1) for line in p.stdout.strip().splitlines())
        if all(s not in ("PENDING", "RUNNING", "COMPLETING") for s in states.values()) or time.monotonic() > end:
            return states
        time.sleep(1)


@pytest.mark.slow
def test_a_two_seed_experiment_runs_as_slurm_jobs_and_is_aggregated(tmp_path, cluster):
    from dualtask.core.common import read_csv
    from dualtask.experiment import aggregate

    out = tmp_path / "exp"
    start = time.perf_counter()
    p = run_script("ResNet.py", *SLURM, "--seeds=[0, 1]", f"--out_dir={out}", env=cluster["env"])
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    print(f"two SLURM jobs and the aggregate: {time.perf_counter() - start:.0f} s")
    assert p.stdout.count("submitted job") == 2 and p.stdout.count("finished: seed_") == 2
    runs = _listing(out)
    assert [(r["role"], r["seed"], r["status"]) for r in runs.values()] == [("real", 0, "done"), ("real", 1, "done")]
    ids = [r["job_id"] for r in runs.values()]
    assert all(i.isdigit() for i in ids) and len(set(ids)) == 2
    assert set(_sacct(ids, cluster["env"]).values()) == {"COMPLETED"}  # SLURM ran them, and says so
    for folder, run in runs.items():
        log = (out / "jobs" / f"{run['job_id']}_0_log.out").read_text()
        assert f"job_id={run['job_id']}" in log and "epoch 1/1" in log
        assert (out / folder / "lesion_results.csv").exists() and (out / folder / "run_done.json").exists()
    rows = read_csv(out / "summary.csv", aggregate.SUMMARY_COLUMNS)
    assert {r["role"] for r in rows} == {"real"} and all(r["n_seeds"] == "2" for r in rows)
    assert "Task-specialised filters:" in (out / "report.html").read_text()


@pytest.mark.slow
def test_a_cancelled_job_is_resubmitted_alone_and_resumes_from_its_checkpoint(tmp_path, cluster):
    from dualtask.core.device import load_checkpoint

    out, epochs = tmp_path / "exp", 8
    args = [*SLURM, f"--epochs={epochs}", "--seeds=[0, 1]", f"--out_dir={out}"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", **cluster["env"])
    ckpt = out / "seed_1" / "checkpoint.pt"
    with open(tmp_path / "first.out", "w") as stdout, open(tmp_path / "first.err", "w") as stderr:
        first = subprocess.Popen([sys.executable, str(ROOT / "ResNet.py"), *args], cwd=ROOT, env=env, stdout=stdout,
                                 stderr=stderr, text=True)
        try:
            end = time.monotonic() + 300
            while not ckpt.exists() and first.poll() is None and time.monotonic() < end:
                time.sleep(0.2)  # seed_1's job is training: its first epoch is saved
            assert ckpt.exists(), (tmp_path / "first.out").read_text()[-2000:]
            job_id = _listing(out)["seed_1"]["job_id"]
            subprocess.run(["scancel", job_id], check=True, env=env, timeout=60)
            cancelled_at = load_checkpoint(ckpt, mmap=True)["epoch"]
            assert cancelled_at < epochs
            first.wait(timeout=300)
        finally:
            if first.poll() is None:
                first.kill()
    printed = (tmp_path / "first.out").read_text() + (tmp_path / "first.err").read_text()
    assert first.returncode == 1, printed[-3000:]
    runs = _listing(out)
    assert runs["seed_0"]["status"] == "done" and runs["seed_1"]["status"] == "failed"
    assert "CANCELLED" in runs["seed_1"]["error"] and runs["seed_1"]["log"].endswith(f"{job_id}_0_log.err")
    assert f"*** JOB {job_id} ON" in runs["seed_1"]["error"]  # slurmstepd's line, from the job's log
    assert _sacct([job_id], cluster["env"])[job_id].startswith("CANCELLED")
    assert not (out / "summary.csv").exists()
    kept = (out / "seed_0" / "checkpoint.pt").stat().st_mtime_ns

    again = run_script("ResNet.py", *args, env=cluster["env"])
    assert again.returncode == 0, (again.stdout[-3000:], again.stderr[-3000:])
    assert "1 finished earlier, 1 to run" in again.stdout
    assert again.stdout.count("submitted job") == 1 and "real, seed 1 ->" in again.stdout
    runs = _listing(out)
    new_id = runs["seed_1"]["job_id"]
    assert new_id != job_id and all(r["status"] == "done" for r in runs.values())
    log = (out / "jobs" / f"{new_id}_0_log.out").read_text()
    resumed = int(log.split("resuming from epoch ")[1].split()[0])
    assert cancelled_at <= resumed < epochs and f"epoch {epochs}/{epochs}" in log
    print(f"job {job_id} cancelled at epoch {cancelled_at}; job {new_id} resumed from epoch {resumed}")
    assert (out / "seed_0" / "checkpoint.pt").stat().st_mtime_ns == kept  # the finished run was left alone
    assert (out / "summary.csv").exists() and (out / "report.html").exists()


@pytest.mark.slow
def test_a_failing_job_is_named_with_the_reason_from_its_log(tmp_path, cluster):
    out = tmp_path / "exp"
    (out / "seed_1").mkdir(parents=True)
    (out / "seed_1" / "checkpoint.pt").write_bytes(os.urandom(1000))  # seed 1's job cannot resume from it
    p = run_script("ResNet.py", *SLURM, "--seeds=[0, 1]", f"--out_dir={out}", env=cluster["env"])
    assert p.returncode == 1, (p.stdout[-3000:], p.stderr[-3000:])
    assert "1 run(s) did not finish (seed_1)" in p.stderr
    runs = _listing(out)
    assert runs["seed_0"]["status"] == "done"
    failed = runs["seed_1"]
    assert failed["status"] == "failed" and failed["job_id"].isdigit()
    assert failed["error"].startswith(f"{out / 'seed_1' / 'checkpoint.pt'}: cannot be read, damaged")
    assert failed["log"] == str(out / "jobs" / f"{failed['job_id']}_0_log.err")
    assert failed["error"] in open(failed["log"]).read()  # the reason is the job's own, from its log
    assert f"failed: {failed['error']}" in p.stderr
    assert _sacct([failed["job_id"]], cluster["env"])[failed["job_id"]] == "FAILED"
    assert not (out / "summary.csv").exists()


def test_the_reason_of_a_failed_job_is_its_exception_and_of_a_killed_job_its_state_and_log():
    pytest.importorskip("submitit")
    from submitit.core.utils import FailedJobError, UncompletedJobError

    from dualtask.experiment import experiment

    class Job:  # what _job_error reads of a submitit job: SLURM's state and the job's error log
        state = "CANCELLED by 0"

        def stderr(self):
            return ("submitit WARNING (2026-12-04 15:41:44,871) - Bypassing signal SIGTERM\n"
                    "slurmstepd-vm: error: *** JOB 4 ON vm CANCELLED AT 2026-12-04T15:41:44 ***\n"
                    "slurmstepd-vm: error: *** STEP 4.0 ON vm CANCELLED AT 2026-12-04T15:41:44 ***\n"
                    "srun: error: vm: task 0: Killed\n")

    trace = ('Traceback (most recent call last):\n  File "/x/experiment.py", line 119, in run_one\n'
             '    dualtask.run(run_config)\n    ^^^^^^^^^^^^^^^^^^^^^^^^\n'
             'common.UsageError: /x/checkpoint.pt: cannot be read\n  and a second line\n')
    said = (f"Job (task=0) failed during processing with trace:\n----------------------\n{trace}\n"
            f"----------------------\nYou can check full logs with 'job.stderr(0)' and 'job.stdout(0)'or at "
            f"paths:\n  - /x/4_0_log.err\n  - /x/4_0_log.out")  # submitit's FailedJobError
    assert experiment.job_error(Job(), FailedJobError(said)) == "/x/checkpoint.pt: cannot be read"
    assert experiment.job_error(Job(), FailedJobError(said.replace("common.UsageError", "ValueError"))) == \
        "ValueError: /x/checkpoint.pt: cannot be read"
    assert experiment.job_error(Job(), UncompletedJobError("Job 4 has not produced any output")) == (
        "the job ended without a result (state CANCELLED by 0): "
        "slurmstepd-vm: error: *** JOB 4 ON vm CANCELLED AT 2026-12-04T15:41:44 ***")
