"""The training side of Scalpel in PyTorch: node masks, SIMD-aware groups, GPU tiles, magnitude pruning,
recipes.

Lifecycle (torch.ao style, on a deep copy; the caller's model and optimizer are never patched)::

    pruner = prepare(model, PruneConfig(node=NodeConfig(), group=GroupConfig.for_target("host")))
    opt = torch.optim.SGD(pruner.param_groups(weight_decay=1e-4), lr=1e-3, momentum=0.9)
    pruner.set_lambda(2e-4)
    for x, y in loader:                      # your own loop
        loss = F.cross_entropy(pruner.model(x), y)
        opt.zero_grad(); loss.backward(); opt.step()
        pruner.step(opt)                     # L1 on beta with opt's lr; re-apply weight masks
    pruner.freeze_nodes(); pruner.prune_groups(0.04)   # ... retrain ...
    pruned, plan = pruner.finalize()         # plain nn.Module with zeros + JSON-serialisable plan

GPU-aware fine-grain pruning: ``PruneConfig(tile=TileConfig.for_target("cuda"))`` and
``pruner.prune_tiles(0.5)`` (then 0.7, ... with retraining between: cumulative).
"""

from .errors import TrainingError
from .loop import EpochRecord, TrainResult, evaluate, run_recipe, train_epoch
from .mask import MaskRule, NodeMask, balance, hysteresis
from .plan import LayerPlan, PackedMask, TrainingPlan
from .pruner import (DropoutRescale, GroupConfig, GroupCriterion, LayerKind, MagnitudeConfig, MagnitudeCriterion,
                     NodeConfig, PruneConfig, Pruner, TileConfig, input_keep_mask, prepare)
from .recipes import (DataSpec, Optim, Recipe, Stage, StageKind, get_recipe, paper_recipe, quick,
                      recipe_names, scale_schedule)
from .rules import (expand_groups, expand_tiles, magnitude_keep, magnitude_keep_std, simd_group_keep,
                    simd_group_keep_sparsity, tile_keep)

__all__ = [
    "DataSpec", "DropoutRescale", "EpochRecord", "GroupConfig", "GroupCriterion", "LayerKind", "LayerPlan",
    "MagnitudeConfig", "MagnitudeCriterion", "MaskRule", "NodeConfig", "NodeMask", "Optim", "PackedMask", "PruneConfig",
    "Pruner", "Recipe", "Stage", "StageKind", "TileConfig", "TrainResult", "TrainingError", "TrainingPlan",
    "balance", "evaluate", "expand_groups", "expand_tiles", "get_recipe", "hysteresis", "input_keep_mask",
    "magnitude_keep", "magnitude_keep_std", "paper_recipe", "prepare", "quick", "recipe_names", "run_recipe",
    "scale_schedule", "simd_group_keep", "simd_group_keep_sparsity", "tile_keep", "train_epoch",
]
