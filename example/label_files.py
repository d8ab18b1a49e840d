"""Read files of given training labels (CIFAR-10N) without running code from them.

Two formats are accepted, both mapping names to 1-D integer arrays in training order:

- `.npz` (numpy), read with allow_pickle=False;
- the CIFAR-10N release as published (`CIFAR-10_human.pt`, https://github.com/UCSC-REAL/cifar-10-100n): a torch
  zip archive whose `data.pkl` is a pickled dict of numpy arrays (clean_label, aggre_label, worse_label,
  random_label1..3). torch.load would run whatever that pickle names; this reader lets it name only what
  rebuilds a numpy array, under numpy 1.x (`numpy.core`) or 2.x (`numpy._core`), and refuses anything else
  before calling it. The same unpickler (ArraysOnlyUnpickler) reads the CIFAR-10 batch files (pipeline.py).

    from example.label_files import read_label_arrays
    arrays = read_label_arrays("CIFAR-10_human.pt")   # {"clean_label": array([...]), ...}
"""

from __future__ import annotations

import codecs
import io
import pickle
import zipfile
from pathlib import Path

import numpy as np

from influence import first_line


class LabelFileError(ValueError):
    """The file cannot be read as a label file; the message says why in one line."""


class RefusedPickle(ValueError):
    """A pickle asked for something other than what rebuilds numpy arrays; nothing it named was called."""


def _latin1(text: str, encoding: str = "latin1") -> bytes:
    # Pickle protocol 2 (torch.save's default) stores an array's raw bytes as _codecs.encode(text, "latin1").
    if encoding != "latin1":
        raise RefusedPickle(f"the pickle asks to encode with {encoding!r}; only latin1 rebuilds array bytes")
    return codecs.encode(text, "latin1")


# Everything a pickled numpy array may name: its rebuild function (moved from numpy.core to numpy._core in numpy 2),
# the ndarray and dtype classes, the bytes helper above, and what protocol 5 (_frombuffer) and numpy scalars
# (scalar) use instead. None of these runs code of the pickle's choosing: an object-dtype array or scalar can only
# hold objects that this same unpickler built. Nothing else is ever looked up.
_RECONSTRUCT = np.ndarray(0).__reduce__()[0]
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]
_SCALAR = np.int64(0).__reduce__()[0]
_ALLOWED = {
    **{(f"{core}.multiarray", "_reconstruct"): _RECONSTRUCT for core in ("numpy.core", "numpy._core")},
    **{(f"{core}.numeric", "_frombuffer"): _FROMBUFFER for core in ("numpy.core", "numpy._core")},
    **{(f"{core}.multiarray", "scalar"): _SCALAR for core in ("numpy.core", "numpy._core")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1,
}


class ArraysOnlyUnpickler(pickle.Unpickler):
    """The one unpickler of the project's pickles (CIFAR-10 batches, CIFAR-10N label files): dicts, lists,
    tuples, bytes, strings and numbers (built by pickle's own opcodes, which call nothing) and numpy arrays.

    Any other global the pickle names is refused before it is looked up, with RefusedPickle: "its pickle asks
    for os.system; <allowed>", where `allowed` says what the caller reads."""

    def __init__(self, file, *, encoding: str, allowed: str = "only numpy arrays are read") -> None:
        super().__init__(file, encoding=encoding)
        self.allowed = allowed

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise RefusedPickle(f"its pickle asks for {module}.{name}; {self.allowed}") from None


def _read_torch_archive(path: Path) -> dict:
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(names) != 1:
            raise LabelFileError("it is a zip file but not a torch.save archive (no single data.pkl)")
        payload = archive.read(names[0])
    return ArraysOnlyUnpickler(io.BytesIO(payload), encoding="latin1").load()


def read_label_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """Every array in an .npz or a CIFAR-10N-style .pt file; LabelFileError (one line) when it cannot be read."""
    path = Path(path)
    try:
        if zipfile.is_zipfile(path) and not _is_npz(path):
            content = _read_torch_archive(path)
        else:
            with np.load(path, allow_pickle=False) as npz:
                content = {key: npz[key] for key in npz.files}
    except (LabelFileError, RefusedPickle) as e:
        raise LabelFileError(f"cannot read {path}: {e}") from None
    except Exception as e:  # truncated archive, not a numpy file, malformed pickle
        raise LabelFileError(
            f"cannot read {path} as .npz or as the CIFAR-10N .pt release ({first_line(e, typed=True)})"
        ) from None
    if not isinstance(content, dict) or not all(isinstance(v, np.ndarray) for v in content.values()):
        raise LabelFileError(f"cannot read {path}: expected a dict of numpy arrays, found {type(content).__name__}")
    return {str(key): value for key, value in content.items()}


def _is_npz(path: Path) -> bool:
    # An .npz is a zip of .npy members; a torch archive holds data.pkl and friends.
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return bool(names) and all(name.endswith(".npy") for name in names)
