"""Every figure that needs a GPU, measured in one prepared run: one table on stdout, the same as JSON.

    python benchmarks/gpu_check.py --out=$OUT/gpu_check.json               # one H200 (see below)
    OMP_NUM_THREADS=1 python benchmarks/gpu_check.py --device=cpu --tiny   # the same code paths at tiny sizes:
                                                                            # 30 s on the 2-core machine

On one H200 the sizes are meant to take about 5 minutes in all (an estimate from the H100 figures in
BENCHMARKS.md: not yet run there), within 8 minutes whatever happens: no section starts after --budget_s (420 s)
and the greedy section fits its sites to 150 s and to --limit_s (450 s) from the start, its first site running
one step whatever the clock says. With --tiny there is no --budget_s or --limit_s unless given: a test of the code
paths must not depend on how fast or loaded the machine is.

Sections, run in this order; each is timed, samples the GPU's utilisation and memory every 0.2 s (from
nvidia-smi; None on the CPU) and records the peak memory PyTorch allocated. A section that
fails records its error and traceback and the others still run; one that would start after --budget_s seconds
is recorded as skipped. No network, no weights: the project's demo data and freshly initialised networks.

  peak               the matrix-product peak every "% of peak" divides by: 8192^3 bf16 on a GPU (fp32 and small
                     on the CPU, which computes in fp32), a few products after warm-up
  data               the demo faces and objects (dualtask.load_datasets, 'demo'), drawn at 64 px and upsampled on
                     the device to 224 px (drawing at 224 takes ten times as long on the CPU: 5 ms an image)
  train_vgg16        images/s of dualtask.train's step (batch augmentation on the device, bf16 autocast and
  train_resnet50     channels_last on CUDA, the project's optimizer, schedule and label smoothing) over timed
                     steps after warm-up; % of peak = 3 x forward FLOPs (FlopCounterMode) x images/s / peak
  prepare            more training of that VGG16 for a fixed time, so that the lesion sections rank a network
                     that has learned something; its validation accuracy
  suffix_sweep       lesion_utils.evaluate_lesions (prefix once, suffix per lesion) against
                     evaluate_lesions_naive on the same lesions at a few sites: seconds, ratio, agreement, and the
                     suffix sweep's FLOP/s (FlopCounterMode per image) as a share of the peak
  ranking_precision  loss rankings (rank_site, "loss") in fp32 and bf16 (ranking_precision): Spearman, top-20%
                     overlap, and the project's bf16 check (the same top-20% sets)
  greedy             racing greedy (the defaults of greedy_settings) for a few steps at a few VGG16 sites on
                     6,400 ranking images per task, projected to the whole ranking (13 sites, both tasks, steps to
                     20%) and compared with the 4-hour target

The targets beside the figures are the GPU's: on the CPU they are shown but not judged (met: -), except the
suffix sweep's agreement with the naive one, which must be exact there.

This file runs the sections and reports; gpu_check_sections.py holds the sections, gpu_check_measures.py the sizes,
the shared state, the GPU sampler and the training step they measure.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import platform
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from gpu_check_measures import Check, GpuSampler, sync
from gpu_check_sections import SECTION_FUNCTIONS, SECTIONS

from dualtask.core import names
from dualtask.core.common import write_text

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------
# running and reporting


def run_section(ck: Check, name: str, sampler: GpuSampler) -> dict:
    """One section, timed and sampled; its error (with traceback) recorded instead of raised."""
    record = {"section": name, "status": "ok", "seconds": None, "error": None, "traceback": None, "metrics": [],
              "peak_memory_gib": None}
    elapsed = time.perf_counter() - ck.t0
    if elapsed > ck.args.budget_s:
        record.update(status="skipped", error=f"not started: {elapsed:.0f} s elapsed, past --budget_s="
                                              f"{ck.args.budget_s:g}")
        print(f"[{elapsed:6.1f} s] {name}: skipped (past the time budget)", flush=True)
        return record
    print(f"[{elapsed:6.1f} s] {name} ...", flush=True)
    if ck.gpu:
        torch.cuda.reset_peak_memory_stats(ck.device)
    sampler.start()
    start = time.perf_counter()
    try:
        record["metrics"] = SECTION_FUNCTIONS[name](ck)
    except Exception as e:  # recorded; the next section runs
        record.update(status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        print(f"  {name} failed: {record['error']}", file=sys.stderr, flush=True)
    finally:
        try:
            sync(ck.device)
        except Exception:  # a broken device is the section's error, already recorded
            pass
        record["seconds"] = round(time.perf_counter() - start, 2)
        record.update(sampler.stop())
        if ck.gpu:
            record["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(ck.device) / 2**30, 2)
        gc.collect()
        if ck.gpu:
            torch.cuda.empty_cache()
    return record


def fmt(value, unit: str = "") -> str:
    if value is None:
        text = "-"
    elif isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, (int, np.integer)):
        text = f"{value:,}"
    elif isinstance(value, float):
        text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}" if abs(value) >= 1e-3 or value == 0 \
            else f"{value:.2e}"
    else:
        text = str(value)
    return f"{text} {unit}".strip()


def status_row(record: dict) -> dict:
    parts = [record["status"]]
    if record["seconds"] is not None:
        parts.append(f"{record['seconds']:.1f} s")
    if record.get("gpu_util_mean") is not None:
        parts.append(f"GPU util mean {record['gpu_util_mean']:.0f}% (max {record['gpu_util_max']:.0f}%)")
    if record.get("peak_memory_gib") is not None:
        parts.append(f"peak {record['peak_memory_gib']:.1f} GiB")
    if record["error"]:
        parts.append(record["error"].splitlines()[0][:160])
    return {"section": record["section"], "metric": "status", "value": ", ".join(parts), "target": None,
            "met": None if record["status"] != "error" else False}


def table_rows(records: list) -> list:
    rows = []
    for record in records:
        rows.append(status_row(record))
        for m in record["metrics"]:
            rows.append({"section": record["section"], "metric": m["metric"], "value": fmt(m["value"], m["unit"]),
                         "target": m["target"], "met": m["met"], "raw": m["value"], "unit": m["unit"]})
    return rows


def print_table(rows: list) -> None:
    cells = [(r["section"], r["metric"], r["value"], r["target"] or "-",
              "-" if r["met"] is None else "yes" if r["met"] else "no") for r in rows]
    head = ("section", "metric", "value", "target", "met")
    widths = [min(70, max(len(c[i]) for c in cells + [head])) for i in range(5)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print(line.format(*head))
    print(line.format(*("-" * w for w in widths)))
    for c in cells:
        print(line.format(*c))


def plain(value):
    """JSON-safe: numpy scalars and arrays as Python values, NaN and infinities as null."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return plain(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def environment(ck: Check) -> dict:
    import torchvision
    name = torch.cuda.get_device_name(ck.device) if ck.gpu else \
        f"cpu: {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    return {"device": name, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name] + sys.argv), "tiny": ck.args.tiny, "sizes": ck.S,
            "cudnn_benchmark": torch.backends.cudnn.benchmark}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="CPU sizes: 32 px, tiny batches, few images and steps")
    p.add_argument("--out", default=str(ROOT / ".bench" / "gpu_check.json"), help="the JSON file written")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {','.join(SECTIONS)}")
    p.add_argument("--budget_s", type=float, default=None,
                   help="no section starts after this many seconds (default 420; none with --tiny)")
    p.add_argument("--limit_s", type=float, default=None,
                   help="the greedy section ends its sites by then (default 450; none with --tiny)")
    p.add_argument("--greedy_precision", default=None, choices=names.RANKING_PRECISIONS,
                   help="the greedy section's ranking precision (default: the scripts' ranking_precision)")
    p.add_argument("--cudnn_benchmark", action="store_true",
                   help="cuDNN autotuning (dualtask.train does not turn it on, so neither does this by default)")
    args = p.parse_args(argv)
    # --tiny checks code paths, so a slow or loaded machine must not skip a section: no clock unless asked for
    if args.budget_s is None:
        args.budget_s = float("inf") if args.tiny else 420.0
    if args.limit_s is None:
        args.limit_s = float("inf") if args.tiny else 450.0
    unknown = [s for s in args.sections.split(",") if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {unknown}; expected some of {list(SECTIONS)}")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    ck = Check(args)
    env = environment(ck)
    print(f"gpu_check on {env['device']}, torch {env['torch']}, {'tiny sizes' if args.tiny else 'full sizes'}",
          flush=True)
    sampler = GpuSampler(ck.device)
    wanted = args.sections.split(",")
    records = [run_section(ck, name, sampler) for name in SECTIONS if name in wanted]
    rows = table_rows(records)
    total = time.perf_counter() - ck.t0
    print()
    print_table(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, json.dumps(plain({**env, "total_seconds": round(total, 1), "rows": rows,
                                      "sections": records}), indent=1) + "\n")
    failed = [r["section"] for r in records if r["status"] == "error"]
    print(f"\ntotal {total:.1f} s; wrote {out}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
