"""Results on disk: safetensors keyed by module name, arguments as JSON, every file written whole or not at all."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
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


def load_tensors(path: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    return load_file(str(path), device=str(device))


def load_metadata(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {key: json.loads(value) for key, value in (handle.metadata() or {}).items()}


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
        saved = json.loads(path.read_text())
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
