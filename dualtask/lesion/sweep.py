"""The lesion engine's front: the sweep over a run's sites (`lesion_stage`: rank, lesion, evaluate, write the
files after every site, resume), and every name of the engine's parts, importable from here as before:
engine.py (sites, masks, evaluation), rankings.py (the rankings), greedy.py (the greedy ranking),
dissociation.py (the index, its statistics and the result rows) and resume.py (the sweep's settings and what an
earlier sweep finished under them).

A lesion silences chosen output channels of one site by multiplying the site's output, after its BN and
ReLU, by a mask (never by editing weights: a BN shift would keep a zeroed filter's channel alive). Sites are
each conv layer's ReLU output for VGG, and the stem and each bottleneck block's output (after the residual
add and ReLU) for ResNet/ResNeXt, named by their module path in `model.named_modules()`.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from dualtask.core import device
from dualtask.core.common import format_seconds, read_json, write_csv, write_text
from dualtask.core.names import READOUT_DIRS, READOUT_NAMES, SWEEP_FILES
from dualtask.lesion import subgroups
from dualtask.lesion.dissociation import (
    DISSOCIATION_COLUMNS,
    HEADS,
    LESION_COLUMNS,
    PER_CLASS_COLUMNS,
    dissociation_rows,
    lesion_conditions,
    matched_subsets,
    per_class_rows,
    per_image_arrays,
    per_image_summary,
    restrict,
    result_rows,
    write_per_image,
)
from dualtask.lesion.engine import (
    cache_bytes,
    default_masks_per_pass,
    evaluate_lesions,
    image_batches,
    input_shape,
    site_activations,
)
from dualtask.lesion.greedy import (
    GREEDY_DEFAULTS,
    all_gather_objects,
    beyond_greedy_stop,
)
from dualtask.lesion.rankings import (
    LOCALISER_FDR,
    RELIABILITY_FRACTIONS,
    merge_rankings,
    rank_site,
    same_top_sets,
)
from dualtask.lesion.readouts import (
    FIXED_FOLDS,
    PENALTY_RULE,
    as_scored,
    fixed_lesions,
    fixed_reader,
    fixed_readouts,
    penalty_range,
    refit_lesions,
)
from dualtask.lesion.resume import earlier_sweep, no_earlier_sweep, sweep_settings
from dualtask.model import branches
from dualtask.model.sites import receptive_fields, select_sites
from dualtask.stats import multiple_testing

READOUT_IMAGES = 500  # training images per task a refitted readout is fitted on (readout_images)


def _one_process(obj):
    return [obj]


def lesion_stage(model: nn.Module, images: dict, config: dict, out_dir: Path, rank: int = 0, world: int = 1,
                 gather=_one_process, reuse: dict | None = None) -> Path:
    """The lesion sweep of a run: for each site, rank its filters for each task by every method in
    config['lesion_methods'] on training images, silence the top fraction of each ranking (and of each random
    order), evaluate both heads on the test images, and write lesion_results.csv, rankings.json and
    dissociation.csv after every site. A killed sweep resumes at the first unfinished site.

    Under torchrun every process calls it: the sites are shared out (process r sweeps every world-th site from
    the r-th), `gather(obj)` brings every process's result of a round to process 0 (a list in rank order; None
    elsewhere), and process 0 alone prints and writes, in site order: the files are those of one process.

    reuse: a dict to hand on to readout_stage(..., "fixed", reuse=): the sweep fits the fixed readouts and scores
    every lesion by them in the heads' own pass (the rest of the trunk runs once per lesion, not twice); the
    readout stage then writes those results and computes only what this sweep did not (sites finished earlier)."""
    return Sweep(model, images, config, Path(out_dir), rank, world, gather, reuse=reuse).run()


def readout_stage(model: nn.Module, images: dict, config: dict, run_dir: Path, kind: str, rank: int = 0,
                  world: int = 1, gather=_one_process, reuse: dict | None = None) -> Path:
    """A readout sweep (readouts.py) of a run whose lesion sweep is done: the same sites, rankings (its
    rankings.json), lesions and statistics, every lesion scored by linear readouts instead of the network's heads:
    kind "refit", readouts fitted anew to each lesion's features (into run_dir/refit_readout/), or "fixed",
    readouts fitted once to the intact network's features of held-out images (into run_dir/fixed_readout/). It
    resumes as the sweep. reuse: what lesion_stage(..., reuse=) scored by the fixed readouts in its own pass."""
    folder = Path(run_dir) / READOUT_DIRS[kind]
    if rank == 0:
        folder.mkdir(exist_ok=True)
    return Sweep(model, images, config, folder, rank, world, gather, rankings_of=Path(run_dir), readout=kind,
                 reuse=reuse if kind == "fixed" else None).run()


class Sweep:
    """One run's lesion sweep (`lesion_stage`): what its sites share, and the steps of one site."""

    def __init__(self, model, images: dict, config: dict, out_dir: Path, rank: int, world: int, gather,
                 rankings_of: Path | None = None, readout: str | None = None, reuse: dict | None = None):
        """rankings_of: a run folder whose finished sweep's rankings this one lesions, scoring every lesion by
        the readouts `readout` names ("refit" or "fixed", readout_stage); None: the network's own heads, and
        rankings of its own. reuse: the fixed readouts and their scores of lesions, filled by the heads' sweep
        (lesion_stage) and read by the fixed readouts' (readout_stage)."""
        self.model, self.images, self.config, self.rank, self.world, self.gather = \
            model, images, config, rank, world, gather
        self.reuse = reuse
        self.main = rank == 0
        self.say = print if self.main else (lambda *a, **k: None)
        self.tasks = list(images)
        self.settings = sweep_settings(model, config)
        self.sites = select_sites(model, config)
        self.readout = readout if rankings_of is not None else None
        if self.readout == "refit":
            self.settings.update(readout="refit", readout_images=int(config.get("readout_images", READOUT_IMAGES)))
        elif self.readout == "fixed":
            # an earlier sweep without readout_penalty chose one penalty per task on all test images: it starts over
            self.settings.update(readout="fixed", readout_folds=FIXED_FOLDS, readout_penalty=PENALTY_RULE)
        if self.readout:
            self.given = read_json(Path(rankings_of) / SWEEP_FILES["rankings"], lambda r: isinstance(r, dict) and all(
                s.name in r for s in self.sites), "the lesion sweep's rankings of every site")
        self.paths = {k: out_dir / f for k, f in SWEEP_FILES.items()}
        earlier = earlier_sweep(self.settings, out_dir) if not config.get("retrain") else \
            no_earlier_sweep("--retrain=True: the sweep starts over")
        if earlier["restart"]:
            self.say(f"lesion sweep: {earlier['restart']}")
        self.progress = {"settings": self.settings, "done": list(earlier["done"])}
        self.rows, self.diss, self.per_class, self.subgroup_rows, self.rankings = earlier["rows"], \
            earlier["dissociation"], earlier["per_class"], earlier["subgroups"], earlier["rankings"]
        self.per_image = dict(earlier["per_image"])
        self.read_by = READOUT_NAMES[self.readout] if self.readout else HEADS  # what reads every accuracy
        for row in self.rows + self.per_class + self.subgroup_rows:  # files written before the column
            if row.get("read_by") in (None, ""):
                row["read_by"] = self.read_by
        if earlier["done"]:
            self.say(f"lesion sweep: {len(set(earlier['done']))} of {len(self.sites)} sites finished earlier; "
                     f"continuing")
        self.todo = [s for s in self.sites if s.name not in set(earlier["done"])]

    def run(self) -> Path:
        from tqdm import tqdm

        if not self.todo:
            return self.paths["results"]
        self._intact()
        self._ranking_plan()
        started, finished = time.perf_counter(), 0
        rounds = [self.todo[k:k + self.world] for k in range(0, len(self.todo), self.world)]
        for group in tqdm(rounds, desc=READOUT_NAMES[self.readout] if self.readout else "lesion sweep", leave=False,
                          disable=None if self.main else True):
            given, spent = {}, {}
            for site in group if self.share else []:  # every process, every site of the round, together
                spent[site.name] = time.perf_counter()
                given[site.name] = self._shared_greedy(site)
                spent[site.name] = time.perf_counter() - spent[site.name]
            mine = None
            if self.rank < len(group):
                mine = self._sweep_site(group[self.rank], given.get(group[self.rank].name))
                mine["seconds"] += spent.get(group[self.rank].name, 0.0)
            gathered = self.gather(mine)
            if not self.main:
                continue
            self._record(group, gathered)
            finished += len(group)
            left = (time.perf_counter() - started) / finished * (len(self.todo) - finished)
            done = len(self.progress["done"]) - len(group)
            what = READOUT_NAMES[self.readout] + ", site" if self.readout else "lesion site"
            for k, (site, got) in enumerate(zip(group, gathered)):
                reused = " (lesions scored in the lesion sweep's own pass)" if got["reused"] else ""
                print(f"{what} {done + k + 1}/{len(self.sites)} {site.name} ({site.n_filters} filters): ranked by "
                      f"{', '.join(self.settings['methods'])}; {got['n_lesions']} lesions x {self.n_test} test images; "
                      f"{got['seconds']:.1f} s{reused}; about {format_seconds(left)} left", flush=True)
        self.say(f"wrote {self.paths['results']} ({len(self.rows)} rows, {len(self.sites)} sites), "
                 f"{self.paths['dissociation'].name}, {self.paths['rankings'].name}")
        return self.paths["results"]

    def _intact(self) -> None:
        """The test and ranking images, the intact network's results, accuracy matching and the lesions per pass."""
        model, images, tasks, config, say = self.model, self.images, self.tasks, self.config, self.say
        model.eval()
        self.device = next(model.parameters()).device
        # the images stay uint8 on the device (a quarter of float32's memory), normalised batch by batch
        self.test = test = image_batches(images, "test", compact=True)
        self.train_sample = image_batches(images, "train", n_per_task=config.get("rank_images", 256),
                                          seed=config["seed"], compact=True)
        if self.readout == "refit":
            self.fit = image_batches(images, "train", n_per_task=self.settings["readout_images"], seed=config["seed"],
                                     compact=True)
            intact, self.alphas = refit_lesions(model, self.sites[0], [[]], self.fit, test)
            intact = intact[0]
            say("refitted readouts (ridge on standardised features, " + ", ".join(
                f"{t}: {sum(len(y) for tb, _, y in self.fit if tb == t)} training images, penalty {a:g}"
                for t, a in self.alphas.items()) + ")")
        elif self.readout == "fixed":
            fitted = (self.reuse or {}).get("readouts")  # the heads' sweep's (the same images, seed and network)
            self.fixed = fitted if fitted is not None else fixed_readouts(model, self.sites[0], test, config["seed"])
            intact = fixed_lesions(model, self.sites[0], [[]], self.fixed, test)[0]
            self.progress["readout_penalties"] = {t: r["alphas"] for t, r in self.fixed.items()}  # per fold
            say("fixed readouts (ridge on standardised features of the intact network, each task's test images in "
                "folds, each fold read by the readout fitted on the others, its penalty chosen on those: " + ", ".join(
                    f"{t}: {len(r['readouts'])} folds, {penalty_range(r['alphas'])}" for t, r in self.fixed.items())
                + ")")
        else:
            intact = evaluate_lesions(model, self.sites[0], [[]], test)[0]
            if self.reuse is not None:  # the fixed readouts, scored in this sweep's passes
                self.fixed = self.reuse["readouts"] = fixed_readouts(model, self.sites[0], test, config["seed"])
                self.reuse["sites"] = {}
        self.intact = intact
        self.chance = {t: images[t].data.chance for t in tasks}
        self.paired = len(tasks) >= 2 and images[tasks[0]].data.images is images[tasks[1]].data.images  # one set
        self.summary = {t: per_image_summary(intact[t]) for t in tasks}
        self.per_image.update({f"intact|{t}": np.asarray(intact[t]["correct"], dtype=bool) for t in tasks})
        matching = self.settings.get("match_accuracy")
        self.matched = matched_subsets({t: intact[t]["correct"] for t in tasks}, config["seed"]) if matching else None
        if matching and self.matched is None:
            say("accuracy matching impossible: a task classifies every test image correctly while another does "
                "not (the matched_ columns stay empty)")
        if self.matched is not None:
            say("accuracy-matched test images: " + ", ".join(
                f"{t} {len(self.matched[t])} images at {intact[t]['correct'][self.matched[t]].mean():.3f}"
                for t in tasks))
        say(f"intact test accuracy through the {self.read_by}: " + ", ".join(
            f"{t} {self.summary[t]['accuracy']:.3f} (chance {self.chance[t]:.3f})" for t in tasks))
        self._lesions_per_pass()
        if not self.readout:
            self.receptive = receptive_fields(model, self.todo, int(input_shape(test)[-1]))
        self.labels = {t: torch.cat([y for tb, _, y in test if tb == t]).cpu().numpy() for t in tasks}
        self.classes = {t: list(images[t].data.classes) for t in tasks}
        self.n_test = sum(len(y) for _, _, y in test)
        self.groups = subgroups.read_groups(config["subgroups"], {t: len(y) for t, y in self.labels.items()}) \
            if self.settings.get("subgroups") else None

    def _lesions_per_pass(self) -> None:
        """Lesions per pass, each site's own: its test batch's cached output for the sweep, its ranking batch's for
        the rankings (a ranking batch is smaller: more lesions fit beside it)."""
        per_image = cache_bytes(self.model, self.sites, input_shape(self.test), 1)
        batch = max(len(x) for _, x, _ in self.test)
        rank_batch = max((len(x) for _, x, _ in self.train_sample), default=batch)
        self.per_pass = {name: default_masks_per_pass(self.device, b * batch) for name, b in per_image.items()}
        self.rank_per_pass = {name: default_masks_per_pass(self.device, b * rank_batch)
                              for name, b in per_image.items()}
        counts = sorted(set(self.per_pass.values()))
        self.say(f"activation cache: at most {max(per_image.values()) * batch / 2**20:.1f} MiB per image batch "
                 f"({batch} images), "
                 f"{counts[0] if len(counts) == 1 else f'{counts[0]} to {counts[-1]}'} lesion(s) per pass"
                 + (" by site" if len(counts) > 1 else "")
                 + (f"; sites shared out across {self.world} processes" if self.world > 1 else ""))

    def _ranking_plan(self) -> None:
        """How the sites' rankings are computed: the greedy settings, shared greedy under torchrun, precision."""
        methods = self.settings["methods"]
        self.greedy = self.settings.get("greedy")
        self.greedy_stop = (self.greedy or GREEDY_DEFAULTS)["stop"]
        self.wanted_precision = self.settings.get("ranking_precision", "fp32")
        # under torchrun the greedy rankings (the costliest by far) are computed by all processes together, each
        # scoring a share of every step's candidates; everything else about a site is its own process's work
        self.share = (self.rank, self.world, all_gather_objects) if self.world > 1 and "greedy" in methods and \
            not self.readout and torch.distributed.is_available() and torch.distributed.is_initialized() else None
        self.own = [m for m in methods if not (self.share and m == "greedy")]
        self.scored = [m for m in self.own if m in ("loss", "greedy")]  # the rankings whose precision is a setting
        self.precision = None  # bf16 asked for on a GPU: decided by a check at this process's first site
        if self.share:
            self.say(f"greedy rankings: each step's candidates shared out across {self.world} processes (fp32)")

    def _ranked(self, site, methods, how: str, reliability: bool, share=None) -> dict:
        tops = sorted(set(RELIABILITY_FRACTIONS) | {f for f in self.settings["fractions"] if f > 0})
        return rank_site(self.model, site, self.train_sample, self.tasks, methods, self.settings["random_repeats"],
                         self.config["seed"], self.rank_per_pass[site.name], reliability=reliability,
                         greedy=self.greedy,
                         precision=how, localiser_fdr=self.settings.get("localiser_fdr", LOCALISER_FDR),
                         mask=self.settings.get("mask"), reliability_fractions=tops,
                         **({"share": share} if share else {}))

    def _shared_greedy(self, site) -> dict:
        """The site's greedy rankings, every process scoring a share of each step's candidates (in fp32: the
        bf16 check is a process's own)."""
        return self._ranked(site, ["greedy"], "fp32", self.settings.get("reliability", False), self.share)

    def _rank_filters(self, site) -> dict:
        """The site's rankings, in fp32 unless bf16 was asked for and its check at the first site passed."""
        reliability = self.settings.get("reliability", False)
        if self.wanted_precision == "fp32" or not device.use_bf16(self.device) or not self.scored:
            return self._ranked(site, self.own, "fp32", reliability)  # bf16 changes nothing here
        if self.precision is None:
            ranking = self._ranked(site, self.own, "fp32", reliability)
            same = same_top_sets(ranking, self._ranked(site, self.scored, "bf16", False), self.scored, self.tasks, 0.2)
            self.precision = "bf16" if all(same.values()) else "fp32"
            ranking["precision"] = {"requested": "bf16", "used": "fp32", "bf16_same_top20": same,
                                    "later_sites": self.precision}
            self.say(f"ranking precision: bf16 {'gives' if self.precision == 'bf16' else 'does not give'} the fp32 "
                     f"top-20% sets at {site.name} ({', '.join(k for k, v in same.items() if not v) or 'all same'}); "
                     f"later sites rank in {self.precision}")
            return ranking
        ranking = self._ranked(site, self.own, self.precision, reliability)
        ranking["precision"] = {"requested": "bf16", "used": self.precision}
        return ranking

    def _sweep_site(self, site, given=None) -> dict:
        """Everything one site adds to the sweep's files; `given`: its greedy rankings, computed together."""
        start = time.perf_counter()
        if self.readout:
            ranking = self.given[site.name]
        else:
            ranking = self._rank_filters(site) if given is None else merge_rankings(self._rank_filters(site), given)
        if not self.readout:  # how much of the image the site sees (the verdict's early sites)
            ranking["receptive_field"] = self.receptive[site.name]
        if site.name.startswith(branches.BRANCH_PREFIX):  # after a branch point: each filter's task copy
            ranking["branch"] = {"copy_of_filter": branches.copy_of_filter(
                site.n_filters, list(getattr(self.model, "task_names", self.tasks)))}
        means = None
        if self.settings["mode"] == "mean":
            acts = site_activations(self.model, [site], self.train_sample)[site.name]
            means = np.concatenate(list(acts.values())).mean(0)
        conditions = lesion_conditions(site, ranking, self.settings["fractions"], self.settings["keep_only"])
        lesions = [c for *_, c in conditions]
        results, reused = self._scored(site, lesions, means)
        out = {"ranking": ranking, "n_lesions": len(conditions), "reused": reused,
               **self._site_rows(site, conditions, results),
               "diss": self._site_dissociation(site, conditions, results),
               "per_image": per_image_arrays(site, conditions, results, self.tasks)}
        out["seconds"] = time.perf_counter() - start
        return out

    def _scored(self, site, lesions: list, means) -> tuple:
        """(per lesion {task: {'correct', 'loss'}}, whether the heads' sweep had already scored them) of the site's
        lesions, through the heads or the readouts this sweep reads."""
        mode, per_pass = self.settings["mode"], self.per_pass[site.name]
        if self.readout == "refit":
            return refit_lesions(self.model, site, lesions, self.fit, self.test, self.alphas, mode, means,
                                 per_pass)[0], False
        if self.readout == "fixed":
            kept = (self.reuse or {}).get("sites", {}).get(site.name)
            if kept is not None and len(kept["lesions"]) == len(lesions) and all(
                    np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(kept["lesions"], lesions)):
                return kept["results"], True
            return fixed_lesions(self.model, site, lesions, self.fixed, self.test, mode, means, per_pass), False
        if self.reuse is None:
            return evaluate_lesions(self.model, site, lesions, self.test, mode, means, per_pass), False
        both = evaluate_lesions(self.model, site, lesions, self.test, mode, means, per_pass,
                                read=fixed_reader(self.fixed))
        self.reuse["sites"][site.name] = {"lesions": lesions, "results": as_scored(both)}
        return [{t: {"correct": r["correct"], "loss": r["loss"]} for t, r in res.items()} for res in both], False

    def _site_rows(self, site, conditions: list, results: list) -> dict:
        """lesion_results.csv's rows of a site (and lesion_per_class.csv's, when asked for)."""
        keyed = {(m, t, r, f): (len(c), res) for (m, t, r, f, c), res in zip(conditions, results)}
        out = {"rows": [], "per_class": [], "subgroups": []}
        for method, target, repeat in dict.fromkeys((m, t, r) for m, t, r, *_ in conditions):
            extra = sorted({f for m, t, r, f in keyed if (m, t, r) == (method, target, repeat)}
                           - set(self.settings["fractions"]))  # a localiser's selective set and its random sets
            for f in self.settings["fractions"] + extra:
                n_silenced, res = (0, self.intact) if f == 0 else keyed[(method, target, repeat, f)]
                out["rows"] += result_rows(site, method, target, repeat, f, n_silenced, res, self.summary,
                                            self.chance, self.tasks, self.matched, self.intact,
                                            beyond_greedy_stop(method, f, site.n_filters, self.greedy_stop),
                                            self.read_by)
                if self.settings["per_class"]:
                    out["per_class"] += per_class_rows(site, method, target, repeat, f, res, self.labels,
                                                        self.classes, self.read_by)
                if self.groups:
                    out["subgroups"] += subgroups.subgroup_rows(site, method, target, repeat, f"{float(f):.4f}", res,
                                                                self.intact, self.groups, self.read_by)
        return out

    def _site_dissociation(self, site, conditions: list, results: list) -> list:
        """dissociation.csv's rows of a site, with the accuracy-matched index when matching is on."""
        seed = self.config["seed"]
        diss = dissociation_rows(site, conditions, results, self.intact, self.chance, self.tasks, seed=seed,
                                 paired=self.paired, greedy_stop=self.greedy_stop)
        if self.matched is not None:
            on_matched = dissociation_rows(site, conditions, [restrict(r, self.matched) for r in results],
                                           restrict(self.intact, self.matched), self.chance, self.tasks, seed=seed)
            for row, m in zip(diss, on_matched):
                row.update({f"matched_{k}": m[k] for k in ("index", "ci_low", "ci_high", "p_index")})
        return diss

    def _record(self, group: list, gathered: list) -> None:
        """A round's sites into the sweep's files (process 0), the progress last."""
        for site, got in zip(group, gathered):
            self.rows += got["rows"]
            self.per_class += got["per_class"]
            self.subgroup_rows += got["subgroups"]
            self.diss += got["diss"]
            self.per_image.update(got["per_image"])
            self.rankings[site.name] = got["ranking"]
            self.progress["done"].append(site.name)
        write_csv(self.paths["results"], LESION_COLUMNS, self.rows)
        # after the last site: the headline's multiple-test correction over every site, from the sweep's own
        # numbers, written before the progress says the sweep is done (a sweep killed in between redoes that site)
        if len(self.progress["done"]) == len(self.sites):
            self.diss = multiple_testing.corrected_rows(self.diss, self.rows,
                                                        decides=multiple_testing.deciding(self.config))
        write_csv(self.paths["dissociation"], DISSOCIATION_COLUMNS, self.diss)
        if self.settings["per_class"]:
            write_csv(self.paths["per_class"], PER_CLASS_COLUMNS, self.per_class)
        if self.groups:
            write_csv(self.paths["subgroups"], subgroups.SUBGROUP_COLUMNS, self.subgroup_rows)
        write_text(self.paths["rankings"], json.dumps(self.rankings))
        write_per_image(self.paths["per_image"], self.per_image)
        write_text(self.paths["progress"], json.dumps(self.progress, indent=1))
