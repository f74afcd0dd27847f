"""The training loop of opt_fast.train (see __init__.py for the overview)."""
import bisect
import contextlib
import dataclasses
import functools
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import opt_fast
from opt_fast.nn import METHODS, OPTLayer, convert, merge, resample

from . import checkpoint as ckpt
from . import data as data_mod
from . import diagnostics
from .distributed import Dist
from . import models as models_mod
from . import recipes

CKPT_NAME = "checkpoint.pt"
ORTH_REG_PENALTIES = ("squared", "norm")


from .guards import check_device, check_seed, check_threads, fail, step_failed


@dataclass
class TrainConfig:
    """Options of one run. Those left at None come from the recipe (recipes.py: ``default`` trains out of
    the box, ``reference`` is the released code's CIFAR-100 recipe); explicit values win."""
    # what
    method: str = "gram_schmidt"
    model: str = "small"
    dataset: str = "digits"
    data_dir: Optional[str] = None
    out: Optional[str] = None
    recipe: str = "default"
    # decided by the recipe when None
    epochs: Optional[int] = None
    lr: Optional[float] = None
    warmup_epochs: Optional[float] = None  # linear lr warm-up from lr/steps to lr over this many epochs
    bn_momentum: Optional[float] = None    # PyTorch sense: running = (1 - m)·running + m·batch
    init: Optional[str] = None             # opt_fast.nn init: default, reference or identity
    orth_reg_weight: Optional[float] = None
    orth_reg_penalty: Optional[str] = None  # "squared": ‖RRᵀ − I‖²_F, "norm": ‖RRᵀ − I‖_F (released)
    reference_loss: Optional[bool] = None   # log(softmax + 1e-4), the released code's quirk
    # shared by the recipes (the released values)
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_milestones: Tuple[float, ...] = (0.4, 2 / 3, 13 / 15)  # 30k/50k/65k of 75k iterations
    lr_gamma: float = 0.1
    label_smoothing: float = 0.01
    augment: Optional[bool] = None  # None: on for 32x32 data, off otherwise
    bn_eps: float = 1e-3
    # method-specific
    ogd_lr: float = 0.02
    ogd_gamma: float = 0.2          # CayleySGD lr ×0.2 at the milestones (released)
    ogd_weight_decay_scale: float = 0.1  # the released ogd folder scales its L2 term by 0.1
    stochastic: Optional[float] = None
    sample: str = "coordinate"
    episode_epochs: int = 1
    reset_bn: bool = False
    # run control
    seed: int = 0
    device: str = "cpu"
    save_every: int = 0            # 0: only at the end
    resume: Optional[str] = None
    export: Optional[str] = None
    stop_after: Optional[int] = None  # stop after this epoch (as if interrupted); the schedule still uses `epochs`
    progress: bool = True
    threads: Optional[int] = None

    def to_dict(self):
        d = dataclasses.asdict(self)
        d["lr_milestones"] = list(self.lr_milestones)
        return d


# ----------------------------------------------------------------------------------------------------------
def validate(cfg: TrainConfig) -> None:
    if cfg.method not in METHODS:
        fail(f"unknown --method {cfg.method!r}; choose one of {', '.join(METHODS)}")
    if cfg.model not in models_mod.MODELS:
        fail(f"unknown --model {cfg.model!r}; choose one of {', '.join(models_mod.MODELS)}")
    if cfg.dataset not in data_mod.DATASETS:
        fail(f"unknown --dataset {cfg.dataset!r}; choose one of {', '.join(data_mod.DATASETS)}")
    if cfg.epochs < 1 or cfg.batch_size < 1:
        fail(f"--epochs and --batch-size must be >= 1 (got {cfg.epochs}, {cfg.batch_size})")
    # written as "not (x > 0)" with an upper bound: NaN fails every comparison, and inf is no setting
    if not (0 < cfg.lr < math.inf and 0 < cfg.ogd_lr < math.inf):
        fail(f"--lr and --ogd-lr must be finite and > 0, got {cfg.lr}, {cfg.ogd_lr}")
    if not (0 <= cfg.warmup_epochs < math.inf and 0 <= cfg.orth_reg_weight < math.inf):
        fail(f"--warmup-epochs and --orth-reg-weight must be finite and >= 0, got {cfg.warmup_epochs}, "
             f"{cfg.orth_reg_weight}")
    if not 0 <= cfg.bn_momentum <= 1:
        fail(f"--bn-momentum must be in [0, 1] (PyTorch sense: 1 - TF decay), got {cfg.bn_momentum}")
    if cfg.orth_reg_penalty not in ORTH_REG_PENALTIES:
        fail(f"--orth-reg-penalty must be one of {', '.join(ORTH_REG_PENALTIES)}, got {cfg.orth_reg_penalty!r}")
    if cfg.stochastic is not None:
        if not 0 < cfg.stochastic <= 1:
            fail(f"--stochastic must be a fraction in (0, 1], got {cfg.stochastic}")
        if not METHODS[cfg.method].stochastic_ok:
            ok = [n for n, m in METHODS.items() if m.stochastic_ok]
            fail(f"--stochastic needs a method whose identity init is R = I ({', '.join(ok)}); "
                 f"got --method {cfg.method}")
        if cfg.episode_epochs < 1:
            fail("--episode-epochs must be >= 1")
    elif cfg.reset_bn:
        fail("--reset-bn only applies with --stochastic")
    if cfg.save_every < 0:
        fail("--save-every must be >= 0")
    if cfg.stop_after is not None and not 1 <= cfg.stop_after <= cfg.epochs:
        fail("--stop-after must be in 1..epochs")
    if not 0 <= cfg.momentum < 1:
        fail(f"--momentum must be in [0, 1), got {cfg.momentum}")
    if not 0 <= cfg.weight_decay < math.inf:
        fail(f"--weight-decay must be finite and >= 0, got {cfg.weight_decay}")
    if not 0 <= cfg.label_smoothing < 1:
        fail(f"--label-smoothing must be in [0, 1), got {cfg.label_smoothing}")
    if not (0 < cfg.lr_gamma < math.inf and 0 < cfg.bn_eps < math.inf):
        fail(f"--lr-gamma and --bn-eps must be finite and > 0 (got {cfg.lr_gamma}, {cfg.bn_eps})")
    bad = [f for f in cfg.lr_milestones if not 0 < f < 1]
    if bad:
        fail(f"--lr-milestones are fractions of training, each in (0, 1) (0.5 = half way), got "
             f"{', '.join(f'{f:g}' for f in bad)}")
    check_threads(cfg.threads)
    check_seed(cfg.seed)
    check_device(cfg.device)
    ckpt.check_out(cfg.out, cfg.export)


def opt_layers(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, OPTLayer)]


@torch.no_grad()
def layer_energies(model: nn.Module):
    return {n: float(opt_fast.hyperspherical_energy(m.effective_weight().double(), s=1, reduction="mean"))
            for n, m in opt_layers(model)}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def rng_state():
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _progress(i, n, t0, loss, enabled):
    if not enabled:
        return
    w = 24
    k = int(w * i / n)
    sys.stderr.write(f"\r  [{'#' * k}{'.' * (w - k)}] {i}/{n} loss {loss:.4f} {time.perf_counter() - t0:.1f}s")
    if i == n:
        sys.stderr.write("\r" + " " * (w + 50) + "\r")
    sys.stderr.flush()


def _loss_fn(cfg: TrainConfig, num_classes: int):
    if not cfg.reference_loss:
        return lambda logits, y: F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)

    def ref(logits, y):  # §1.4: softmax + 1e-4 inside the log
        target = F.one_hot(y, num_classes).to(logits.dtype) * (1 - cfg.label_smoothing) + cfg.label_smoothing / num_classes
        return -(target * torch.log(torch.softmax(logits, 1) + 1e-4)).sum(1).mean()
    return ref


# ----------------------------------------------------------------------------------------------------------
def build_model(cfg: TrainConfig, dataset: data_mod.Data) -> nn.Module:
    torch.manual_seed(cfg.seed)
    model = models_mod.build(cfg.model, dataset.num_classes, dataset.shape, cfg.bn_eps, cfg.bn_momentum)
    try:
        convert(model, method=cfg.method, init=cfg.init, exclude=["score"], stochastic=cfg.stochastic,
                sample=cfg.sample)
    except ValueError as e:
        fail(str(e).replace("\n", " "))
    return model


def _lr_factor(step: int, warmup: int, milestones: List[int], gamma: float) -> float:
    """MultiStepLR's factor (gamma per milestone passed) times a linear warm-up over ``warmup`` steps."""
    return min(1.0, (step + 1) / warmup if warmup > 0 else 1.0) * gamma ** bisect.bisect_right(milestones, step)


def build_optimizers(cfg: TrainConfig, model: nn.Module, steps_total: int):
    milestones = sorted({max(1, round(f * steps_total)) for f in cfg.lr_milestones if 0 < f < 1})
    warmup = round(cfg.warmup_epochs * steps_total / cfg.epochs)
    if cfg.method == "ogd":
        R = [p for n, p in model.named_parameters() if n.endswith(".R")]
        rest = [p for n, p in model.named_parameters() if not n.endswith(".R")]
        opts = [torch.optim.SGD(rest, lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay * cfg.ogd_weight_decay_scale),
                opt_fast.optim.CayleySGD(R, lr=cfg.ogd_lr, momentum=cfg.momentum)]
        gammas = [cfg.lr_gamma, cfg.ogd_gamma]
    else:
        opts = [torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)]
        gammas = [cfg.lr_gamma]
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, functools.partial(_lr_factor, warmup=warmup, milestones=milestones,
                                                                      gamma=g)) for o, g in zip(opts, gammas)]
    return opts, scheds


def _batches(n: int, batch: int, epoch: int, dist: Dist, seed: int):
    """Per-rank index batches of one epoch; the order depends only on (seed, epoch) (DistributedSampler
    semantics: generator seeded with seed + epoch); the last partial global batch is dropped (§1.5)."""
    sampler = torch.utils.data.DistributedSampler(range(n), num_replicas=dist.world, rank=dist.rank,
                                                  shuffle=True, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    idx = torch.tensor(list(iter(sampler)), dtype=torch.long)
    per_rank = max(1, batch // dist.world)
    steps = len(idx) // per_rank
    if steps == 0:
        fail(f"--batch-size {batch} is larger than the training set ({n} images)")
    return [idx[i * per_rank:(i + 1) * per_rank] for i in range(steps)]


@torch.no_grad()
def evaluate(model, x, y, device, batch=1000, batch_stats=False):
    """Top-1 accuracy in eval mode (``batch_stats``: BatchNorm normalising by each batch of ``batch``)."""
    model.eval()
    correct = 0
    with diagnostics.batch_statistics(model) if batch_stats else contextlib.nullcontext():
        for i in range(0, len(y), batch):
            logits = model(data_mod.normalize(x[i:i + batch]).to(device))
            correct += int((logits.argmax(1).cpu() == y[i:i + batch]).sum())
    model.train()
    return correct / max(1, len(y))


# options a resumed run must share with its checkpoint: the first always; the rest (optimizer, schedule, BN and
# loss settings, which the optimizer / scheduler state would otherwise silently override or mix) when the
# checkpoint's config records them
_RESUME_KEYS = ("method", "model", "dataset", "stochastic", "sample", "seed", "epochs", "batch_size")
_RESUME_KEYS_RECORDED = ("lr", "momentum", "weight_decay", "lr_milestones", "lr_gamma", "warmup_epochs",
                         "label_smoothing", "reference_loss", "bn_eps", "bn_momentum", "init", "ogd_lr", "ogd_gamma",
                         "ogd_weight_decay_scale", "orth_reg_weight", "orth_reg_penalty", "augment", "episode_epochs",
                         "reset_bn")


def _check_resume(cfg: TrainConfig, state) -> None:
    ckpt.check_format(state, cfg.resume, ckpt.CNN_FORMAT)
    saved = state.get("config", {})
    now = cfg.to_dict()
    for key in _RESUME_KEYS + tuple(k for k in _RESUME_KEYS_RECORDED if k in saved):
        if saved.get(key) != now[key]:
            fail(f"--resume {cfg.resume} was written with --{key.replace('_', '-')} {saved.get(key)!r}, this run "
                 f"has {now[key]!r}; a resumed run keeps its checkpoint's settings: pass the same options (or drop "
                 f"--{key.replace('_', '-')}) or start a fresh run")


# ----------------------------------------------------------------------------------------------------------
def train(cfg: TrainConfig, return_model: bool = False):
    """Train one model as configured; returns the metrics dict (and the model if return_model)."""
    explicit_warmup = cfg.warmup_epochs is not None  # the recipe's 2-epoch warm-up may outlast a 1-epoch test run
    cfg = recipes.resolve(cfg)
    if explicit_warmup and cfg.epochs is not None and cfg.warmup_epochs > cfg.epochs:
        fail(f"--warmup-epochs {cfg.warmup_epochs:g} is longer than the run (--epochs {cfg.epochs})")
    diagnostics.check_extras(cfg)  # before validate, which creates --out
    validate(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif cfg.device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # Small OPT models gain nothing from intra-op threads, and on a shared/loaded CPU spinning OpenMP
        # threads made a digits step 30x slower (3 s vs 0.09 s measured); --threads N overrides.
        torch.set_num_threads(1)
    dist = Dist(cfg.device)
    try:
        return _train(cfg, dist, return_model)
    finally:
        dist.close()


def _train(cfg: TrainConfig, dist: Dist, return_model: bool):
    device = torch.device(cfg.device)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    main = dist.rank == 0
    state = ckpt.load(cfg.resume) if cfg.resume else None
    if state is not None:
        _check_resume(cfg, state)
    out = cfg.out
    if main and cfg.resume and not out:
        print(f"opt_fast.train: warning: --resume without --out: this run saves no checkpoint or metrics (add "
              f"--out FOLDER, e.g. --out {os.path.dirname(os.path.abspath(cfg.resume))})", file=sys.stderr, flush=True)

    data = data_mod.load(cfg.dataset, cfg.data_dir,
                         synthetic_shape=(1, 8, 8) if cfg.model == "small" else (3, 32, 32))
    do_aug = cfg.augment if cfg.augment is not None else data.shape[1:] == (32, 32)

    model = build_model(cfg, data).to(device)
    energy0 = layer_energies(model)
    steps_per_epoch = len(_batches(len(data.y_train), cfg.batch_size, 0, dist, cfg.seed))
    opts, scheds = build_optimizers(cfg, model, steps_per_epoch * cfg.epochs)
    history, start_epoch = [], 0
    if state is not None:
        model.load_state_dict(state["model"])
        for o, s in zip(opts, state["optimizers"]):
            o.load_state_dict(s)
        for sc, s in zip(scheds, state["schedulers"]):
            sc.load_state_dict(s)
        set_rng_state(state["rng"])
        history, start_epoch, energy0 = state["history"], state["epoch"], state["energy0"]
    else:
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)

    net = model
    if dist.enabled:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    loss_fn = _loss_fn(cfg, data.num_classes)
    if main and out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=1)

    def save_checkpoint(epoch):
        if not (main and out):
            return
        ckpt.atomic_save({"format": "opt_fast.train/1", "config": cfg.to_dict(), "epoch": epoch,
                          "model": model.state_dict(), "optimizers": [o.state_dict() for o in opts],
                          "schedulers": [s.state_dict() for s in scheds], "rng": rng_state(),
                          "history": history, "energy0": energy0}, os.path.join(out, CKPT_NAME))

    last = cfg.stop_after or cfg.epochs
    model.train()
    for epoch in range(start_epoch, last):
        batches = _batches(len(data.y_train), cfg.batch_size, epoch, dist, cfg.seed)
        gen = torch.Generator().manual_seed((cfg.seed * 1_000_003 + epoch) * 1009 + dist.rank)
        tot_loss = tot_correct = tot_n = 0.0
        t0 = time.perf_counter()
        for i, idx in enumerate(batches):
            x = data.x_train[idx]
            if do_aug:
                x = data_mod.augment(x, gen)
            x, y = data_mod.normalize(x).to(device), data.y_train[idx].to(device)
            phase = "forward"
            try:
                logits = net(x)
                phase = "step (loss, backward, update)"
                loss = loss_fn(logits, y)
                if cfg.method == "orth_reg":
                    loss = loss + opt_fast.orth_reg_loss(model, weight=cfg.orth_reg_weight,
                                                         squared=cfg.orth_reg_penalty == "squared")
                for o in opts:
                    o.zero_grad(set_to_none=True)
                loss.backward()
                for o in opts:
                    o.step()
            except RuntimeError as e:  # LinAlgError (an SVD that does not converge), a rank-deficient P, ...
                step_failed(phase, f"epoch {epoch + 1} step {i + 1}", cfg.method, e, model,
                            os.path.join(out, CKPT_NAME) if out else cfg.resume)
            for s in scheds:
                s.step()
            lv = float(loss.detach())
            if not math.isfinite(lv):
                fail(f"loss became {lv} at epoch {epoch + 1} step {i + 1} (method {cfg.method}); lower --lr or "
                     f"raise --warmup-epochs")
            tot_loss += lv * len(y)
            tot_correct += float((logits.detach().argmax(1) == y).sum())
            tot_n += len(y)
            _progress(i + 1, len(batches), t0, lv, cfg.progress and main)
        step_time = (time.perf_counter() - t0) / len(batches)
        tot_loss, tot_correct, tot_n = dist.all_sum([tot_loss, tot_correct, tot_n], device)
        dist.average_bn_stats(model)
        test_acc = evaluate(model, data.x_test, data.y_test, device)
        energies = layer_energies(model)
        drift = {n: abs(energies[n] - energy0[n]) / energy0[n] for n in energies}
        rec = {"epoch": epoch + 1, "loss": tot_loss / tot_n, "train_acc": tot_correct / tot_n, "test_acc": test_acc,
               "time_per_step": step_time, "lr": opts[0].param_groups[0]["lr"],
               "energy": energies, "energy_drift": drift,
               "mean_energy_drift": float(np.mean(list(drift.values()))) if drift else 0.0}
        history.append(rec)
        if cfg.stochastic is not None and (epoch + 1) % cfg.episode_epochs == 0 and epoch + 1 < cfg.epochs:
            # S-OPT: end the episode after its test pass, as released (--reset-bn's BN reset must not reach it)
            g = torch.Generator().manual_seed(cfg.seed * 7919 + epoch)
            resample(model, reset_bn=cfg.reset_bn, generator=g)
        if main:
            print(f"epoch {epoch + 1}/{cfg.epochs} loss {rec['loss']:.4f} train {rec['train_acc']:.4f} "
                  f"test {test_acc:.4f} {step_time * 1e3:.1f} ms/step energy drift {rec['mean_energy_drift']:.2e}",
                  flush=True)
        if cfg.save_every and (epoch + 1) % cfg.save_every == 0:
            save_checkpoint(epoch + 1)

    save_checkpoint(len(history))
    warning = diagnostics.gap_warning(model, cfg, history, steps_per_epoch * len(history), evaluate, model,
                                      data.x_test, data.y_test, device) if main else None
    if warning:
        print(warning, file=sys.stderr, flush=True)
    metrics = {"config": cfg.to_dict(), "method": cfg.method, "model": cfg.model, "dataset": cfg.dataset,
               "world_size": dist.world, "epochs_done": len(history), "history": history,
               "energy0": energy0,
               "final_test_acc": history[-1]["test_acc"] if history else None,
               "best_test_acc": max(h["test_acc"] for h in history) if history else None,
               "max_energy_drift": {n: max(h["energy_drift"][n] for h in history) for n in energy0} if history else {},
               "orthogonality_error": diagnostics.orthogonality_error(model), "warnings": [warning] if warning else []}
    if main and out:
        with open(os.path.join(out, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1)
        from .plots import plot_run
        plot_run(metrics, out)
    if main and cfg.export:
        ckpt.atomic_save(merge(model).state_dict(), cfg.export)
    return (metrics, model) if return_model else metrics
