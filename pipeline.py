"""The CIFAR-10 / ResNet-9 example's model and data, shared by every script (as in the original example).

Not run directly; imported by train.py, analyze.py and the other scripts:

    from pipeline import construct_resnet9, get_cifar10, TensorBatches

Checkpoints, the influence task and the device choice are in the example package (example/checkpoints.py,
example/task.py, example/devices.py).
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

try:
    import fcntl
except ImportError:  # not on Windows: downloads are then not serialised (each is renamed into place whole)
    fcntl = None

from example.devices import get_device
from example.errors import PipelineError
from example.label_files import ArraysOnlyUnpickler, LabelFileError, RefusedPickle, read_label_arrays
from influence import first_line

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.247, 0.243, 0.261)
NUM_CLASSES = 10
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
BATCHES_FOLDER = "cifar-10-batches-py"
SPLITS = ("train", "eval_train", "valid")
MAKE_DATA_HINT = f"run once with internet (torchvision downloads it), or copy {BATCHES_FOLDER}/ into the dataset dir"


# ---- Model ----


def conv_bn(c_in: int, c_out: int, kernel_size: int = 3, stride: int = 1, padding: int = 1) -> nn.Module:
    # Inplace ReLU only ever overwrites BatchNorm's output, never a Conv2d's input or output, so the
    # influence engine's hooks on convolutions see untouched tensors.
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size, stride, padding, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class Mul(nn.Module):
    def __init__(self, weight: float):
        super().__init__()
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


class Flatten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.size(0), -1)


class Residual(nn.Module):
    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.module(x)


def construct_resnet9() -> nn.Module:
    """ResNet-9 with the original example's module tree, so state_dict keys (and checkpoints) interchange."""
    return nn.Sequential(
        conv_bn(3, 64, kernel_size=3, stride=1, padding=1),
        conv_bn(64, 128, kernel_size=5, stride=2, padding=2),
        Residual(nn.Sequential(conv_bn(128, 128), conv_bn(128, 128))),
        conv_bn(128, 256, kernel_size=3, stride=1, padding=1),
        nn.MaxPool2d(2),
        Residual(nn.Sequential(conv_bn(256, 256), conv_bn(256, 256))),
        conv_bn(256, 128, kernel_size=3, stride=1, padding=0),
        nn.AdaptiveMaxPool2d((1, 1)),
        Flatten(),
        nn.Linear(128, NUM_CLASSES, bias=False),
        Mul(0.2),
    )


# ---- Data: files ----


CIFAR_PICKLE_TYPES = "only arrays, lists, dicts, strings and numbers are read"


def _unpickle_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    # The official CIFAR-10 python format is a pickle: read with the restricted unpickler of the label files,
    # which builds containers, strings, numbers and numpy arrays and refuses whatever else the pickle names
    # before calling it (a pickle naming os.system would otherwise run it).
    try:
        with open(path, "rb") as f:
            # "bytes": the official (Python 2) pickles' strings stay bytes, so their keys are b"data", b"labels".
            entry = ArraysOnlyUnpickler(f, encoding="bytes", allowed=CIFAR_PICKLE_TYPES).load()
    except FileNotFoundError as e:
        raise PipelineError(
            f"missing {path}: delete {path.parent} to have it downloaded again (with internet), or copy the "
            f"complete {BATCHES_FOLDER}/ into the dataset dir"
        ) from e
    except RefusedPickle as e:
        raise PipelineError(f"cannot read CIFAR-10 batch {path}: {e}") from None
    except Exception as e:  # truncated file, not a pickle
        raise PipelineError(f"cannot read CIFAR-10 batch {path} ({first_line(e, typed=True)})") from e
    if not isinstance(entry, dict):
        raise PipelineError(f"CIFAR-10 batch {path} holds a {type(entry).__name__}, not a dict of data and labels")
    # The official (Python 2) pickles have bytes keys; copies written by Python 3 have str keys.
    entry = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
    missing = [key for key in ("data", "labels") if key not in entry]
    if missing:
        found = ", ".join(repr(key) for key in entry) or "nothing"
        raise PipelineError(f"CIFAR-10 batch {path} has no {' or '.join(missing)} entry (it has {found})")
    try:
        data, labels = np.asarray(entry["data"]), np.asarray(entry["labels"])
    except (ValueError, TypeError) as e:  # ragged lists
        raise PipelineError(f"unexpected CIFAR-10 batch layout in {path}: {first_line(e)}") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or not np.issubdtype(data.dtype, np.integer):
        raise PipelineError(
            f"unexpected CIFAR-10 batch layout in {path}: data is {data.dtype} {data.shape}, not uint8 images "
            f"[N, {3 * 32 * 32}]"
        )
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
        raise PipelineError(
            f"unexpected CIFAR-10 batch layout in {path}: labels are {labels.dtype} {labels.shape}, not "
            f"{len(data)} integers (one per image)"
        )
    # Only other integer types need the range check (a full uint8 training set would take 0.1 s to scan).
    if data.dtype != np.uint8 and data.size and (data.min() < 0 or data.max() > 255):
        raise PipelineError(f"pixel values outside 0..255 in CIFAR-10 batch {path}")
    return data.astype(np.uint8, copy=False), labels.astype(np.int64, copy=False)


def download_cifar10(dataset_dir: Path) -> None:
    """torchvision's download of CIFAR-10, unpacked beside the dataset dir's folder and renamed into place whole,
    so that another process never reads it half unpacked; one process at a time where the OS has file locks (the
    processes of a torchrun job would otherwise each download it)."""
    dataset_dir.mkdir(parents=True, exist_ok=True)
    with open(dataset_dir / ".download.lock", "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if (dataset_dir / BATCHES_FOLDER).is_dir():  # unpacked by another process while this one waited
            return
        import torchvision

        unpacked = dataset_dir / f".download{os.getpid()}"
        try:
            torchvision.datasets.CIFAR10(root=str(unpacked), train=True, download=True)
            os.replace(unpacked / BATCHES_FOLDER, dataset_dir / BATCHES_FOLDER)
        finally:
            shutil.rmtree(unpacked, ignore_errors=True)


def load_cifar10_arrays(dataset_dir: str | Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [N, 3, 32, 32] and int64 labels [N] from {dataset_dir}/cifar-10-batches-py, read as they are.

    There is deliberately no md5 check: offline copies (JPEG-derived) differ slightly from the official bytes.
    Only when the folder is missing do we ask torchvision to download it (download_cifar10).
    """
    folder = Path(dataset_dir) / BATCHES_FOLDER
    if not folder.is_dir():
        try:
            download_cifar10(Path(dataset_dir))
        except Exception as e:
            raise PipelineError(
                f"no CIFAR-10 at {folder} and the download failed ({first_line(e, typed=True)}); {MAKE_DATA_HINT}"
            ) from e
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    parts = [_unpickle_batch(folder / name) for name in names]
    images = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([p[1] for p in parts])
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise PipelineError(f"labels outside 0..{NUM_CLASSES - 1} in {folder}")
    return torch.from_numpy(images), torch.from_numpy(labels)


def load_noisy_labels(path: str | Path, key: str, clean: torch.Tensor | None = None) -> torch.Tensor:
    """int64 labels stored under `key` (e.g. CIFAR-10N's aggre_label), in training order, from an .npz or the
    CIFAR-10N release's CIFAR-10_human.pt (read without running its pickle: see example/label_files.py).

    When the file also holds `clean_label` and `clean` (the dataset's official labels) is given, the two must
    agree: a file in another order than the dataset would pair every image with someone else's label.
    """
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"no noisy-label file at {path}")
    try:
        arrays = read_label_arrays(path)
    except LabelFileError as e:
        raise PipelineError(str(e)) from None
    if key not in arrays:
        raise PipelineError(f"no key {key!r} in {path}; available: {', '.join(sorted(arrays))}")
    labels = _label_array(arrays[key], path, key)
    if clean is not None:
        if len(labels) != len(clean):
            raise PipelineError(f"{path}[{key!r}] has {len(labels)} labels; the training set has {len(clean)}")
        if "clean_label" in arrays:
            official = _label_array(arrays["clean_label"], path, "clean_label")
            differ = int((official != clean.cpu()).sum()) if len(official) == len(clean) else len(clean)
            if differ:
                raise PipelineError(
                    f"{path}'s clean_label differs from the dataset's labels at {differ} of {len(clean)} images: "
                    "the file is for another copy or order of CIFAR-10"
                )
    return labels


def _label_array(values: np.ndarray, path: Path, key: str) -> torch.Tensor:
    if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
        raise PipelineError(f"{path}[{key!r}] is not a 1-D integer array (shape {values.shape}, {values.dtype})")
    if values.size and (values.min() < 0 or values.max() >= NUM_CLASSES):
        raise PipelineError(f"{path}[{key!r}] has labels outside 0..{NUM_CLASSES - 1}")
    return torch.from_numpy(values.astype(np.int64))


# ---- Data: label corruption ----


def check_label_options(corrupt_percentage: float | None, noisy_labels: object | None) -> None:
    """The one check of the label options: corrupted labels or human labels, not both, and a fraction in [0, 1]."""
    if corrupt_percentage is not None and noisy_labels is not None:
        raise PipelineError("--corrupt_percentage and --noisy_labels cannot be combined")
    if corrupt_percentage is not None and not 0.0 <= corrupt_percentage <= 1.0:
        raise PipelineError(f"--corrupt_percentage must be between 0 and 1, got {corrupt_percentage}")


def num_corrupted(num_examples: int, corrupt_percentage: float) -> int:
    # round() first, so that e.g. 0.07 * 100 = 7.000000000000001 counts 7 examples, not 8.
    return math.ceil(round(corrupt_percentage * num_examples, 6))


def corrupt_labels(labels: torch.Tensor, corrupt_percentage: float) -> torch.Tensor:
    """A copy of `labels` whose first ceil(p * N) entries are replaced by a different class, deterministically.

    new = randint(0, 10) from a generator seeded 0; where new equals the old label, add randint(1, 9) drawn
    from a fresh generator seeded 0 over just those positions, modulo 10 (so it can never come back).
    """
    check_label_options(corrupt_percentage, None)
    labels = labels.to(torch.int64)
    k = num_corrupted(len(labels), corrupt_percentage)
    old = labels[:k].cpu()
    new = torch.randint(0, NUM_CLASSES, (k,), generator=torch.Generator().manual_seed(0))
    same = new == old
    shift = torch.randint(1, NUM_CLASSES - 1, (int(same.sum()),), generator=torch.Generator().manual_seed(0))
    new[same] = (new[same] + shift) % NUM_CLASSES
    out = labels.clone()
    out[:k] = new.to(labels.device)
    return out


# ---- Data: on the device ----


@dataclass
class CifarData:
    """One split kept whole on the device: uint8 images [N, 3, 32, 32], int64 labels (possibly changed)."""

    images: torch.Tensor
    labels: torch.Tensor
    clean_labels: torch.Tensor
    split: str

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def changed(self) -> torch.Tensor:
        """Bool mask of the examples whose label differs from the official one."""
        return self.labels != self.clean_labels

    def subset(self, n: int | None, flag: str = "n") -> CifarData:
        """The first n examples (all when n is None); `flag` names n in the error. For train splits prefer
        get_cifar10(num_train=...), which applies corruption after truncation."""
        if n is None:
            return self
        if not 1 <= n <= len(self):
            raise PipelineError(f"{flag} must be between 1 and {len(self)} ({self.split} examples), got {n}")
        return CifarData(self.images[:n], self.labels[:n], self.clean_labels[:n], self.split)


def get_cifar10(
    dataset_dir: str | Path,
    split: str,
    num_train: int | None = None,
    corrupt_percentage: float | None = None,
    noisy_labels: str | Path | None = None,
    noisy_labels_key: str = "aggre_label",
    device: torch.device | str | None = None,
) -> CifarData:
    """A split ("train", "eval_train": training images; "valid": test images) on the device.

    For the train splits, the first `num_train` examples are kept, and only then are labels changed:
    either corrupted (first ceil(p * num_train)) or replaced by human noisy labels (an .npz, or CIFAR-10N's .pt).
    "train" and "eval_train" hold the same data; augmentation is TensorBatches' business.
    """
    if split not in SPLITS:
        raise PipelineError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    device = torch.device(device) if device is not None else get_device()
    is_train = split != "valid"
    if not is_train and (num_train is not None or corrupt_percentage is not None or noisy_labels is not None):
        raise PipelineError("num_train, corrupt_percentage and noisy_labels apply to train splits; use .subset(n)")
    check_label_options(corrupt_percentage, noisy_labels)

    images, clean = load_cifar10_arrays(dataset_dir, train=is_train)
    labels = clean
    if noisy_labels is not None:
        labels = load_noisy_labels(noisy_labels, noisy_labels_key, clean)
    if num_train is not None:
        if not 1 <= num_train <= len(clean):
            raise PipelineError(f"--num_train must be between 1 and {len(clean)}, got {num_train}")
        images, clean, labels = images[:num_train], clean[:num_train], labels[:num_train]
    if corrupt_percentage is not None:
        labels = corrupt_labels(clean, corrupt_percentage)
    return CifarData(images.to(device), labels.to(device), clean.to(device), split)


_NORMALISATION: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def normalisation(device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std as float32 [1, 3, 1, 1] on `device`, made once per device: made per batch, they would be
    copied from the host every batch, and each copy makes the host wait for the GPU."""
    device = torch.device(device)
    if device not in _NORMALISATION:
        mean = torch.tensor(CIFAR_MEAN, device=device).view(1, 3, 1, 1)
        _NORMALISATION[device] = (mean, torch.tensor(CIFAR_STD, device=device).view(1, 3, 1, 1))
    return _NORMALISATION[device]


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32, scaled to [0, 1] then standardised per channel."""
    mean, std = normalisation(images.device)
    return (images.float() / 255.0 - mean) / std


def random_crop_flip(
    images: torch.Tensor,
    generator: torch.Generator,
    padding: int = 4,
    shard: tuple[int, int] = (0, 1),
    batch_size: int | None = None,
) -> torch.Tensor:
    """Random 32x32 crop of the zero-padded images and a random horizontal flip, for the whole batch at once.

    Offsets and flips are drawn by `generator`, which must be on the images' device: drawn on the host they
    would be copied to the GPU every batch, and each copy makes the host wait for the GPU. (So a GPU run draws
    other crops than a CPU run of the same seed; each is reproducible.) One gather does both the crop and the
    flip, by reading the columns of a flipped image in reverse order. With shard=(rank, world), `images` are
    slice [rank::world] of a batch of `batch_size`: the draws are made for the whole batch and sliced alike, so
    that each image is cropped as one process would crop it (and the ranks' slices are not cropped alike).
    """
    if generator.device.type != images.device.type:
        raise PipelineError(f"the augmentation generator is on {generator.device}, the images on {images.device}")
    b, _, h, w = images.shape
    device = images.device
    rank, world = shard
    drawn = b if batch_size is None else batch_size
    padded = F.pad(images, (padding, padding, padding, padding))  # zeros = black, as with padding PIL images
    dy = torch.randint(0, 2 * padding + 1, (drawn,), generator=generator, device=device)[rank::world]
    dx = torch.randint(0, 2 * padding + 1, (drawn,), generator=generator, device=device)[rank::world]
    flip = (torch.rand(drawn, generator=generator, device=device) < 0.5)[rank::world]
    if len(dy) != b:
        raise PipelineError(f"slice {rank} of {world} of a batch of {drawn} has {len(dy)} images, not {b}")
    ar_h = torch.arange(h, device=device)
    ar_w = torch.arange(w, device=device)
    rows = dy[:, None] + ar_h  # [B, H]
    cols = dx[:, None] + torch.where(flip[:, None], w - 1 - ar_w, ar_w)  # [B, W]
    batch = torch.arange(b, device=device)[:, None, None]
    # Indexing the channels-last view gives [B, H, W, C]; permute back to [B, C, H, W].
    crops = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
    return crops.permute(0, 3, 1, 2).contiguous()


class TensorBatches:
    """Re-iterable batches over data already on the device, yielding (normalised float images, labels).

    Replaces a DataLoader (no workers, no per-image Python). Each iteration is one epoch: with shuffle or
    augment, its randomness comes from a generator on the data's device seeded `seed + epoch` (see
    `epoch_generator`), so runs are reproducible and the host never waits for the GPU to hand it a batch;
    without them, iterating twice gives the same batches. With shard=(rank, world), each batch of
    `batch_size` is cut into `world` slices and only slice `rank` is yielded (data-parallel training: every
    rank draws the same order, so the slices of one step partition its batch).
    """

    def __init__(
        self,
        data: CifarData,
        batch_size: int,
        shuffle: bool = False,
        augment: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        shard: tuple[int, int] = (0, 1),
    ):
        if batch_size < 1:
            raise PipelineError(f"batch size must be positive, got {batch_size}")
        self.images, self.labels = data.images, data.labels
        self.batch_size, self.shuffle, self.augment, self.drop_last = batch_size, shuffle, augment, drop_last
        self.seed, self.shard = seed, shard
        self.epoch = 0
        normalisation(self.images.device)  # made now, not while the first batch is on its way

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def epoch_generator(self, epoch: int) -> torch.Generator:
        """The generator of an epoch's order and augmentation: on the data's device, seeded `seed + epoch`."""
        return torch.Generator(device=self.images.device).manual_seed(self.seed + epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = self.epoch_generator(self.epoch)
        self.epoch += 1
        n = len(self.labels)
        order = torch.randperm(n, generator=gen, device=self.labels.device) if self.shuffle else None
        for i in range(len(self)):
            lo, hi = i * self.batch_size, min((i + 1) * self.batch_size, n)
            rank, world = self.shard
            if order is None:
                x, y = self.images[lo:hi][rank::world], self.labels[lo:hi][rank::world]
            else:
                idx = order[lo:hi][rank::world]
                x, y = self.images[idx], self.labels[idx]
            if self.augment:
                x = random_crop_flip(x, gen, shard=self.shard, batch_size=hi - lo)
            yield normalize(x), y
