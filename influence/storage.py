"""Results on disk: safetensors keyed by module name, arguments as JSON, every file written whole or not at all."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from influence.errors import InfluenceError


def _atomic(path: Path, write: Any) -> None:
    """Write through `write(tmp_path)` to a temporary name beside `path`, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None) -> None:
    cpu = {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}
    meta = {key: json.dumps(value) for key, value in (metadata or {}).items()}
    _atomic(path, lambda tmp: save_file(cpu, str(tmp), metadata=meta))


FIX_HINT = "delete it, or rerun with --overwrite_output_dir (overwrite_output_dir=True) to recompute"


def _unreadable(path: Path, error: Exception) -> InfluenceError:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return InfluenceError(f"cannot read {path} ({reason}; truncated or not written by this engine?): {FIX_HINT}")


def load_tensors(path: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The file's tensors on `device`. Read on the CPU, then moved: a GPU out of memory while moving them is an
    error of its own (OutOfMemoryError), never reported as an unreadable file (which would discard a partial one)."""
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise _unreadable(path, error) from None
    return move(tensors, device)


def move(tensors: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    return {name: tensor.to(device) for name, tensor in tensors.items()}


def load_metadata(path: Path) -> dict[str, Any]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: json.loads(value) for key, value in (handle.metadata() or {}).items()}
    except (SafetensorError, OSError, ValueError) as error:
        raise _unreadable(path, error) from None


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _unreadable(path, error) from None


def save_json(path: Path, obj: dict[str, Any]) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True)
    _atomic(path, lambda tmp: tmp.write_text(text + "\n"))


def _first_difference(saved: Any, wanted: Any, prefix: str = "") -> tuple[str, Any, Any] | None:
    if isinstance(saved, dict) and isinstance(wanted, dict):
        for key in sorted(set(saved) | set(wanted)):
            found = _first_difference(saved.get(key), wanted.get(key), f"{prefix}{key}.")
            if found:
                return found
        return None
    return None if saved == wanted else (prefix.rstrip("."), saved, wanted)


def check_arguments(folder: Path, filename: str, arguments: dict[str, Any], what: str) -> None:
    """Record `arguments` in folder/filename, or refuse if the folder holds results made with others."""
    path = folder / filename
    wanted = json.loads(json.dumps(arguments))  # tuples become lists, as on disk
    if path.exists():
        saved = read_json(path)
        difference = _first_difference(saved, wanted)
        if difference:
            key, old, new = difference
            raise InfluenceError(
                f"{what} in {folder} were saved with {key}={old!r}, now {key}={new!r}: pass "
                "overwrite_output_dir=True (--overwrite_output_dir) to recompute them, or choose another name"
            )
        return
    save_json(path, wanted)


def clear_folder(folder: Path) -> None:
    """Remove the files of an earlier result (overwrite), keeping the folder."""
    if folder.exists():
        for path in folder.iterdir():
            if path.is_file():
                path.unlink()


# ---- Partial results of a pass, for resuming ----

PARTIAL_SUFFIX = ".partial.safetensors"


def partial_path(result: Path) -> Path:
    """Where the partial result of `result` lives: lambda_matrix.safetensors -> lambda_matrix.partial.safetensors."""
    return result.with_name(result.name.removesuffix(".safetensors") + PARTIAL_SUFFIX)


def save_partial(path: Path, tensors: dict[str, torch.Tensor], progress: dict[str, Any]) -> None:
    save_tensors(path, tensors, {"partial": True, "progress": progress})


def load_partial(path: Path, device: torch.device | str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | str:
    """(tensors, progress) of a saved partial result, or the reason it cannot be used (it is then discarded)."""
    try:
        metadata = load_metadata(path)
        tensors = load_tensors(path, device)
    except InfluenceError:
        return "it is unreadable"
    if metadata.get("partial") is not True or not isinstance(metadata.get("progress"), dict):
        return "it is not a partial result"
    return tensors, metadata["progress"]
