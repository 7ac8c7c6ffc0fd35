"""benchmarks/train_recipes.py --park: a recipe's checkpoint is committed and a new checkout continues it."""

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tvm_scalpel.training.recipes import Stage

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import train_recipes


def test_park_then_unpark_restores_the_checkpoint_and_shareable_stages(tmp_path, monkeypatch):
    monkeypatch.setattr(train_recipes, "PARKED", tmp_path / "parked")
    stages = tmp_path / "run" / "m__cpu" / "stages"
    stages.mkdir(parents=True)
    torch.save({"stage": 3}, stages.parent / "checkpoint.pt")
    for name in ("stage-01.pt", "stage-01.state.pt", "stage-02.pt", "stage-02.plan.json"):
        (stages / name).write_bytes(name.encode())
    train_recipes.park("m__cpu", tmp_path / "run")
    parked = sorted(p.relative_to(tmp_path / "parked").as_posix() for p in (tmp_path / "parked").rglob("*.*"))
    # the checkpoint, the dense stage another recipe can share and the stages' plans; not every stage's weights
    assert parked == ["m__cpu/checkpoint.pt", "m__cpu/stages/stage-01.pt", "m__cpu/stages/stage-01.state.pt",
                      "m__cpu/stages/stage-02.plan.json"]
    assert train_recipes.unpark(tmp_path / "new") == ["m__cpu"]
    assert torch.load(tmp_path / "new" / "m__cpu" / "checkpoint.pt") == {"stage": 3}
    torch.save({"stage": 4}, tmp_path / "new" / "m__cpu" / "checkpoint.pt")
    assert train_recipes.unpark(tmp_path / "new") == []  # a checkpoint already there is newer: left alone
    assert torch.load(tmp_path / "new" / "m__cpu" / "checkpoint.pt") == {"stage": 4}


def test_node_phase_reports_where_a_cpu_recipes_node_stages_ended(tmp_path, monkeypatch):
    """A CPU recipe's node phase (its last retrain stage) is read back from the run: that stage's own plan and
    last epoch, not the final model's; nothing before that stage has ended."""
    from test_training_recipes import _synthetic, _tiny_recipe

    torch.set_num_threads(1)
    monkeypatch.setattr(train_recipes, "ROOT", tmp_path)
    recipe = _tiny_recipe()
    res = train_recipes.run_recipe(recipe, data=(_synthetic(512, 0), _synthetic(128, 1)), checkpoint_dir=tmp_path / "r")
    history = res.to_dict()["history"]
    stages = tmp_path / "r" / "stages"
    retrain = max(i for i, s in enumerate(recipe.stages) if s.kind is train_recipes.StageKind.RETRAIN)
    assert retrain < len(recipe.stages) - 1  # group stages follow, so the final plan is another one
    report = train_recipes.node_phase(recipe, history, res.dense_accuracy, stages)
    own = train_recipes.TrainingPlan.from_json((stages / f"stage-{retrain + 1:02d}.plan.json").read_text())
    end = [h for h in history if h["stage"] == retrain][-1]
    assert report["stage"] == retrain and report["test_accuracy"] == end["test_accuracy"]
    assert report["accuracy_loss"] == res.dense_accuracy - end["test_accuracy"]
    assert report["kept_nodes"] == {lp.name: [len(lp.kept_nodes), lp.num_nodes] for lp in own.layers}
    assert report["weight_density"] == own.weight_density != res.plan.weight_density
    assert report["bars"]["hidden_nodes_kept"] == pytest.approx(
        sum(len(lp.kept_nodes) for lp in own.layers[:-1]) / sum(lp.num_nodes for lp in own.layers[:-1]))
    # a retrain after the group stages (ConvNet's final one) is not the node phase's
    final = Stage(train_recipes.StageKind.RETRAIN, 1, recipe.stages[-1].optim)
    extended = replace(recipe, stages=(*recipe.stages, final))
    assert train_recipes.node_phase(extended, history, res.dense_accuracy, stages) == report
    unfinished = [h for h in history if h["stage"] < retrain]
    assert train_recipes.node_phase(recipe, unfinished, res.dense_accuracy, stages) is None
