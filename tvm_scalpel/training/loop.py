"""Run a :class:`Recipe` end to end: dense training, pruning stages, finalize; with progress and resume.

Progress goes to this module's logger (one line per epoch: loss, accuracy, kept nodes, weight
density); a checkpoint is written after every epoch, and ``run_recipe(..., resume=True)`` continues
from the last one. Every stage's end is also kept (``stages/``: plan and weights), so a later choice
(e.g. the highest tile sparsity within a loss budget) can take that stage's model.

``device`` trains on a GPU when one is given; data batches follow the model, and the finalized model
comes back on the CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.nn import functional as F

from ..data import ImageSet, load_dataset
from ..models import build_model
from ..target import hardware_spec
from .errors import TrainingError
from .plan import TrainingPlan
from .pruner import Pruner, prepare
from .recipes import Recipe, Stage, StageKind

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
#: What a finished run leaves beside its checkpoint: the pruned model's weights and its TrainingPlan.
FINAL_WEIGHTS_NAME = "final_state_dict.pt"
PLAN_NAME = "plan.json"
STAGES_DIR = "stages"
STATE_SUFFIX = ".state.pt"  # stages/stage-NN.state.pt: what another recipe needs to continue from stage NN


def is_finished(checkpoint_dir: str | Path, recipe: "Recipe | None" = None) -> bool:
    """Whether a recipe's run in ``checkpoint_dir`` has finished (its final weights are written); with
    ``recipe``, also that the run is of this very recipe (not of an earlier definition, e.g. one stage
    shorter, which ``run_recipe`` would continue)."""
    path = Path(checkpoint_dir)
    if not (path / FINAL_WEIGHTS_NAME).is_file():
        return False
    if recipe is None:
        return True
    ck = torch.load(path / CHECKPOINT_NAME, weights_only=False, map_location="cpu")
    return ck["fingerprint"] == recipe_fingerprint(recipe)


@dataclass(frozen=True)
class EpochRecord:
    """One epoch's progress line."""

    stage: int
    stage_label: str
    epoch: int
    epochs: int
    lr: float
    train_loss: float
    train_accuracy: float
    test_accuracy: float
    kept_nodes: dict[str, str]
    weight_density: float
    seconds: float
    tile_sparsity: float | None = None  # pruned / all tiles of the tile-pruned layers
    threads: int | None = None  # torch's intra-op threads (None: recorded before this field existed)


@dataclass(frozen=True)
class TrainResult:
    """What a recipe produced: accuracies, the plan, the finalized model, and the time it took."""

    recipe: str
    dense_accuracy: float | None
    final_accuracy: float
    masked_accuracy: float
    plan: TrainingPlan
    history: tuple[EpochRecord, ...]
    wall_seconds: float
    model: nn.Module = field(repr=False, compare=False)

    def stages(self) -> list[dict[str, Any]]:
        """One row per stage, as it ended: test accuracy, loss against dense, weight density, tile sparsity."""
        ends: dict[int, EpochRecord] = {}
        for h in self.history:
            ends[h.stage] = h
        return [{"stage": i, "label": h.stage_label, "epochs": h.epochs, "test_accuracy": h.test_accuracy,
                 "accuracy_loss": None if self.dense_accuracy is None else self.dense_accuracy - h.test_accuracy,
                 "weight_density": h.weight_density, "tile_sparsity": h.tile_sparsity}
                for i, h in sorted(ends.items())]

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe, "dense_accuracy": self.dense_accuracy,
            "final_accuracy": self.final_accuracy, "masked_accuracy": self.masked_accuracy,
            "wall_seconds": self.wall_seconds, "plan_summary": self.plan.summary(),
            "stages": self.stages(), "history": [dataclasses.asdict(h) for h in self.history],
        }


def _device_of(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageSet, batch_size: int = 1000) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (0-1) of ``model`` on ``data``; restores the training flag."""
    was_training = model.training
    model.eval()
    device = _device_of(model)
    loss = correct = 0.0
    for x, y in data.batches(batch_size):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        out = model(x)
        loss += float(F.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
    model.train(was_training)
    return loss / len(data), correct / len(data)


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, data: ImageSet, batch_size: int,
                generator: torch.Generator, pruner: Pruner | None = None) -> tuple[float, float]:
    """One pass over ``data`` (batches moved to the model's device); ``pruner.step(optimizer)`` after
    every optimizer step."""
    model.train()
    device = _device_of(model)
    loss_sum = correct = 0.0
    for x, y in data.batches(batch_size, shuffle=True, generator=generator):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        out = model(x)
        loss = F.cross_entropy(out, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if pruner is not None:
            pruner.step(optimizer)
        loss_sum += loss.item() * len(y)
        correct += int((out.argmax(1) == y).sum())
    return loss_sum / len(data), correct / len(data)


def training_layout(model: nn.Module, device: torch.device) -> torch.memory_format:
    """The memory layout ``run_recipe`` trains ``model`` in: NHWC on the CPU when it has 2-D
    convolutions, whose oneDNN NHWC convolution and pooling kernels train LeNet-5 1.6x and ConvNet
    1.7x faster than NCHW here (1 thread, measured). Only where values sit in memory changes, never
    their indices; what training saves and returns is in the default layout."""
    if device.type == "cpu" and any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return torch.channels_last
    return torch.contiguous_format


def recipe_fingerprint(recipe: Recipe) -> str:
    """Hash of the recipe, so a checkpoint is never resumed under a different schedule."""
    return hashlib.sha256(json.dumps(recipe.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]


def _resumable_prefix(recipe: Recipe, ck: dict[str, Any]) -> int | None:
    """How many of ``recipe``'s leading stages the checkpoint's recipe had, when that recipe is this one
    cut short (everything else equal): training it further is what this recipe would have done. None if
    the checkpoint belongs to another schedule."""
    for n in range(len(recipe.stages), 0, -1):
        prefix = dataclasses.replace(recipe, stages=recipe.stages[:n])
        if recipe_fingerprint(prefix) == ck["fingerprint"]:
            # the pruner's state only carries over when the later stages need no other pruner
            same_pruner = ck["pruner"] is None or prefix.prune_config() == recipe.prune_config()
            return n if same_pruner else None
    return None


def load_data(recipe: Recipe) -> tuple[ImageSet, ImageSet]:
    d = recipe.data
    train = load_dataset(d.name, "train", pad_to=d.pad_to, channels=d.channels, subset=d.train_subset)
    test = load_dataset(d.name, "test", pad_to=d.pad_to, channels=d.channels, subset=d.test_subset)
    return train, test


def _optimizer(params: Any, stage: Stage) -> tuple[torch.optim.Optimizer, Any]:
    o = stage.optim
    if isinstance(params, list) and params and isinstance(params[0], dict):
        groups = params
    else:
        groups = [{"params": list(params), "weight_decay": o.weight_decay}]
    opt = torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum)
    sched = torch.optim.lr_scheduler.StepLR(opt, o.lr_step, o.lr_gamma) if o.lr_step else None
    return opt, sched


def _begin_stage(pruner: Pruner, stage: Stage) -> None:
    """The transition into a pruning stage (not repeated when resuming inside the stage)."""
    if stage.kind is StageKind.NODE:
        if stage.node_lambda_linear is None:
            pruner.set_lambda(stage.node_lambda)
        else:
            pruner.set_lambda({n: (stage.node_lambda_linear if isinstance(pruner.layers[n], nn.Linear)
                                   else stage.node_lambda) for n in pruner.masks})
        return
    if pruner.masks and not pruner.nodes_frozen:
        pruner.freeze_nodes()
    if stage.kind is StageKind.GROUP:
        pruner.prune_groups(float(stage.value))
    elif stage.kind is StageKind.MAGNITUDE:
        pruner.prune_magnitude(float(stage.value))
    elif stage.kind is StageKind.TILE:
        pruner.prune_tiles(float(stage.value))


def _data_key(train: Any, test: Any) -> str:
    """Hash of the training and test sets as the loop sees them (pixels, labels, normalisation)."""
    h = hashlib.sha256()
    for part in (train, test):
        for name in ("images", "labels", "x", "y"):
            t = getattr(part, name, None)
            if isinstance(t, torch.Tensor):
                h.update(name.encode() + t.contiguous().cpu().numpy().tobytes())
        h.update(repr([getattr(part, a, None) for a in ("mean", "std", "pad_to", "channels")]).encode())
    return h.hexdigest()[:16]


def dense_prefix_key(recipe: Recipe, n: int, data_key: str) -> str | None:
    """Key of the model after the recipe's first ``n`` stages when they are all dense (else None): the
    same model, seed, data and dense schedule give the same weights and data order, whatever follows."""
    prefix = recipe.stages[:n]
    if not prefix or any(s.kind is not StageKind.DENSE for s in prefix):
        return None
    d = recipe.to_dict()
    payload = {"model": d["model"], "model_kwargs": d["model_kwargs"], "seed": d["seed"], "data": data_key,
               "stages": d["stages"][:n], "batch": [recipe.stage_batch_size(st) for st in prefix]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _shared_prefix(recipe: Recipe, share_from: Path, data_key: str) -> tuple[int, Path] | None:
    """The longest run of leading dense stages another recipe under ``share_from`` already trained."""
    for n in range(len(recipe.stages), 0, -1):
        key = dense_prefix_key(recipe, n, data_key)
        if key is None:
            continue
        for state in sorted(Path(share_from).glob(f"*/{STAGES_DIR}/stage-{n:02d}{STATE_SUFFIX}")):
            if torch.load(state, weights_only=False)["key"] == key:
                return n, state
    return None


def _start_after_shared(n: int, state_path: Path, model: nn.Module, gen: torch.Generator,
                        own: Path) -> tuple[int, list[EpochRecord]]:
    """Load another recipe's model, data-order RNG and history after its dense stage ``n``, and copy
    its stage ends 1..n into this recipe's own stages folder (every stage's end stays there)."""
    state = torch.load(state_path, weights_only=False)
    model.load_state_dict(torch.load(state_path.parent / f"stage-{n:02d}.pt",
                                     map_location=next(model.parameters()).device))
    gen.set_state(state["rng"])
    own.mkdir(parents=True, exist_ok=True)
    for i in range(1, n + 1):
        for suffix in (".pt", STATE_SUFFIX):
            src = state_path.parent / f"stage-{i:02d}{suffix}"
            if src.is_file() and src.parent != own:
                shutil.copyfile(src, own / src.name)
    return n, [EpochRecord(**h) for h in state["history"]]


def _save_stage(pruner: Pruner | None, model: nn.Module, out: Path, si: int, recipe: Recipe, hw: Any,
                state: dict | None = None) -> None:
    """The model as stage ``si`` left it: finalized weights (CPU) and, when pruning, the plan; after a
    run of dense stages also ``state`` (data-order RNG, history) so other recipes can start from it."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"stage-{si + 1:02d}"
    if pruner is None:
        torch.save({k: v.cpu().contiguous() for k, v in model.state_dict().items()}, stem.with_suffix(".pt"))
        if state is not None:
            torch.save(state, out / f"{stem.name}{STATE_SUFFIX}")
        return
    final, plan = pruner.finalize(recipe=f"{recipe.name}@stage{si + 1}", hardware=hw)
    torch.save({k: v.cpu().contiguous() for k, v in final.state_dict().items()}, stem.with_suffix(".pt"))
    stem.with_suffix(".plan.json").write_text(plan.to_json(indent=1))


def run_recipe(recipe: Recipe, *, checkpoint_dir: str | Path | None = None, resume: bool = True,
               data: tuple[ImageSet, ImageSet] | None = None,
               on_epoch: Callable[[EpochRecord], None] | None = None,
               device: str | torch.device = "cpu", share_from: str | Path | None = None) -> TrainResult:
    """Train ``recipe`` on ``device`` and return the finalized model (on the CPU) with its plan.

    ``data`` injects (train, test) sets (tests use small ones); otherwise the recipe's real dataset
    is loaded. With ``checkpoint_dir`` a checkpoint is written after every epoch and, with
    ``resume``, training continues from it (only if the recipe is the same); every stage's end is
    kept in ``checkpoint_dir/stages/stage-NN.{pt,plan.json}``. ``share_from``: a folder of other
    recipes' checkpoint folders; a fresh run whose leading dense stages one of them already trained
    (same model, seed, data and dense schedule: ``dense_prefix_key``) starts after them, exactly as if
    it had trained them itself (the LeNet-5 recipes share their 60 dense epochs).

    Trains with denormal floats flushed to zero (``flush_denormals``).
    """
    with flush_denormals():
        return _run_recipe(recipe, checkpoint_dir=checkpoint_dir, resume=resume, data=data, on_epoch=on_epoch,
                           device=device, share_from=share_from)


@contextlib.contextmanager
def flush_denormals() -> Iterator[None]:
    """Denormal floats flushed to zero (FTZ/DAZ) inside, off again after. A pruned net's activations and
    gradients drift into the denormal range, where x86 arithmetic on them is many times slower: ConvNet's
    mcu-layer recipe at 90 % zero pairs went from 30 s to 135 s an epoch on 2 cores, and a training step
    of that model took 0.51 s with denormals, 0.12 s flushed. Only values below 1.2e-38 change."""
    flushed = torch.set_flush_denormal(True)  # False where the CPU cannot flush: nothing changed then
    try:
        yield
    finally:
        if flushed:
            torch.set_flush_denormal(False)


def _run_recipe(recipe: Recipe, *, checkpoint_dir: str | Path | None = None, resume: bool = True,
                data: tuple[ImageSet, ImageSet] | None = None,
                on_epoch: Callable[[EpochRecord], None] | None = None,
                device: str | torch.device = "cpu", share_from: str | Path | None = None) -> TrainResult:
    """The body of ``run_recipe``."""
    t0 = time.perf_counter()
    device = torch.device(device)
    train, test = data if data is not None else load_data(recipe)
    torch.manual_seed(recipe.seed)
    model = build_model(recipe.model, **dict(recipe.model_kwargs)).to(device)
    model = model.to(memory_format=training_layout(model, device))
    if tuple(model.input_shape) != train.image_shape:
        raise TrainingError(f"{recipe.model} expects inputs {model.input_shape}, the data gives "
                            f"{train.image_shape}; set DataSpec(pad_to=..., channels=...)")
    config = recipe.prune_config()
    fingerprint = recipe_fingerprint(recipe)
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir else None
    gen = torch.Generator().manual_seed(recipe.seed)
    pruner: Pruner | None = None
    history: list[EpochRecord] = []
    dense_acc: float | None = None
    start_stage = start_epoch = 0
    elapsed_before = 0.0
    opt_state = sched_state = None
    hw = hardware_spec(recipe.target).to_dict() if recipe.target is not None else None

    if ckpt_path is not None and resume and ckpt_path.is_file():
        ck = torch.load(ckpt_path, weights_only=False, map_location="cpu")
        prefix = _resumable_prefix(recipe, ck)
        if prefix is None:
            raise TrainingError(f"{ckpt_path} was written by a different recipe ({ck['recipe']!r}); "
                                "use another checkpoint_dir or resume=False")
        if prefix < len(recipe.stages):
            logger.info("%s: the checkpoint is this recipe's first %d stages; continuing with the rest",
                        recipe.name, prefix)
        if ck["pruner"] is not None:
            pruner = prepare(model, config, name=recipe.model)
            pruner.load_state_dict(ck["pruner"])
        else:
            model.load_state_dict(ck["model"])
        start_stage, start_epoch = ck["stage"], ck["epoch"]
        opt_state, sched_state = ck["optimizer"], ck["scheduler"]
        history = [EpochRecord(**h) for h in ck["history"]]
        dense_acc = ck["dense_accuracy"]
        elapsed_before = ck["elapsed"]
        gen.set_state(ck["rng"])
        if dense_acc is None and 0 < start_stage < len(recipe.stages) and start_epoch == 0 and \
                recipe.stages[start_stage].kind is not StageKind.DENSE:
            dense_acc = history[-1].test_accuracy  # a dense-only recipe, now continued with pruning
        if start_stage >= len(recipe.stages):
            logger.info("%s: finished run, read back from %s", recipe.name, ckpt_path)
        else:
            logger.info("%s: resuming at stage %d epoch %d from %s", recipe.name, start_stage, start_epoch, ckpt_path)
    data_key = _data_key(train, test) if ckpt_path is not None else ""
    if share_from is not None and ckpt_path is not None and start_stage == start_epoch == 0:
        shared = _shared_prefix(recipe, Path(share_from), data_key)
        if shared is not None:
            start_stage, history = _start_after_shared(*shared, model, gen, ckpt_path.parent / STAGES_DIR)
            if start_stage < len(recipe.stages) and recipe.stages[start_stage].kind is not StageKind.DENSE:
                dense_acc = history[-1].test_accuracy
            logger.info("%s: stages 1-%d shared with %s (same dense schedule, data and seed)", recipe.name,
                        start_stage, shared[1].parent.parent)

    was_finished = start_stage == len(recipe.stages)
    for si in range(start_stage, len(recipe.stages)):
        stage = recipe.stages[si]
        if stage.kind is not StageKind.DENSE and pruner is None:
            pruner = prepare(model, config, name=recipe.model)
        first = si > start_stage or start_epoch == 0
        if pruner is not None and stage.kind is not StageKind.DENSE and first:
            _begin_stage(pruner, stage)
        net = pruner.model if pruner is not None else model
        if pruner is not None and stage.kind is StageKind.DENSE:
            raise TrainingError(f"{recipe.name}: dense stages must come before every pruning stage")
        opt, sched = _optimizer(pruner.param_groups(stage.optim.weight_decay) if pruner else net.parameters(),
                                stage)
        if not first and opt_state is not None:
            opt.load_state_dict(opt_state)
            if sched is not None and sched_state is not None:
                sched.load_state_dict(sched_state)
        e0 = 0 if first else start_epoch
        for epoch in range(e0, stage.epochs):
            te = time.perf_counter()
            lr = opt.param_groups[0]["lr"]
            loss, acc = train_epoch(net, opt, train, recipe.stage_batch_size(stage), gen, pruner)
            if sched is not None:
                sched.step()
            _, test_acc = evaluate(net, test)
            rec = EpochRecord(
                stage=si, stage_label=stage.label, epoch=epoch + 1, epochs=stage.epochs, lr=lr,
                train_loss=loss, train_accuracy=acc, test_accuracy=test_acc,
                kept_nodes=pruner.kept_summary() if pruner else {},
                weight_density=pruner.weight_density() if pruner else 1.0,
                seconds=time.perf_counter() - te,
                tile_sparsity=pruner.tile_sparsity() if pruner else None,
                threads=torch.get_num_threads(),
            )
            history.append(rec)
            logger.info("[%s] stage %d/%d %s epoch %d/%d lr %.3g loss %.4f train %.2f%% test %.2f%% "
                        "kept %s weights %.2f%% (%.1fs)", recipe.name, si + 1, len(recipe.stages),
                        stage.label, epoch + 1, stage.epochs, lr, loss, 100 * acc, 100 * test_acc,
                        rec.kept_nodes or "-", 100 * rec.weight_density, rec.seconds)
            if stage.kind is StageKind.DENSE and si + 1 < len(recipe.stages) and \
                    recipe.stages[si + 1].kind is not StageKind.DENSE and epoch + 1 == stage.epochs:
                dense_acc = test_acc
            if ckpt_path is not None:
                last = epoch + 1 == stage.epochs
                if last:  # before the checkpoint that marks the stage done, so a resume never lacks it
                    key = dense_prefix_key(recipe, si + 1, data_key)
                    state = None if key is None else {"key": key, "recipe": recipe.name, "rng": gen.get_state(),
                                                      "history": [dataclasses.asdict(h) for h in history]}
                    _save_stage(pruner, model, ckpt_path.parent / STAGES_DIR, si, recipe, hw, state)
                ckpt_path.parent.mkdir(parents=True, exist_ok=True)
                torch.save({
                    "recipe": recipe.name, "fingerprint": fingerprint,
                    "stage": si + 1 if last else si, "epoch": 0 if last else epoch + 1,
                    "model": None if pruner else model.state_dict(),
                    "pruner": pruner.state_dict() if pruner else None,
                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict() if sched else None,
                    "history": [dataclasses.asdict(h) for h in history], "dense_accuracy": dense_acc,
                    "elapsed": elapsed_before + time.perf_counter() - t0, "rng": gen.get_state(),
                }, ckpt_path.with_suffix(".tmp"))
                ckpt_path.with_suffix(".tmp").replace(ckpt_path)
            if on_epoch is not None:
                on_epoch(rec)  # after the checkpoint: what the callback sees is already saved
        start_epoch = 0
        opt_state = sched_state = None

    if pruner is None:
        pruner = prepare(model, config, name=recipe.model)
    if dense_acc is None and all(s.kind is StageKind.DENSE for s in recipe.stages):
        dense_acc = evaluate(pruner.model, test)[1]
    _, masked_acc = evaluate(pruner.model, test)
    final, plan = pruner.finalize(recipe=recipe.name, hardware=hw)
    _, final_acc = evaluate(final, test)
    final = final.cpu().to(memory_format=torch.contiguous_format)
    wall = elapsed_before + time.perf_counter() - t0
    logger.info("[%s] done: dense %s, pruned %.2f%% (masked %.2f%%), size %.2f%% of dense, %.0fs",
                recipe.name, "-" if dense_acc is None else f"{100 * dense_acc:.2f}%", 100 * final_acc,
                100 * masked_acc, 100 * plan.size_ratio, wall)
    out = Path(checkpoint_dir) if checkpoint_dir is not None else None
    # A finished run read back (a parked checkpoint) keeps the files it was trained with: rewriting them
    # would stamp this host's hardware into the plan and dirty a committed checkout.
    if out is not None and not (was_finished and is_finished(out) and (out / PLAN_NAME).is_file()):
        (out / PLAN_NAME).write_text(plan.to_json(indent=1))
        torch.save(final.state_dict(), out / FINAL_WEIGHTS_NAME)
    return TrainResult(recipe=recipe.name, dense_accuracy=dense_acc, final_accuracy=final_acc,
                       masked_accuracy=masked_acc, plan=plan, history=tuple(history), wall_seconds=wall,
                       model=final)
