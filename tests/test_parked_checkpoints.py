"""benchmarks/train_recipes.py --park: a recipe's checkpoint is committed and a new checkout continues it."""

import sys
from pathlib import Path

import torch

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
    # the checkpoint and the dense stage another recipe can share; not every stage's weights
    assert parked == ["m__cpu/checkpoint.pt", "m__cpu/stages/stage-01.pt", "m__cpu/stages/stage-01.state.pt"]
    assert train_recipes.unpark(tmp_path / "new") == ["m__cpu"]
    assert torch.load(tmp_path / "new" / "m__cpu" / "checkpoint.pt") == {"stage": 3}
    torch.save({"stage": 4}, tmp_path / "new" / "m__cpu" / "checkpoint.pt")
    assert train_recipes.unpark(tmp_path / "new") == []  # a checkpoint already there is newer: left alone
    assert torch.load(tmp_path / "new" / "m__cpu" / "checkpoint.pt") == {"stage": 4}
