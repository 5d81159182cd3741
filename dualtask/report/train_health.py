"""dualtask.report.train_health"""
from __future__ import annotations

import json
from pathlib import Path

from dualtask.core.common import read_json, write_text
from dualtask.core.names import HEALTH_FILE


def write(out_dir: Path, action: str, records: list, problems: list) -> None:
    write_text(Path(out_dir) / HEALTH_FILE, json.dumps({"health_check": action, "epochs": records,
                                                        "problems": problems}, indent=1))


def read(out_dir: Path) -> dict:
    """train_health.json of a run, or {} when the run has none (trained before it was written)."""
    path = Path(out_dir) / HEALTH_FILE
    if not path.exists():
        return {}
    return read_json(path, lambda v: isinstance(v, dict) and isinstance(v.get("problems"), list)
                     and isinstance(v.get("epochs"), list), "the training health record")


def unresolved(record: dict) -> list:
    """The problems found at the last recorded epoch: what the trained network still has."""
    if not record.get("epochs"):
        return []
    last = record["epochs"][-1]["epoch"]
    return [p for p in record.get("problems", []) if p["epoch"] == last]


def caveats(record: dict, lesioned: set) -> list:
    """The report's caveats from a run's training health: every problem found, and lesion sites with many
    dead filters at the end of training (their lesions silence fewer live filters than the fraction says)."""
    out = []
    by_kind = {}
    for p in record.get("problems", []):
        by_kind.setdefault(p["kind"], []).append(p)
    last_epoch = record["epochs"][-1]["epoch"] if record.get("epochs") else None
    for kind, ps in by_kind.items():
        epochs = sorted({p["epoch"] for p in ps})
        gone = f" This was gone by the last epoch ({last_epoch})." if last_epoch not in epochs else ""
        out.append(f"Training health ({kind}, epoch{'s' if len(epochs) > 1 else ''} "
                   f"{', '.join(map(str, epochs))}): {ps[-1]['message']}.{gone}")
    if record.get("epochs"):
        last = record["epochs"][-1]
        many = {n: f for n, f in last["dead"].items() if n in lesioned and f >= 0.25}
        if many:
            out.append("Dead filters: at " + ", ".join(f"{n} {f:.0%}" for n, f in many.items()) +
                       f" of the filters output zero for every probe image after training (epoch {last['epoch']}); "
                       f"silencing them changes nothing, so a lesion there removes fewer working filters than its "
                       f"fraction says.")
    return out

