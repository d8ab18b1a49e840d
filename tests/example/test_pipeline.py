"""Tests of pipeline.py and train.py (data, corruption, task, model, end-to-end training on fake data).

python -m pytest tests/example/test_pipeline.py -q
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from torch import nn

import pipeline
from example.checkpoints import checkpoint_path, load_model, save_model
from example.errors import PipelineError
from example.run import run_cli
from example.task import ClassificationTask
from pipeline import (
    CifarData,
    TensorBatches,
    construct_resnet9,
    corrupt_labels,
    get_cifar10,
    load_cifar10_arrays,
    load_noisy_labels,
    random_crop_flip,
)
from tests.helpers import REPO_ROOT, run, write_fake_cifar10

REAL_DATA = REPO_ROOT / "data"  # the real CIFAR-10 where a user put it (the scripts' default --dataset_dir)


# ---- Label corruption ----


def test_corruption_follows_the_documented_rule():
    """new = randint(0, 10) seeded 0; where it equals the old label, + randint(1, 9) from a fresh generator seeded 0
    over just those positions, modulo 10: here applied example by example, against corrupt_labels' vectorised form."""
    old = torch.randint(0, 10, (500,), generator=torch.Generator().manual_seed(5))
    k = 150  # ceil(0.3 * 500)
    draws = torch.randint(0, 10, (k,), generator=torch.Generator().manual_seed(0)).tolist()
    collisions = [i for i in range(k) if draws[i] == int(old[i])]
    shifts = torch.randint(1, 9, (len(collisions),), generator=torch.Generator().manual_seed(0)).tolist()
    expected = list(draws)
    for i, shift in zip(collisions, shifts, strict=True):
        expected[i] = (draws[i] + shift) % 10
    new = corrupt_labels(old, 0.3)
    assert len(collisions) > 3 and new[:k].tolist() == expected and torch.equal(new[k:], old[k:])


def test_corruption_test_vector_on_real_labels():
    if not (REAL_DATA / "cifar-10-batches-py").is_dir():
        pytest.skip(f"the real CIFAR-10 is not in {REAL_DATA}")
    _, old = load_cifar10_arrays(REAL_DATA, train=True)
    assert len(old) == 50_000
    assert old[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    new = corrupt_labels(old, 0.1)
    changed = (new != old).nonzero().flatten()
    assert changed.tolist() == list(range(5000))
    assert new[:10].tolist() == [4, 4, 3, 0, 3, 9, 7, 3, 7, 1]
    assert int(new[:5000].sum()) == 22_649


@pytest.mark.parametrize("n, p", [(1000, 0.1), (1000, 0.1234), (37, 0.5), (100, 0.07), (10, 1.0)])
def test_corruption_rules(n, p):
    old = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(3))
    new = corrupt_labels(old, p)
    k = math.ceil(round(p * n, 6))
    assert (new[:k] != old[:k]).all()
    assert ((new[:k] >= 0) & (new[:k] < 10)).all()
    assert torch.equal(new[k:], old[k:])
    assert torch.equal(corrupt_labels(old, p), new)  # deterministic
    assert torch.equal(old, torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(3)))  # not mutated
    assert new.dtype == torch.int64


def test_corruption_counts_and_limits():
    old = torch.zeros(100, dtype=torch.int64)
    assert int((corrupt_labels(old, 0.07) != old).sum()) == 7  # 0.07 * 100 is 7.000000000000001 in floats
    assert int((corrupt_labels(old, 0.123) != old).sum()) == 13  # fractional p * N rounds up
    assert torch.equal(corrupt_labels(old, 0.0), old)
    for bad in (-0.1, 1.5):
        with pytest.raises(PipelineError, match="between 0 and 1"):
            corrupt_labels(old, bad)


def test_corruption_applies_after_num_train(fake_cifar_dir):
    full = get_cifar10(fake_cifar_dir, "train", device="cpu")
    part = get_cifar10(fake_cifar_dir, "eval_train", num_train=50, corrupt_percentage=0.2, device="cpu")
    assert len(part) == 50
    assert torch.equal(part.clean_labels, full.labels[:50])
    assert part.changed.nonzero().flatten().tolist() == list(range(10))
    assert torch.equal(part.labels, corrupt_labels(full.labels[:50], 0.2))


def test_noisy_labels(tmp_path, fake_cifar_dir):
    path = tmp_path / "noisy.npz"
    noisy = (np.arange(200) % 10).astype(np.int64)
    clean = get_cifar10(fake_cifar_dir, "train", device="cpu").clean_labels.numpy()  # the file's must match
    np.savez(path, aggre_label=noisy, clean_label=clean)
    assert load_noisy_labels(path, "aggre_label").tolist() == noisy.tolist()
    with pytest.raises(PipelineError, match="available: aggre_label, clean_label"):
        load_noisy_labels(path, "worse_label")
    with pytest.raises(PipelineError, match="no noisy-label file"):
        load_noisy_labels(tmp_path / "missing.npz", "aggre_label")
    data = get_cifar10(fake_cifar_dir, "train", num_train=30, noisy_labels=path, device="cpu")
    assert data.labels.tolist() == noisy[:30].tolist()
    with pytest.raises(PipelineError, match="cannot be combined"):
        get_cifar10(fake_cifar_dir, "train", corrupt_percentage=0.1, noisy_labels=path, device="cpu")


# ---- Task ----


def test_margin_measurement_matches_float64():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 10, generator=gen) * 3
    labels = torch.randint(0, 10, (16,), generator=gen)
    got = ClassificationTask().compute_measurement((logits, labels), nn.Identity())
    l64 = logits.double()
    expected = 0.0
    for i in range(16):
        others = torch.cat([l64[i, : labels[i]], l64[i, labels[i] + 1 :]])
        expected -= float(l64[i, labels[i]] - torch.log(torch.exp(others).sum()))
    assert got.shape == ()
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_train_loss_is_summed_and_sampling_works():
    logits = torch.randn(8, 10, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(8) % 10
    task = ClassificationTask()
    loss = task.compute_train_loss((logits, labels), nn.Identity())
    assert float(loss) == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)) * 8, rel=1e-6)
    torch.manual_seed(0)
    sampled = task.compute_train_loss((logits.requires_grad_(), labels), nn.Identity(), sample=True)
    assert torch.isfinite(sampled) and sampled.requires_grad
    assert task.tracked_modules() is None


# ---- Augmentation and batches ----


def test_random_crop_flip_is_a_crop_of_the_padded_image():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (32, 3, 32, 32), dtype=torch.uint8, generator=gen)
    crops = random_crop_flip(images, torch.Generator().manual_seed(5))
    assert crops.shape == images.shape and crops.dtype == torch.uint8
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    flips = set()
    for b in range(len(images)):
        matches = []
        for dy in range(9):
            for dx in range(9):
                window = padded[b, :, dy : dy + 32, dx : dx + 32]
                for flip in (False, True):
                    if torch.equal(crops[b], window.flip(-1) if flip else window):
                        matches.append((dy, dx, flip))
        assert len(matches) == 1, f"image {b}: {matches}"
        flips.add(matches[0][2])
    assert flips == {False, True}


def _index_data(n: int) -> CifarData:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 32, 32).contiguous()
    labels = torch.arange(n)
    return CifarData(images, labels, labels.clone(), "train")


def test_tensor_batches_cover_each_example_once():
    data = _index_data(50)
    batches = TensorBatches(data, batch_size=7, shuffle=True, augment=True, seed=3)
    assert len(batches) == 8
    epochs = [torch.cat([y for _, y in batches]) for _ in range(2)]
    for seen in epochs:
        assert sorted(seen.tolist()) == list(range(50))
    assert not torch.equal(epochs[0], epochs[1])  # a new order each epoch
    again = torch.cat([y for _, y in TensorBatches(data, batch_size=7, shuffle=True, seed=3)])
    assert torch.equal(again, epochs[0])  # reproducible from the seed
    assert len(TensorBatches(data, batch_size=7, drop_last=True)) == 7
    assert sum(len(y) for _, y in TensorBatches(data, batch_size=7, drop_last=True)) == 49


@pytest.mark.parametrize("world", [2, 3])
def test_the_ranks_slices_are_slices_of_the_one_process_batches(world):
    # Order and augmentation alike: each image is cropped and flipped as one process would, so a run on several
    # processes sees the data one process sees (and the ranks' slices are not cropped alike).
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (23, 3, 32, 32), dtype=torch.uint8, generator=gen)
    data = CifarData(images, torch.arange(23), torch.arange(23), "train")
    one = list(TensorBatches(data, batch_size=8, shuffle=True, augment=True, seed=4))
    ranks = [list(TensorBatches(data, 8, shuffle=True, augment=True, seed=4, shard=(r, world))) for r in range(world)]
    for step, (x, y) in enumerate(one):
        for rank in range(world):
            sliced_x, sliced_y = ranks[rank][step]
            assert torch.equal(sliced_x, x[rank::world]) and torch.equal(sliced_y, y[rank::world])


def test_tensor_batches_plain_are_repeatable_and_normalised():
    data = _index_data(10)
    batches = TensorBatches(data, batch_size=4)
    first, second = list(batches), list(batches)
    assert [len(y) for _, y in first] == [4, 4, 2]
    for (x1, y1), (x2, y2) in zip(first, second, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    x, y = first[0]
    assert x.dtype == torch.float32 and x.shape == (4, 3, 32, 32)
    expected = (y[1].item() / 255.0 - pipeline.CIFAR_MEAN[0]) / pipeline.CIFAR_STD[0]
    assert float(x[1, 0, 0, 0]) == pytest.approx(expected, rel=1e-5)


# ---- Data loading ----


def test_loader_reads_fake_dataset(fake_cifar_dir):
    train = get_cifar10(fake_cifar_dir, "train", device="cpu")
    valid = get_cifar10(fake_cifar_dir, "valid", device="cpu")
    assert train.images.shape == (200, 3, 32, 32) and train.images.dtype == torch.uint8
    assert valid.images.shape == (100, 3, 32, 32)
    assert train.labels.dtype == torch.int64 and not train.changed.any()
    assert len(valid.subset(20)) == 20
    with pytest.raises(PipelineError):
        valid.subset(101)
    with pytest.raises(PipelineError, match="--num_train"):
        get_cifar10(fake_cifar_dir, "train", num_train=201, device="cpu")
    with pytest.raises(PipelineError, match="unknown split"):
        get_cifar10(fake_cifar_dir, "test", device="cpu")


def test_missing_data_offline_is_one_line(tmp_path, monkeypatch, capsys):
    import torchvision

    def no_network(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", no_network)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: get_cifar10(tmp_path / "nothing", "train", device="cpu"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert "copy cifar-10-batches-py/ into the dataset dir" in err


def test_processes_download_one_at_a_time_and_a_missing_file_says_what_to_do(tmp_path, monkeypatch):
    import threading

    import torchvision

    downloads = []

    def download(root, train, download):  # slow enough for the other thread to arrive while it runs
        downloads.append(root)
        time.sleep(0.3)
        write_fake_cifar10(root)

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", download)
    read = []
    threads = [
        threading.Thread(target=lambda: read.append(len(pipeline.load_cifar10_arrays(tmp_path, True)[1])))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(downloads) == 1 and read == [200, 200]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".download.lock", "cifar-10-batches-py"]  # renamed whole
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()  # an unpacking cut short
    with pytest.raises(PipelineError, match=r"data_batch_3: delete .*cifar-10-batches-py to have it downloaded"):
        pipeline.load_cifar10_arrays(tmp_path, True)


# ---- Model and checkpoints ----


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_the_recipes_sgd_makes_torch_sgd_weights_and_resumes_from_its_state(momentum):
    """example.sgd.SGD against torch.optim.SGD under LambdaLR (the update it replaces), float64, a channels-last
    conv and a linear layer, with weight decay: the same weights after 6 steps, also when restarted from its state
    after 3."""
    from example.sgd import SGD

    def model():
        torch.manual_seed(0)
        layers = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).double()
        return layers.to(memory_format=torch.channels_last)

    x = torch.randn(5, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 1, 0])
    schedule = lambda step: float(np.interp(step, [0.0, 1.2, 6.0], [0, 1, 0]))  # noqa: E731
    steps = 6

    def train(net, optimizer, begin, end, scheduler=None):
        for _ in range(begin, end):
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
        return net

    expected = model()
    reference = torch.optim.SGD(expected.parameters(), lr=0.3, momentum=momentum, weight_decay=0.05)
    train(expected, reference, 0, steps, torch.optim.lr_scheduler.LambdaLR(reference, schedule))

    found = model()
    train(found, SGD(found.parameters(), 0.3, momentum, 0.05, schedule), 0, steps)
    first, second = model(), model()
    optimizer = SGD(first.parameters(), 0.3, momentum, 0.05, schedule)
    train(first, optimizer, 0, 3)
    second.load_state_dict(first.state_dict())
    velocities, taken = optimizer.state()
    restarted = SGD(second.parameters(), 0.3, momentum, 0.05, schedule)
    restarted.load_state({name: v.contiguous().clone() for name, v in velocities.items()}, taken)
    train(second, restarted, 3, steps)
    assert taken == 3 and len(velocities) == (4 if momentum else 0)
    for net in (found, second):
        for (name, value), wanted in zip(net.state_dict().items(), expected.state_dict().values(), strict=True):
            assert torch.equal(value, wanted), (name, (value - wanted).abs().max())
    assert not torch.equal(expected[0].weight, model()[0].weight)  # it trained


def test_resnet9_state_dict_matches_original():
    model = construct_resnet9()
    keys = set(model.state_dict())
    for key in (
        "0.0.weight",
        "0.1.running_mean",
        "1.0.weight",
        "2.module.0.0.weight",
        "2.module.1.1.bias",
        "5.module.1.0.weight",
        "6.0.weight",
        "9.weight",
    ):
        assert key in keys
    assert len(keys) == 49
    assert sum(p.numel() for p in model.parameters()) == 2_274_880
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_inplace_relu_leaves_conv_inputs_and_outputs_intact():
    model = construct_resnet9().eval()
    saved, grads = [], []
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):

            def forward_hook(mod, inputs, output):
                saved.append((inputs[0], inputs[0].detach().clone(), output, output.detach().clone()))
                output.register_hook(grads.append)

            module.register_forward_hook(forward_hook)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ClassificationTask().compute_train_loss((x, torch.tensor([1, 2])), model).backward()
    assert len(saved) == 9 and len(grads) == 9
    for inp, inp_copy, out, out_copy in saved:
        assert torch.equal(inp.detach(), inp_copy) and torch.equal(out.detach(), out_copy)


def test_checkpoint_names_and_round_trip(tmp_path):
    assert checkpoint_path(tmp_path).name == "model.safetensors"
    assert checkpoint_path(tmp_path, 0.1).name == "model_corrupt_0.1.safetensors"
    assert checkpoint_path(tmp_path, noisy_labels_key="aggre_label").name == "model_noisy_aggre_label.safetensors"
    model = construct_resnet9()
    path = tmp_path / "sub" / "model.safetensors"
    save_model(model, path)
    assert [p.name for p in path.parent.iterdir()] == ["model.safetensors"]  # no temporary left behind
    loaded = load_model(path, "cpu")
    assert not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])
    with pytest.raises(PipelineError, match="run train.py first"):
        load_model(tmp_path / "missing.safetensors", "cpu")


# ---- train.py end to end ----


def test_train_help_and_bad_flags(tmp_path):
    assert "--corrupt_percentage" in run("train.py", "--help").stdout
    result = run("train.py", "--dataset_dir", str(tmp_path), "--corrupt_percentage", "2", expect=2)
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")


def test_a_training_state_saved_by_another_training_loop_is_discarded_with_its_reason(fake_cifar_dir, tmp_path):
    """A state of the loop before example/sgd.py (torch.optim's state dict and scheduler in its record, no step
    count) cannot restore the schedule: train.py says why in one line, trains from the start and writes the weights
    a run without it writes."""
    from safetensors.torch import load_file

    from influence import save_partial

    args = ["--dataset_dir", str(fake_cifar_dir), "--num_train", "8", "--num_test", "8", "--num_train_epochs", "1"]
    run("train.py", *args, "--checkpoint_dir", str(tmp_path / "fresh"))
    old = tmp_path / "old" / "model.partial.safetensors"
    weights = {f"model/{name}": value for name, value in construct_resnet9().state_dict().items()}
    record = {"optimizer_groups": [{"lr": 0.4, "params": [0]}], "optimizer_values": {}, "scheduler": {"last_epoch": 1}}
    save_partial(old, {**weights, "rng/cpu": torch.get_rng_state()}, {"epoch": 0, "step": 1, "run": record})
    result = run("train.py", *args, "--checkpoint_dir", str(old.parent))
    said = f"training: discarding {old} (it was saved by another version of the training loop); training from the start"
    assert said in result.stdout + result.stderr, result.stdout + result.stderr
    assert "resuming" not in result.stdout + result.stderr and not old.exists()
    trained, expected = load_file(old.parent / "model.safetensors"), load_file(tmp_path / "fresh" / "model.safetensors")
    assert trained.keys() == expected.keys() and all(torch.equal(trained[k], expected[k]) for k in expected)
