"""GPU-aware fine-grain (tile) pruning: the per-layer RMS rule number by number, cumulative stages,
masks that survive retraining, the exported plan against the exported weights, size accounting,
errors, and the gpu-fine recipes."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from tvm_scalpel import formats
from tvm_scalpel.models import build_model
from tvm_scalpel.target import hardware_spec
from tvm_scalpel.training import (GroupConfig, MagnitudeConfig, NodeConfig, Optim, PruneConfig, Stage, StageKind,
                                  TileConfig, TrainingError, TrainingPlan, expand_tiles, get_recipe, prepare, quick,
                                  recipe_names, run_recipe, scale_schedule, tile_keep)

from test_training_recipes import _synthetic

CUDA = TileConfig.for_target("cuda")


# ------------------------------------------------------------------ the rule
def test_tile_keep_by_hand():
    w = np.array([[1, 1, 0.1, 0.1, 3, 3],
                  [1, 1, 0.1, 0.1, 3, 3],
                  [2, 2, 0.5, 0.5, 0, 0],
                  [2, 2, 0.5, 0.5, 0, 0]])
    # 2×2 tiles, RMS [[1, 0.1, 3], [2, 0.5, 0]]: the zero tile goes first, then 0.1, then 0.5
    assert np.allclose(formats.tile_rms(w, 2, 2), [[1, 0.1, 3], [2, 0.5, 0]])
    assert tile_keep(w, 2, 2, 0.5).tolist() == [[True, False, True], [True, False, False]]
    assert tile_keep(w, 2, 2, 0.4).tolist() == [[True, False, True], [True, True, False]]  # round(2.4) = 2
    assert tile_keep(w, 2, 2, 0.0).all()
    assert tile_keep(w, 2, 2, 0.9).tolist() == [[False, False, True], [False, False, False]]  # round(5.4) = 5
    assert expand_tiles(tile_keep(w, 2, 2, 0.5), (4, 6), 2, 2).astype(int).tolist() == [
        [1, 1, 0, 0, 1, 1], [1, 1, 0, 0, 1, 1], [1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]]


def test_ragged_tiles_rank_by_rms_of_real_members_and_ties_by_order():
    # 3×5 weight in 2×2 tiles: grid 2×3; the last row block has one real row, the last column one column
    w = np.array([[0.2, 0.2, 0.3, 0.3, 0.4],
                  [0.2, 0.2, 0.3, 0.3, 0.4],
                  [0.3, 0.3, 0.2, 0.2, 0.1]])
    assert np.allclose(formats.tile_rms(w, 2, 2), [[0.2, 0.3, 0.4], [0.3, 0.2, 0.1]])  # padding not averaged in
    # prune 3: 0.1 (1,2), then the tied 0.2s in row-block-major order: (0,0) before (1,1)
    assert tile_keep(w, 2, 2, 0.5).tolist() == [[False, True, True], [True, False, False]]
    # prune 2: 0.1, then the first 0.2 only
    assert tile_keep(w, 2, 2, 2 / 6).tolist() == [[False, True, True], [True, True, False]]
    assert expand_tiles(tile_keep(w, 2, 2, 0.5), (3, 5), 2, 2).tolist() == [
        [False, False, True, True, True], [False, False, True, True, True], [True, True, False, False, False]]
    # a conv weight is flattened per filter first: (2, 1, 2, 2) → 2 × 4, grid 1×2 at 2×2 tiles
    conv = np.array([[[[1, 1], [0, 0]]], [[[1, 1], [0, 0]]]], dtype=float)
    assert tile_keep(conv, 2, 2, 0.5).tolist() == [[True, False]]


def test_rule_errors():
    w = np.ones((4, 16))
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(TrainingError, match=r"expected a fraction in \[0, 1\)"):
            tile_keep(w, 2, 8, bad)
    with pytest.raises(TrainingError, match="cannot cover a 4x16 weight"):
        expand_tiles(np.ones((2, 3), bool), (4, 16), 2, 8)


# ------------------------------------------------------------------ configuration
def test_tile_comes_from_hardware_spec_and_errors_are_clear():
    assert (CUDA.rows, CUDA.k) == hardware_spec("cuda").tile == (32, 8)
    h100 = TileConfig.for_target("nvidia/nvidia-h100")
    assert (h100.rows, h100.k) == hardware_spec("nvidia/nvidia-h100").tile
    for target in ("host", "cortex-m4"):
        with pytest.raises(TrainingError, match="needs a GPU target"):
            TileConfig.for_target(target)
    for bad in ({"rows": 0, "k": 8}, {"rows": 32, "k": -1}, {"rows": 32.0, "k": 8}):
        with pytest.raises(TrainingError, match="positive int"):
            TileConfig(**bad)
    with pytest.raises(TrainingError, match="group and tile; not both"):
        PruneConfig(group=GroupConfig(width=8), tile=CUDA)
    with pytest.raises(TrainingError, match="tile and magnitude; not both"):
        PruneConfig(tile=CUDA, magnitude=MagnitudeConfig())
    with pytest.raises(TrainingError, match="without TileConfig"):
        prepare(build_model("lenet-300-100"), PruneConfig(group=GroupConfig(width=8))).prune_tiles(0.5)


def test_default_selection_keeps_first_conv_and_classifier_dense():
    vgg = prepare(build_model("vgg16", width=0.25, in_channels=1), PruneConfig(tile=CUDA))
    assert vgg.tile_layers() == tuple(n for n in vgg.layers if n not in ("conv1_1", "fc3"))
    mlp = prepare(build_model("lenet-300-100"), PruneConfig(tile=CUDA))
    assert mlp.tile_layers() == ("fc1", "fc2")  # the first layer is a Linear: pruned
    every = prepare(build_model("lenet-5"), PruneConfig(tile=replace(CUDA, dense_first_conv=False,
                                                                     dense_classifier=False)))
    assert every.tile_layers() == ("conv1", "conv2", "fc1", "fc2")
    # under two tile columns of K: a tile is the whole row block; kept dense even when named
    net = nn.Sequential(nn.Linear(6, 40), nn.ReLU(), nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 10))
    named = prepare(net, PruneConfig(tile=TileConfig(32, 8, layers=("0", "2", "4"))))
    assert named.tile_layers() == ("2", "4")  # K = 6 < 2 × 8
    with pytest.raises(TrainingError, match=r"\['0'\]: not tile-pruned layers"):
        named.prune_tiles({"0": 0.5})
    with pytest.raises(TrainingError, match="not Conv2d/Linear"):
        prepare(net, PruneConfig(tile=TileConfig(32, 8, layers=("1",))))


# ------------------------------------------------------------------ the pruner
def _tile_counts(mask, rows, k):
    kept = formats.tile_mask(mask.astype(np.float32), rows, k)
    return int(kept.size - kept.sum()), kept.size


def test_prune_tiles_per_layer_cumulative_and_masks_survive_retraining():
    torch.manual_seed(0)
    model = build_model("lenet-300-100")
    pruner = prepare(model, PruneConfig(tile=CUDA))
    pruner.prune_tiles(0.5)
    for name in ("fc1", "fc2"):
        w = model.get_submodule(name).weight.detach().numpy()
        ref = expand_tiles(tile_keep(w, 32, 8, 0.5), w.shape, 32, 8)
        assert np.array_equal(pruner.weight_masks[name].numpy(), ref), name
    m1 = {n: pruner.weight_masks[n].numpy().copy() for n in ("fc1", "fc2")}
    # per layer: fc1 300×784 → 10 × 98 = 980 tiles, fc2 100×300 → 4 × 38 = 152 tiles
    assert _tile_counts(m1["fc1"], 32, 8) == (490, 980) and _tile_counts(m1["fc2"], 32, 8) == (76, 152)
    assert "fc3" not in pruner.weight_masks
    assert pruner.tile_sparsity() == 566 / 1132

    opt = torch.optim.SGD(pruner.param_groups(5e-4), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):  # momentum and weight decay push on pruned weights every step
        x, y = torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(pruner.model(x), y).backward()
        opt.step()
        pruner.step(opt)
        for name, m in m1.items():
            w = pruner.layers[name].weight.detach().numpy()
            assert (w[~m] == 0).all() and np.count_nonzero(w[m]) == m.sum(), name

    pruner.prune_tiles(0.8)
    for name in ("fc1", "fc2"):
        m2 = pruner.weight_masks[name].numpy()
        assert not (m2 & ~m1[name]).any(), name  # pruned tiles stay pruned
    assert _tile_counts(pruner.weight_masks["fc1"].numpy(), 32, 8) == (784, 980)
    assert _tile_counts(pruner.weight_masks["fc2"].numpy(), 32, 8) == (122, 152)  # round(121.6)
    assert pruner.tile_sparsity() == (784 + 122) / 1132

    before = pruner.weight_masks["fc1"].clone()
    pruner.prune_tiles({"fc2": 0.9})  # one layer only; fc1 keeps its mask
    assert torch.equal(pruner.weight_masks["fc1"], before)
    assert _tile_counts(pruner.weight_masks["fc2"].numpy(), 32, 8) == (137, 152)  # round(136.8)
    assert pruner.state_dict()["tile_sparsity"] == {"fc2": 0.9}
    with pytest.raises(TrainingError, match=r"\['fc3'\]: not tile-pruned"):
        pruner.prune_tiles({"fc3": 0.5})
    with pytest.raises(TrainingError, match="fraction"):
        pruner.prune_tiles(1.0)

    other = prepare(model, PruneConfig(tile=CUDA))  # masks and stage value come back from a state dict
    other.load_state_dict(pruner.state_dict())
    assert other.tile_sparsity() == pruner.tile_sparsity() and other.tile_sparsity_target == {"fc2": 0.9}


def _compacted(final, lp):
    """The compiler's matrix: kept rows × kept inputs of the exported weight, conv flattened per filter."""
    w = final.get_submodule(lp.name).weight.detach().numpy()
    w2 = w.reshape(w.shape[0], -1)
    per_in = int(np.prod(w.shape[2:])) if w.ndim == 4 else 1
    cols = np.arange(w2.shape[1]) if lp.kept_inputs is None else \
        (np.array(lp.kept_inputs)[:, None] * per_in + np.arange(per_in)).ravel()
    return w2[np.ix_(lp.kept_nodes, cols)]


def test_exported_plan_tiles_equal_tiles_of_exported_weights_with_node_pruning():
    torch.manual_seed(0)
    model = build_model("lenet-5")
    pruner = prepare(model, PruneConfig(node=NodeConfig(), tile=CUDA))
    with torch.no_grad():
        pruner.masks["conv1"].beta[[0, 3, 7]] = 0.0   # conv2 loses 3 of 20 input channels (75 columns)
        pruner.masks["conv2"].beta[1::5] = 0.0        # 10 of 50 filters; fc1 loses 10 × 16 inputs
    pruner.model(model.example_input(1))
    with pytest.raises(TrainingError, match="freeze the node masks"):
        pruner.prune_tiles(0.5)
    pruner.freeze_nodes()
    pruner.prune_tiles(0.6)
    pruner.model.eval()
    x = model.example_input(4)
    with torch.no_grad():
        masked = pruner.model(x)
    final, plan = pruner.finalize(recipe="test")
    with torch.no_grad():
        assert torch.allclose(final(x), masked, atol=1e-5)
    assert [lp.method for lp in plan.layers] == ["node", "tile", "tile", "node"]  # fc2: dense, narrower input
    conv2, fc1 = plan.layer("conv2"), plan.layer("fc1")
    assert conv2.tile == fc1.tile == (32, 8)
    assert len(conv2.kept_nodes) == 40 and len(conv2.kept_inputs) == 17
    assert conv2.tile_mask.shape == (2, 54)        # ceil(40 / 32) × ceil(17 · 25 / 8)
    assert fc1.tile_mask.shape == (16, 80)         # 500 rows × (40 · 16 = 640) inputs
    for lp in (conv2, fc1):
        wc = _compacted(final, lp)
        kept = lp.tile_mask.to_array()
        assert np.array_equal(kept, formats.tile_mask(wc, 32, 8)), lp.name
        assert kept.size - kept.sum() == round(0.6 * kept.size), lp.name
        assert lp.nonzero_weights == np.count_nonzero(wc)
        # values of every kept tile (ragged ones padded to 32 × 8), an int32 tile index each, row pointers
        nt, rb = int(kept.sum()), kept.shape[0]
        assert lp.index_bytes == nt * 4 + (rb + 1) * 4
        assert lp.stored_bytes == nt * 32 * 8 * 4 + lp.index_bytes + len(lp.kept_nodes) * 4  # + kept biases
        assert lp.stored_bytes == formats.encode_tiles(wc, 32, 8).sizes().total + len(lp.kept_nodes) * 4
    assert plan.tile_sparsity == pytest.approx(1 - (conv2.tile_mask.to_array().sum() + fc1.tile_mask.to_array().sum())
                                               / (2 * 54 + 16 * 80))
    back = TrainingPlan.from_json(plan.to_json())
    assert back == plan and back.layer("fc1").tile == (32, 8)
    assert np.array_equal(back.layer("fc1").tile_mask.to_array(), fc1.tile_mask.to_array())


def test_version_1_plans_still_load():
    v1 = {"model": "m", "recipe": None, "hardware": None, "value_bytes": 4, "index_bytes": 4, "version": 1,
          "layers": [{"name": "fc", "kind": "linear", "weight_shape": [2, 4], "conv_groups": 1, "num_nodes": 2,
                      "kept_nodes": [0, 1], "kept_inputs": None, "group_width": 4,
                      "group_mask": {"shape": [2, 1], "bits": "wA=="}, "unstructured": False,
                      "nonzero_weights": 8, "total_weights": 8, "dense_bytes": 40, "stored_bytes": 52,
                      "index_bytes": 12}]}
    plan = TrainingPlan.from_json(json.dumps(v1))
    lp = plan.layer("fc")
    assert lp.method == "group" and lp.tile is None and lp.tile_mask is None and plan.tile_sparsity is None
    assert lp.group_mask.to_array().tolist() == [[True], [True]]
    with pytest.raises(TrainingError, match="newer tvm_scalpel"):
        TrainingPlan.from_dict({**v1, "version": 3})


# ------------------------------------------------------------------ recipes
def test_gpu_fine_recipes():
    names = recipe_names()
    assert [n for n in names if n.endswith("/gpu-fine")] == [
        "lenet-300-100/gpu-fine", "lenet-5/gpu-fine", "convnet/gpu-fine", "vgg16/gpu-fine"]
    assert [n for n in names if n.startswith("vgg16")] == ["vgg16/dense", "vgg16/gpu-fine"]
    vgg = get_recipe("vgg16/gpu-fine")
    assert [(s.kind, s.value, s.epochs) for s in vgg.stages] == [
        (StageKind.DENSE, None, 30), *((StageKind.TILE, v, 10) for v in (0.5, 0.7, 0.8, 0.9))]
    assert vgg.tile() == (32, 8) and vgg.prune_config().tile == CUDA and vgg.target == "cuda"
    assert (vgg.data.name, vgg.data.pad_to, vgg.data.channels) == ("fashion-mnist", 32, 1)
    assert dict(vgg.model_kwargs) == {"in_channels": 1} and vgg.batch_size == 128
    assert vgg.prune_config().group is None and vgg.prune_config().node is None
    l5 = get_recipe("lenet-5/gpu-fine")
    assert [s.value for s in l5.stages if s.kind is StageKind.TILE] == [0.5, 0.7, 0.8, 0.9]
    assert {s.optim for s in l5.stages} == {get_recipe("lenet-5/dense").stages[0].optim}
    assert get_recipe("lenet-5/gpu-fine", target="nvidia/nvidia-h100").tile() == (32, 8)
    q = get_recipe("convnet/gpu-fine/quick")
    assert [s.kind for s in q.stages] == [StageKind.DENSE, StageKind.TILE, StageKind.TILE]
    with pytest.raises(TrainingError, match="lenet-5/gpu-fine: tile pruning needs a GPU target"):
        get_recipe("lenet-5/gpu-fine", target="host")
    with pytest.raises(TrainingError, match="no 'cpu' recipe for vgg16"):
        get_recipe("vgg16/cpu")
    with pytest.raises(TrainingError, match=r"expected \[0, 1\)"):
        Stage(StageKind.TILE, 1, Optim(lr=0.1), value=1.0)


def test_scale_schedule():
    s = scale_schedule(get_recipe("vgg16/gpu-fine"), 0.3)
    assert s.name == "vgg16/gpu-fine/x0.3"
    assert [(st.epochs, st.optim.lr_step) for st in s.stages] == [(9, 3)] + [(3, 2)] * 4  # 1.5 rounds up
    assert [st.optim.lr for st in s.stages] == [0.05] + [0.01] * 4
    assert [st.epochs for st in scale_schedule(get_recipe("lenet-5/gpu-fine"), 0.01).stages] == [1] * 5
    with pytest.raises(TrainingError, match="positive"):
        scale_schedule(s, 0)


def test_gpu_fine_run_records_every_stage(tmp_path):
    torch.set_num_threads(1)
    r = quick(get_recipe("lenet-300-100/gpu-fine"), epochs=1, max_group_stages=2)
    r = replace(r, stages=tuple(replace(s, optim=replace(s.optim, lr=0.02)) for s in r.stages), batch_size=32)
    res = run_recipe(r, data=(_synthetic(512, 0), _synthetic(128, 1)), checkpoint_dir=tmp_path)
    rows = res.stages()
    assert [row["label"] for row in rows] == ["dense", "tile(0.5)", "tile(0.7)"]
    # fc1: 490 then 686 of 980 tiles; fc2: 76 then round(106.4) = 106 of 152
    assert [row["tile_sparsity"] for row in rows] == [None, 566 / 1132, (686 + 106) / 1132]
    assert rows[0]["accuracy_loss"] == 0.0 and res.dense_accuracy > 0.9
    assert rows[-1]["test_accuracy"] == res.final_accuracy == res.masked_accuracy
    assert res.plan.tile_sparsity == rows[-1]["tile_sparsity"]
    for lp in res.plan.layers[:2]:  # retraining left every pruned tile exactly zero
        w = res.model.get_submodule(lp.name).weight.detach().numpy()
        assert np.array_equal(lp.tile_mask.to_array(), formats.tile_mask(w, 32, 8)), lp.name
    stage2 = TrainingPlan.from_json((tmp_path / "stages" / "stage-02.plan.json").read_text())
    assert stage2.tile_sparsity == rows[1]["tile_sparsity"] and stage2.recipe == f"{r.name}@stage2"
    assert sorted(p.name for p in (tmp_path / "stages").iterdir()) == [
        "stage-01.pt", "stage-01.state.pt",  # the dense stage's state: other recipes may start from it
        "stage-02.plan.json", "stage-02.pt", "stage-03.plan.json", "stage-03.pt"]
    w3 = torch.load(tmp_path / "stages" / "stage-03.pt")
    assert torch.equal(w3["fc1.weight"], res.model.fc1.weight)
