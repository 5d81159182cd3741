"""Training a dual-task network: the recipe (optimizer, learning rate, warm-up, label smoothing), processes
under torchrun (Dist), the tasks' images on the device, evaluation, the training loop and its checkpoints."""
from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dualtask.config.settings import RECIPE, TRAIN_LOG_COLUMNS
from dualtask.core import device as device_mod
from dualtask.core import names
from dualtask.core.common import StageFailed, write_csv
from dualtask.core.device import autocast, load_checkpoint, save_checkpoint
from dualtask.data import loading as vggface2
from dualtask.data import transforms
from dualtask.data.taskdata import TaskData
from dualtask.model.network import DualTaskNet
from dualtask.report import train_health
from dualtask.training import health

# Recipe 3 adds the optimizer setting, AdamW by default (recipe 1 and 2 runs trained with SGD).
# The peak learning rate per 256 images when lr=None, per optimizer and backbone.
# SGD (Nesterov momentum 0.9), scaled linearly to the images of a step (Goyal et al. 2017). Batch-normalised
# nets: 0.2, the CIFAR recipe of He et al. 2016 (0.1 per 128 images); a VGG without batch norm loses its units at
# such rates and trains at 0.01-0.02, as in Simonyan & Zisserman (0.01 per 256) and the reference study.
# AdamW (Loshchilov & Hutter 2019; torchvision's ConvNeXt recipe: 1e-3 per 1,024 images with weight decay 0.05),
# scaled with the square root of the step's images, the scaling rule for adaptive optimisers (Malladi et al.
# 2022). An adaptive step moves every weight by about the lr whatever its gradient's size, which is what a
# from-scratch network needs in the few hundred steps a small data set gives it: see BENCHMARKS.md.
DEFAULT_LR = {"sgd": {"resnet50": 0.2, "resnext50": 0.2, "vgg_bn": 0.2, "vgg": 0.02},
              "adamw": {"resnet50": 2e-3, "resnext50": 2e-3, "vgg_bn": 2e-3, "vgg": 6e-4}}
# weight decay when weight_decay=None: SGD's L2 penalty of He et al. 2016 (5e-4 for small images); AdamW's
# decoupled decay of torchvision's ConvNeXt recipe
DEFAULT_WEIGHT_DECAY = {"sgd": 5e-4, "adamw": 0.05}
LABEL_SMOOTHING = 0.1  # torchvision's reference recipe (Szegedy et al. 2016): keeps logits from growing without end


def optimizer_name(config: dict) -> str:
    """The run's optimizer: its setting, or SGD for runs of recipes before the setting existed."""
    return config.get("optimizer", "adamw") if config.get("recipe", RECIPE) >= 3 else "sgd"


def base_lr(config: dict) -> float:
    """The peak learning rate per 256 images: the lr setting, or the backbone's default when it is None."""
    if config.get("lr") is not None:
        return float(config["lr"])
    table = DEFAULT_LR[optimizer_name(config)]
    if config["backbone"].startswith("vgg"):
        return table["vgg_bn" if config.get("batch_norm", True) else "vgg"]
    return table[config["backbone"]]


def weight_decay(config: dict) -> float:
    """The weight decay: the setting, or the optimizer's default when it is None."""
    if config.get("weight_decay") is not None:
        return float(config["weight_decay"])
    return DEFAULT_WEIGHT_DECAY[optimizer_name(config)]


def peak_lr(config: dict, world: int = 1) -> float:
    """The step's peak learning rate: per-256 lr scaled to the images of one step, batch_size on each of
    `world` processes: linearly for SGD, with the square root for AdamW (recipe 1: lr as given)."""
    if config.get("recipe", RECIPE) < 2:
        return base_lr(config)
    ratio = config["batch_size"] * world / 256
    return base_lr(config) * (ratio if optimizer_name(config) == "sgd" else math.sqrt(ratio))


def make_optimizer(model: nn.Module, config: dict, lr: float, fused: bool = True) -> torch.optim.Optimizer:
    """The run's optimizer; weight decay on weights only, not on biases and batch-norm parameters. fused=False:
    PyTorch's per-parameter kernels (benchmarks/train_speed.py's reference)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay(config)}, {"params": no_decay, "weight_decay": 0.0}]
    make, kwargs = (torch.optim.SGD, dict(momentum=0.9, nesterov=True)) if optimizer_name(config) == "sgd" \
        else (torch.optim.AdamW, {})
    # the fused kernel updates each weight in one pass instead of one per operation: on the 2-core CPU ResNet50's
    # AdamW step took 30 ms instead of 131 (training 20% faster at 32 px; BENCHMARKS.md); the same arithmetic,
    # rounded in another order. Where PyTorch has no fused kernel for the device, the plain one.
    if fused:
        try:
            return make(groups, lr=lr, fused=True, **kwargs)
        except RuntimeError:  # no fused kernel for these parameters' device
            pass
    return make(groups, lr=lr, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# devices and processes


class Dist:
    """Rank and world size; torchrun sets RANK / WORLD_SIZE / LOCAL_RANK, a plain run is rank 0 of 1."""

    def __init__(self, device_setting: str):
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if device_setting == "auto":
            device_setting = "cuda" if torch.cuda.is_available() else "cpu"
        if device_setting == "cuda" and self.world > 1:
            device_setting = f"cuda:{self.local_rank}"
        self.device = torch.device(device_setting)
        if self.device.type == "cuda":
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.device)
        if self.world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: list) -> list:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def gather(self, obj):
        """Every process's `obj` on process 0 (a list in rank order), None on the others."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world if self.main else None
        torch.distributed.gather_object(obj, out, dst=0)
        return out

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()

    def close(self):
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class TaskImages:
    """One task's uint8 images where batches are cut from them: on the GPU when they fit, else in host memory."""

    def __init__(self, data: TaskData, device: torch.device, same_images: TaskImages | None = None):
        """same_images: another task's TaskImages over the same image array, whose device copy is reused."""
        self.data, self.device = data, device
        self.labels = torch.from_numpy(np.asarray(data.labels, dtype=np.int64))
        self.on_device = None
        if same_images is not None:
            self.on_device = same_images.on_device
        else:  # on a GPU (common.free_memory) when they fit a quarter of its free memory
            free = device_mod.free_memory(device)
            if free is not None and data.images.nbytes < 0.25 * free:
                self.on_device = torch.from_numpy(np.ascontiguousarray(data.images)).to(device)
        self.labels = self.labels.to(device)

    def batch(self, idx: np.ndarray, channels_last: bool = False):
        """Images as normalised-ready float (B, 3, H, W) in [0, 1] and their labels, on the device."""
        raw, labels = self.raw(idx)
        return transforms.to_float(raw, channels_last), labels

    def raw(self, idx: np.ndarray):
        """The images as stored, uint8 (B, H, W, 3), and their labels, on the device."""
        i = torch.from_numpy(idx).to(self.device)
        if self.on_device is not None:
            return self.on_device[i], self.labels[i]
        order = np.argsort(idx)  # sorted reads are kinder to a memory-mapped cache
        raw = np.empty((len(idx),) + self.data.images.shape[1:], np.uint8)
        raw[order] = self.data.images[idx[order]]
        return device_mod.host_to_device(torch.from_numpy(raw), self.device), self.labels[i]  # pinned, non-blocking


@torch.inference_mode()
def evaluate(model: nn.Module, images: dict, split: str, dist: Dist | None = None, batch_size: int = 256,
             channels_last: bool = False) -> dict:
    """{task: {'loss', 'accuracy', 'n'}} of each task's head on that task's `split` images (eval mode). Tasks
    that share their images (one split of one array) are scored by their heads on one pass of those images."""
    was_training = model.training
    model.eval()
    results = {}
    rank, world = (dist.rank, dist.world) if dist else (0, 1)
    for group in vggface2.shared_groups({t: ti.data for t, ti in images.items()}):
        idx = images[group[0]].data.indices(split)[rank::world]
        sums = {t: [0.0, 0] for t in group}  # loss, correct
        for start in range(0, len(idx), batch_size):
            chunk = idx[start:start + batch_size]
            x, _ = images[group[0]].batch(chunk, channels_last)
            with autocast(x.device):
                out = model(transforms.normalize(x))
            for t in group:
                y = images[t].labels[torch.from_numpy(chunk).to(images[t].labels.device)]
                logits = out[t].float()
                sums[t][0] += F.cross_entropy(logits, y, reduction="sum").item()
                sums[t][1] += (logits.argmax(1) == y).sum().item()
        for t in group:
            loss_sum, correct, n = sums[t] + [len(idx)]
            if dist:
                loss_sum, correct, n = dist.all_sum([loss_sum, correct, n])
            results[t] = {"loss": loss_sum / max(n, 1), "accuracy": correct / max(n, 1), "n": int(n)}
    model.train(was_training)
    return {t: results[t] for t in images}


# ----------------------------------------------------------------------------------------------------------
# training


def lr_lambda(total_steps: int, warmup_steps: int):
    def f(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def warmup_steps(config: dict, steps_per_epoch: int) -> int:
    """Linear warm-up from 0 to the peak lr: 2 epochs or 5% of training, whichever is longer, at most a quarter.

    A from-scratch net's first steps have the largest gradients; ramping the lr up over them is what keeps
    large-batch SGD from diverging (Goyal et al. 2017 ramp over 5 epochs at 8k images per step). Recipe 1
    ramped over 5% of training only, which in a 15-epoch run was under one epoch."""
    total = steps_per_epoch * config["epochs"]
    if config.get("recipe", RECIPE) < 2:
        return max(1, total // 20)
    return max(1, min(total // 4, max(total // 20, 2 * steps_per_epoch)))


def epoch_order(n_train: np.ndarray, seed: int, epoch: int, task_index: int, length: int, rank: int, world: int):
    """This rank's shard of a seeded permutation of the training indices, repeated to `length` per rank."""
    rng = np.random.default_rng([seed, epoch, task_index])
    perms = []
    while sum(len(p) for p in perms) < length * world:
        perms.append(rng.permutation(n_train))
    return np.concatenate(perms)[rank::world][:length]


def epoch_checkpoint(out_dir: Path, epoch: int) -> Path:
    """Where training keeps the weights of an epoch named in lesion_epochs."""
    return Path(out_dir) / f"checkpoint_epoch{epoch}.pt"


def epoch_folder(out_dir: Path, epoch: int) -> Path:
    """Where the lesion sweep of an epoch named in lesion_epochs writes its files."""
    return Path(out_dir) / f"epoch_{epoch}"


def _forget_epoch(out_dir: Path, epoch: int) -> None:
    """Remove an epoch's kept weights and its sweep: training that passes the epoch again replaces them."""
    epoch_checkpoint(out_dir, epoch).unlink(missing_ok=True)
    for name in names.SWEEP_FILES.values():
        (epoch_folder(out_dir, epoch) / name).unlink(missing_ok=True)


def train(model: DualTaskNet, images: dict, config: dict, out_dir: Path, dist: Dist) -> None:
    """Train all heads together; resume from out_dir/checkpoint.pt; skip when the run is finished."""
    Trainer(model, images, config, out_dir, dist).run()


class Trainer:
    """One run's training (`train`): the recipe set up for the run's images, then epochs of steps, each epoch
    ending with validation, the health check, the log and the checkpoint."""

    def __init__(self, model: DualTaskNet, images: dict, config: dict, out_dir: Path, dist: Dist):
        self.model, self.images, self.config, self.out_dir, self.dist = model, images, config, out_dir, dist
        self.device = dist.device
        self.ckpt_path, self.log_path = out_dir / "checkpoint.pt", out_dir / "train_log.csv"
        self.tasks = list(images)
        # tasks that share their images (shared_groups) take one batch together, every image scored by each of
        # their heads; every group gets an equal share of the step
        self.groups = vggface2.shared_groups({t: ti.data for t, ti in images.items()})
        self.per_group = config["batch_size"] // len(self.groups)
        self.train_idx = {g[0]: images[g[0]].data.indices("train") for g in self.groups}
        self.steps = max(1, math.ceil(max(len(i) for i in self.train_idx.values()) / (self.per_group * dist.world)))
        self.channels_last = device_mod.use_channels_last(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.lr = peak_lr(config, dist.world)
        self.optimizer = make_optimizer(model, config, self.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(self.steps * config["epochs"], warmup_steps(config, self.steps)))
        self.smoothing = LABEL_SMOOTHING if config.get("recipe", RECIPE) >= 2 else 0.0
        self.start_epoch, self.log_rows, self.checkup = 0, [], {"epochs": [], "problems": []}
        self.classes = {t: list(images[t].data.classes) for t in self.tasks}
        self.clip = config.get("grad_clip", 0)

    def run(self) -> None:
        config, dist, model = self.config, self.dist, self.model
        if self.ckpt_path.exists() and not config.get("retrain", False) and not self._resume():
            return
        self.net = model
        if dist.world > 1:
            self.net = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if config.get("compile", False):
            self.net = torch.compile(self.net)
        self.watched = health.monitored_layers(model, config)
        self.n_fc = sum(isinstance(m, nn.Linear) for _, m in self.watched)
        self.probe = health.probe_batch(self.images, self.channels_last)
        if dist.main:  # weights kept from epochs this training passes again (or an earlier training) no longer hold
            for path in self.out_dir.glob("checkpoint_epoch*.pt"):
                kept = path.stem[len("checkpoint_epoch"):]
                if kept.isdigit() and int(kept) > self.start_epoch:
                    _forget_epoch(self.out_dir, int(kept))
        for epoch in range(self.start_epoch, config["epochs"]):
            sums, grad, seconds = self._epoch(epoch)
            self._end_epoch(epoch, sums, grad, seconds)
        if self.channels_last:
            model.to(memory_format=torch.contiguous_format)

    def _resume(self) -> bool:
        """Load the checkpoint; False when its training is finished (and nothing is left to do)."""
        config, dist = self.config, self.dist
        state = load_checkpoint(self.ckpt_path, self.device)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.start_epoch = start = int(state["epoch"])
        self.log_rows = list(state.get("log", []))
        self.checkup = state.get("health", self.checkup)
        if dist.main:  # the log rides inside the checkpoint: after a kill between the two writes, the CSV catches up
            write_csv(self.log_path, TRAIN_LOG_COLUMNS, self.log_rows)
            if "health" in state:
                train_health.write(self.out_dir, config.get("health_check", "stop"), self.checkup["epochs"],
                             self.checkup["problems"])
        last = [p for p in self.checkup["problems"] if p["epoch"] == start]
        if last and start >= config["epochs"] and config.get("health_check", "stop") == "stop":
            raise StageFailed(f"training stopped after its last epoch ({start}): " +
                              "; ".join(p["message"] for p in last) + "; --health_check=warn goes on with this "
                              "network anyway, --retrain=True trains it again")
        if start >= config["epochs"]:
            if dist.main:
                print(f"training finished earlier ({start} epochs in {self.ckpt_path}); skipping "
                      f"(--retrain=True trains again)")
            return False
        if dist.main:
            print(f"resuming from epoch {start} of {config['epochs']} ({self.ckpt_path})")
        return True

    def _epoch(self, epoch: int) -> tuple:
        """One epoch's steps: ({task: [loss sum, correct, n]} summed over processes, gradient norms, seconds)."""
        from tqdm import tqdm

        config, dist, device = self.config, self.dist, self.device
        torch.manual_seed(config["seed"] * 100_003 + epoch * 101 + dist.rank)  # dropout, reproducible on resume
        gen = torch.Generator().manual_seed(config["seed"] * 1_000_003 + epoch * 1009 + dist.rank)
        order = {g[0]: epoch_order(self.train_idx[g[0]], config["seed"], epoch, self.tasks.index(g[0]),
                                    self.steps * self.per_group, dist.rank, dist.world) for g in self.groups}
        sums = {t: torch.zeros(3, dtype=torch.float64, device=device) for t in self.tasks}  # loss, correct, n
        grad_sum, grad_max = torch.zeros((), device=device), torch.zeros((), device=device)
        self.net.train()
        t0 = time.perf_counter()
        bar = tqdm(range(self.steps), desc=f"epoch {epoch + 1}/{config['epochs']}",
                   disable=None if dist.main else True, leave=False, mininterval=2.0)
        for step in bar:
            loss, norm = self._step(order, step, gen, sums)
            grad_sum += norm
            grad_max = torch.maximum(grad_max, norm)
            if dist.main and step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        stats = {t: dist.all_sum(sums[t].tolist()) for t in self.tasks}
        return stats, {"mean": grad_sum.item() / self.steps, "max": grad_max.item()}, seconds

    def _batch(self, order: dict, step: int, gen) -> tuple:
        """A step's images (augmented, normalised), {task: labels} and {task: its rows of the batch}."""
        xs, ys, rows = [], {}, {}
        per_group = self.per_group
        for k, g in enumerate(self.groups):
            idx = order[g[0]][step * per_group:(step + 1) * per_group]
            x, ys[g[0]] = self.images[g[0]].batch(idx)
            xs.append(x)
            for t in g:
                rows[t] = slice(k * per_group, k * per_group + len(idx))
                if t != g[0]:
                    ys[t] = self.images[t].labels[torch.from_numpy(idx).to(self.images[t].labels.device)]
        x = transforms.normalize(transforms.augment(torch.cat(xs), gen))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, ys, rows

    def _step(self, order: dict, step: int, gen, sums: dict) -> tuple:
        """One optimisation step over every task's loss: (loss, gradient norm before any clipping)."""
        x, ys, rows = self._batch(order, step, gen)
        with autocast(self.device):
            out = self.net(x)
        loss = 0.0
        for t in self.tasks:
            logits = out[t][rows[t]].float()
            task_loss = F.cross_entropy(logits, ys[t], label_smoothing=self.smoothing)
            loss = loss + task_loss
            with torch.no_grad():
                sums[t] += torch.stack([task_loss.detach().double() * len(ys[t]),
                                        (logits.argmax(1) == ys[t]).sum().double(),
                                        torch.tensor(float(len(ys[t])), dtype=torch.float64, device=self.device)])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip > 0:  # the norm before any clipping, for the health check
            norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.clip).detach().float()
        else:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.detach().float())
                                                         for p in self.model.parameters() if p.grad is not None]))
        self.optimizer.step()
        self.scheduler.step()
        return loss, norm

    def _end_epoch(self, epoch: int, train_stats: dict, grad: dict, seconds: float) -> None:
        """Validation, the health check, the log and the checkpoint of an epoch; StageFailed when it stops."""
        config, dist, model = self.config, self.dist, self.model
        n_images = sum(s[2] for s in train_stats.values())
        t1 = time.perf_counter()
        val = evaluate(model, self.images, "val", dist, channels_last=self.channels_last)
        val_speed = sum(v["n"] for v in val.values()) / max(time.perf_counter() - t1, 1e-9)
        dead = health.dead_fractions(model, self.watched, self.probe)
        chances = {t: self.images[t].data.chance for t in self.tasks}
        found = health.diagnose(epoch + 1, {t: {"loss": s[0] / s[2], "accuracy": s[1] / s[2], "n": s[2]} for t, s in
                                            train_stats.items()}, val, chances, dead, grad,
                                dict(config, lr=base_lr(config)), self.lr)
        # every rank stops or none: eval-mode dead-unit counts can differ between ranks (their BN statistics)
        stop = dist.all_sum([float(bool(found))])[0] > 0 and config.get("health_check", "stop") == "stop"
        finite = all(math.isfinite(s[0]) for s in train_stats.values()) and math.isfinite(grad["mean"])
        self.checkup["epochs"].append(health.epoch_record(epoch + 1, dead, grad))
        self.checkup["problems"] += found
        for t in self.tasks:
            loss_sum, correct, n = train_stats[t]
            self.log_rows.append({"epoch": epoch + 1, "task": t, "split": "train", "loss": f"{loss_sum / n:.4f}",
                                  "accuracy": f"{correct / n:.4f}", "images_per_s": f"{n_images / seconds:.1f}"})
            self.log_rows.append({"epoch": epoch + 1, "task": t, "split": "val", "loss": f"{val[t]['loss']:.4f}",
                                  "accuracy": f"{val[t]['accuracy']:.4f}", "images_per_s": f"{val_speed:.1f}"})
        if dist.main:
            parts = [f"{t} train {train_stats[t][1] / train_stats[t][2]:.3f} val {val[t]['accuracy']:.3f} "
                     f"(loss {val[t]['loss']:.3f})" for t in self.tasks]
            print(f"epoch {epoch + 1}/{config['epochs']}  " + "  |  ".join(parts) +
                  f"  |  {n_images / seconds:.0f} img/s  lr {self.scheduler.get_last_lr()[0]:.2e}", flush=True)
            print(health.summary_line(self.checkup["epochs"][-1], self.n_fc), flush=True)
            for problem in found:
                print(f"warning: {problem['message']}", file=sys.stderr, flush=True)
            if finite:  # weights that went non-finite would only overwrite the last good epoch
                self._save(epoch)
            train_health.write(self.out_dir, config.get("health_check", "stop"), self.checkup["epochs"],
                         self.checkup["problems"])
        dist.barrier()
        if stop or not finite:
            if self.channels_last:
                model.to(memory_format=torch.contiguous_format)
            kept = (f"the checkpoint of epoch {epoch + 1} is kept in {self.ckpt_path}" if finite else
                    f"{self.ckpt_path} keeps the last epoch with finite weights")
            raise StageFailed(f"training stopped after epoch {epoch + 1}: " + "; ".join(p["message"] for p in found) +
                              f". A changed setting needs --retrain=True (it changes the run); {kept} (health in "
                              f"{self.out_dir / names.HEALTH_FILE})" +
                              ("; --health_check=warn trains on regardless" if finite else ""))

    def _save(self, epoch: int) -> None:
        """The checkpoint (with the log and health inside), the log's CSV, and a kept epoch's weights."""
        config, model = self.config, self.model
        save_checkpoint(self.ckpt_path, {"model": model.state_dict(), "optimizer": self.optimizer.state_dict(),
                                         "scheduler": self.scheduler.state_dict(), "epoch": epoch + 1,
                                         "config": config, "classes": self.classes, "log": self.log_rows,
                                         "health": self.checkup})
        write_csv(self.log_path, TRAIN_LOG_COLUMNS, self.log_rows)
        if epoch + 1 in (config.get("lesion_epochs") or []) and epoch + 1 < config["epochs"]:
            save_checkpoint(epoch_checkpoint(self.out_dir, epoch + 1), {
                "model": model.state_dict(), "epoch": epoch + 1, "config": config, "classes": self.classes})
