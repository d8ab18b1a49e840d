"""Results on disk: safetensors keyed by module name, arguments as JSON, every file written whole or not at all."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # not on Windows: results folders are then not locked
    fcntl = None

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from influence.errors import InfluenceError, first_line

# ---- Writing: every file of the project goes through write_atomically ----

# Errors a user fixes by making room, and by choosing a folder they may write to.
NO_ROOM = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file larger than the file system or the file size limit allows",
}
NO_ACCESS = {
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
}


def write_atomically(
    path: str | Path, write: Callable[[Path], Any], size: int | None = None, folder: str = "output_dir"
) -> None:
    """Write through `write(tmp_path)` to a temporary name beside `path`, then rename it over `path`.

    The file under `path` is therefore whole or absent (an older version stays as it was) wherever the process is
    killed; it is not synced to disk, so what a power loss leaves is up to the file system. Lack of space or of
    permission becomes one InfluenceError naming the file, its `size` in bytes where known, and the setting
    `folder` that moves it elsewhere (output_dir, the Analyzer's); other errors pass through as they are.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")  # the suffix tells writers the format
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except (OSError, SafetensorError) as error:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)  # first, so the free space reported below counts it
        translated = write_error(path, error, size, folder)
        if translated is None:
            raise
        raise translated from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def _errno(error: BaseException) -> int | None:
    if isinstance(error, OSError):
        return error.errno
    found = re.search(r"os error (\d+)", str(error))  # safetensors reports I/O errors as text: "... (os error 28)"
    return int(found.group(1)) if found else None


def _size(count: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{int(count)} bytes"


def write_error(path: Path, error: BaseException, size: int | None, folder: str) -> InfluenceError | None:
    """The one-line error for a write that failed for lack of space or permission (None for other failures)."""
    code = _errno(error)
    if code in NO_ROOM:
        try:
            free = f"{_size(shutil.disk_usage(_existing_parent(path)).free)} free there"
        except OSError:
            free = "free space unknown"
        needs = f"it needs about {_size(size)}, {free}" if size is not None else free
        return InfluenceError(
            f"cannot write {path}: {NO_ROOM[code]} ({needs}): free some space there, or choose another {folder}"
        )
    if code in NO_ACCESS:
        return InfluenceError(
            f"cannot write {path}: {NO_ACCESS[code]}: make {_existing_parent(path)} writable, "
            f"or choose another {folder}"
        )
    return None


def _existing_parent(path: Path) -> Path:
    for parent in path.parents:
        if parent.exists():
            return parent
    return Path(".")


def safetensors_size(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> int:
    """About the bytes a safetensors file of `tensors` takes: the data plus its JSON header."""
    header = {name: {"dtype": "F32", "shape": list(t.shape), "data_offsets": [0, 0]} for name, t in tensors.items()}
    header_size = len(json.dumps({"__metadata__": metadata or {}, **header})) + 8 * (len(tensors) + 2)
    return header_size + sum(t.numel() * t.element_size() for t in tensors.values())


def save_tensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None, folder: str = "output_dir"
) -> None:
    cpu = {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}
    meta = {key: json.dumps(value) for key, value in (metadata or {}).items()}
    size = safetensors_size(cpu, meta)
    write_atomically(path, lambda tmp: save_file(cpu, str(tmp), metadata=meta), size, folder)


FIX_HINT = "delete it, or rerun with overwrite_output_dir=True to recompute"


def _unreadable(path: Path, error: Exception, fix: str = FIX_HINT) -> InfluenceError:
    return InfluenceError(f"cannot read {path} ({first_line(error)}; truncated or not written by this engine?): {fix}")


def load_tensors(path: Path, device: torch.device | str = "cpu", fix: str = FIX_HINT) -> dict[str, torch.Tensor]:
    """The file's tensors on `device`. Read on the CPU, then moved: a GPU out of memory while moving them is an
    error of its own (OutOfMemoryError), never reported as an unreadable file (which would discard a partial one).
    Unreadable: one InfluenceError naming the file and `fix`, what to do about it."""
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise _unreadable(path, error, fix) from None
    return move(tensors, device)


def move(tensors: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    return {name: tensor.to(device) for name, tensor in tensors.items()}


def load_metadata(path: Path, fix: str = FIX_HINT) -> dict[str, Any]:
    """The metadata save_tensors wrote, each value read back from JSON."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: json.loads(value) for key, value in (handle.metadata() or {}).items()}
    except (SafetensorError, OSError, ValueError) as error:
        raise _unreadable(path, error, fix) from None


def read_safetensors(
    path: Path, device: torch.device | str = "cpu", fix: str = FIX_HINT
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors on `device`, metadata) of a file save_tensors wrote; unreadable: one InfluenceError naming the file
    and `fix`, what to do about it."""
    metadata = load_metadata(path, fix)
    return load_tensors(path, device, fix), metadata


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _unreadable(path, error) from None


def save_json(path: Path, obj: dict[str, Any]) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    write_atomically(path, lambda tmp: tmp.write_text(text), len(text.encode()))


def first_difference(saved: Any, wanted: Any, prefix: str = "") -> tuple[str, Any, Any] | None:
    """(key, saved value, wanted value) of the first setting that differs, dotted into nested dicts; None if none."""
    if isinstance(saved, dict) and isinstance(wanted, dict):
        for key in sorted(set(saved) | set(wanted)):
            found = first_difference(saved.get(key), wanted.get(key), f"{prefix}{key}.")
            if found:
                return found
        return None
    return None if saved == wanted else (prefix.rstrip("."), saved, wanted)


def result_files(folder: Path, filename: str) -> list[Path]:
    """The files of `folder` besides its arguments file `filename` (hidden ones, the lock and temporary files,
    excluded)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name != filename and not p.name.startswith("."))


def prepare_folder(
    folder: Path,
    filename: str,
    arguments: dict[str, Any],
    what: str,
    overwrite: bool,
    results: list[Path],
    claimed: Callable[[], Path | None] | None = None,
    log: Callable[[str], None] = print,
) -> None:
    """Record `arguments` in folder/filename before `what` (factors, scores) is computed there, or decide what
    the results already there are worth.

    Without `overwrite`: results made with these arguments are reused or resumed; others are refused.
    With `overwrite`, only what a stopped run with these same arguments left is kept, so that a job whose every
    run asks to overwrite still resumes after a preemption: the folder is unfinished (some of `results`, the
    files it ends with, missing), or finished but `claimed()` names results made from it that a stopped run
    left unfinished. Anything else (other arguments, no readable arguments file, an earlier run's finished
    results) is discarded. Either way one line says which.
    """
    path = folder / filename
    wanted = json.loads(json.dumps(arguments))  # tuples become lists, as on disk
    files = result_files(folder, filename)
    saved: Any = None
    if path.exists():
        try:
            saved = read_json(path)
        except InfluenceError:
            if not overwrite:
                raise
            saved = None
            log(f"overwrite_output_dir: discarding the {what} in {folder}: its {filename} is unreadable")
            files = []
            clear_folder(folder)
    elif files:
        if not overwrite:
            raise InfluenceError(
                f"{folder} holds {what} ({files[0].name}{' and more' if len(files) > 1 else ''}) but no {filename} "
                "saying which arguments made them, so they cannot be checked: delete them, or pass "
                "overwrite_output_dir=True to recompute them"
            )
        log(f"overwrite_output_dir: discarding the {what} in {folder}: no {filename} says what made them")
        clear_folder(folder)
        files = []
    difference = first_difference(saved, wanted) if saved is not None else None
    if difference and not overwrite:
        key, old, new = difference
        raise InfluenceError(
            f"{what} in {folder} were saved with {key}={old!r}, now {key}={new!r}: pass "
            "overwrite_output_dir=True to recompute them, or choose another name"
        )
    if not overwrite or not files:
        if saved != wanted:
            save_json(path, wanted)
        return
    if difference:
        key, old, new = difference
        log(
            f"overwrite_output_dir: discarding the {what} in {folder}, made with other arguments "
            f"({key}={old!r}, now {key}={new!r})"
        )
    elif not all(result.exists() for result in results):
        log(
            f"overwrite_output_dir: resuming the partial {what} in {folder}, which a stopped run with these "
            "arguments left"
        )
        return
    else:
        keeper = claimed() if claimed is not None else None
        if keeper is not None:
            log(
                f"overwrite_output_dir: keeping the {what} in {folder}: a stopped run with these arguments made them "
                f"and left {keeper} unfinished"
            )
            return
        log(f"overwrite_output_dir: discarding the finished {what} in {folder} of an earlier run, to recompute them")
    clear_folder(folder)
    save_json(path, wanted)


def clear_folder(folder: Path) -> None:
    """Remove the files of an earlier result (overwrite), keeping the folder and its lock."""
    if folder.exists():
        for path in folder.iterdir():
            if path.is_file() and path.name != LOCK_NAME:
                path.unlink()


# ---- One writer per results folder ----

LOCK_NAME = ".lock"


class FolderLock:
    """An exclusive, non-blocking lock on a results folder, for the duration of one computation there.

    flock on folder/.lock, which holds the holder's pid: the kernel releases it when the process ends however it
    ends (SIGKILL included), so a lock is never left stale; the holder removes the file when it is done. A second
    writer is refused at once rather than made to wait: its results would replace the first one's under it.
    """

    def __init__(self, folder: Path) -> None:
        self.folder, self.fd = Path(folder), None

    def acquire(self) -> None:
        if fcntl is None:
            return
        path = self.folder / LOCK_NAME
        while True:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as error:
                if _errno(error) in NO_ACCESS:  # a folder this run cannot write: it may still read results there
                    return
                translated = write_error(path, error, None, "output_dir")
                if translated is None:
                    raise
                raise translated from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(fd)
                os.close(fd)
                raise InfluenceError(
                    f"another run is writing {self.folder}{f' (pid {holder})' if holder else ''}: wait for it to "
                    "finish, or choose another output_dir"
                ) from None
            # The holder before us removes the file before it lets go: a lock taken on a removed file is no lock.
            try:
                current = os.stat(path)
                same = (current.st_dev, current.st_ino) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino)
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        with contextlib.suppress(OSError):
            (self.folder / LOCK_NAME).unlink()  # first, while held: see acquire
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):
        return None


# ---- Partial results of a pass, for resuming ----

PARTIAL_SUFFIX = ".partial.safetensors"


def _saved_arguments(path: Path) -> dict[str, Any] | None:
    """The arguments a results folder records, or None where they cannot be read (a folder that is not a match)."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) else None


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def partial_path(result: Path) -> Path:
    """Where the partial result of `result` lives: lambda_matrix.safetensors -> lambda_matrix.partial.safetensors."""
    return result.with_name(result.name.removesuffix(".safetensors") + PARTIAL_SUFFIX)


def save_partial(
    path: Path, tensors: dict[str, torch.Tensor], progress: dict[str, Any], folder: str = "output_dir"
) -> None:
    save_tensors(path, tensors, {"partial": True, "progress": progress}, folder)


def load_partial(path: Path, device: torch.device | str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | str:
    """(tensors, progress) of a saved partial result, or the reason it cannot be used (it is then discarded)."""
    try:
        tensors, metadata = read_safetensors(path, device)
    except InfluenceError:
        return "it is unreadable"
    if metadata.get("partial") is not True or not isinstance(metadata.get("progress"), dict):
        return "it is not a partial result"
    return tensors, metadata["progress"]


# ---- The results of one analysis, for every rank ----

FACTOR_ARGUMENTS = "factor_arguments.json"
SCORE_ARGUMENTS = "score_arguments.json"
PAIRWISE_SCORES = "pairwise_scores.safetensors"
SELF_SCORES = "self_scores.safetensors"


class Store:
    """The result files under one analysis folder, for every rank of the job (see distributed.Group).

    Rank 0 alone touches the disk; what it read, and any error it met, reaches every rank, so callers never ask
    which rank they are. Layout: factors_<name>/<kind>.safetensors and scores_<name>/<file>, each folder with
    the arguments its results were made with (JSON), and a pass's partial result beside the file it ends in.
    """

    def __init__(self, folder: Path, group: Any, log: Callable[[str], None]) -> None:
        self.folder, self.group, self.log = Path(folder), group, log

    def factors(self, name: str) -> Path:
        return self.folder / f"factors_{name}"

    def scores(self, name: str, filename: str = "") -> Path:
        """The folder of scores `name`, or its file `filename` (PAIRWISE_SCORES, SELF_SCORES, SCORE_ARGUMENTS)."""
        return self.folder / f"scores_{name}" / filename

    def exists(self, *paths: Path) -> bool:
        return self.group.on_main(lambda: all(path.exists() for path in paths))

    def prepare(
        self,
        folder: Path,
        filename: str,
        arguments: dict[str, Any],
        what: str,
        overwrite: bool,
        results: list[Path] | None = None,
        claimed: Callable[[], Path | None] | None = None,
    ) -> None:
        """Record the arguments, or refuse results made with others; with `overwrite`, discard what is there
        unless a stopped run with these arguments left it (see prepare_folder; `results`: the files the folder
        ends with)."""
        self.group.on_main(
            lambda: prepare_folder(folder, filename, arguments, what, overwrite, results or [], claimed, self.log)
        )

    @contextlib.contextmanager
    def writing(self, folder: Path) -> Iterator[None]:
        """Hold the folder's lock (rank 0) while a computation there runs: another run is refused in one line."""
        lock = FolderLock(folder)
        self.group.on_main(lock.acquire)
        try:
            yield
        finally:
            lock.release()  # held on rank 0 only

    def unfinished_scores(self, factors_name: str, factor_arguments: dict[str, Any]) -> Path | None:
        """A scores folder made from factors `factors_name` with these factor arguments and left unfinished (a
        partial result, or no scores file yet) by a stopped run, if there is one."""
        wanted = json.loads(json.dumps(factor_arguments))
        for folder in sorted(self.folder.glob("scores_*")):
            saved = _saved_arguments(folder / SCORE_ARGUMENTS)
            if saved is None or saved.get("factors_name") != factors_name:
                continue
            if first_difference(saved.get("factor_arguments"), wanted) is not None:
                continue
            finished = any((folder / name).exists() for name in (PAIRWISE_SCORES, SELF_SCORES))
            if not finished or any(folder.glob(f"*{PARTIAL_SUFFIX}")):
                return folder
        return None

    def take_from_sibling(self, folder: Path, arguments: dict[str, Any], names: list[str], ignore: str) -> Path | None:
        """Copy the files `names` into factors `folder` from another factors folder of this analysis whose
        arguments are `arguments` but for the key `ignore`, and that holds all of them; the folder they came
        from, or None. Each copy is a hard link where the file system allows (the files are never written in
        place), else a copy, and is whole or absent (write_atomically); a partial result of ours is removed."""
        wanted = json.loads(json.dumps({key: value for key, value in arguments.items() if key != ignore}))

        def take() -> str | None:  # a name: on_main shares rank 0's result with the other ranks as JSON
            for sibling in sorted(self.folder.glob("factors_*")):
                if sibling == folder or not all((sibling / name).exists() for name in names):
                    continue
                saved = _saved_arguments(sibling / FACTOR_ARGUMENTS)
                if saved is None or saved.pop(ignore, None) is None or saved != wanted:
                    continue
                for name in names:
                    write_atomically(folder / name, lambda tmp, source=sibling / name: _link_or_copy(source, tmp))
                    partial_path(folder / name).unlink(missing_ok=True)
                return sibling.name
            return None

        source = self.group.on_main(take)
        return None if source is None else self.folder / source

    def load(self, path: Path, device: torch.device | str, missing: str | None = None) -> dict[str, torch.Tensor]:
        """The file's tensors on every rank; `missing`: the error if there is no such file."""

        def read() -> dict[str, torch.Tensor]:
            if missing is not None and not path.exists():
                raise InfluenceError(missing)
            return load_tensors(path, device)

        return self.group.on_main(read, device=device)

    def read_json(self, path: Path, missing: str) -> Any:
        def read() -> Any:
            if not path.exists():
                raise InfluenceError(missing)
            return read_json(path)

        return self.group.on_main(read)

    def metadata(self, *paths: Path) -> dict[str, Any]:
        """The metadata of those of `paths` that exist, merged."""

        def read() -> dict[str, Any]:
            merged: dict[str, Any] = {}
            for path in paths:
                if path.exists():
                    merged.update(load_metadata(path))
            return merged

        return self.group.on_main(read)

    def save(self, files: list[tuple[Path, dict[str, torch.Tensor], dict[str, Any] | None]], done: Path | None = None):
        """Write (path, tensors, metadata) files, then remove the partial result of `done`, now complete."""

        def write() -> None:
            for path, tensors, metadata in files:
                save_tensors(path, tensors, metadata)
            if done is not None:
                partial_path(done).unlink(missing_ok=True)

        self.group.on_main(write)

    def save_partial(self, path: Path, tensors: dict[str, torch.Tensor], progress: dict[str, Any]) -> None:
        """Rank 0 writes; the others hold no share of it any more (see Group.sum_to_main)."""
        if self.group.is_main:
            save_partial(path, tensors, progress)

    def resume(
        self,
        partial: Path,
        desc: str,
        use: Callable[..., Any],
        saved: tuple | None | str = "read",
        arguments: dict[str, Any] | None = None,
        again: str = "starting the pass over",
    ) -> Any:
        """What use(tensors, progress) makes of a saved partial result, once rank 0 has handed it over; None when
        there is none to use.

        One policy for a partial result that cannot be used (unreadable; `use` returns the reason, a string, or
        raises KeyError, ValueError or RuntimeError because it was made for another model): say so and start over
        (`again` says how); the next save replaces it. A run with other `arguments` (those the partial result's
        progress records under "arguments") is refused in one line instead: resuming it would mix two runs.
        `saved`: (tensors, progress) already read by rank 0 (a pass saved inside another's file), or "read".
        """

        def read() -> Any:
            loaded = saved
            if saved == "read":
                loaded = load_partial(partial, "cpu") if partial.exists() else None
            if loaded is None or isinstance(loaded, str):
                return loaded and self._discard(partial, desc, loaded, again)
            try:
                found = use(*loaded)
            except (KeyError, ValueError, RuntimeError):
                return self._discard(partial, desc, "made for another model", again)
            if isinstance(found, str):
                return self._discard(partial, desc, found, again)
            if arguments is not None:
                refuse_other_arguments(partial, loaded[1].get("arguments", {}), arguments)
            return found

        return self.group.on_main(read)

    def _discard(self, partial: Path, desc: str, reason: str, again: str) -> None:
        self.log(f"{desc}: discarding {partial} ({reason}); {again}")


def refuse_other_arguments(partial: Path, saved: dict[str, Any], arguments: dict[str, Any]) -> None:
    """The one-line refusal of a partial result saved by a run with other arguments, naming the first that differs."""
    difference = first_difference(saved, json.loads(json.dumps(arguments)))
    if difference:
        key, old, new = difference
        raise InfluenceError(
            f"{partial} holds the state of a run with {key}={old!r}, now {key}={new!r}: rerun with the same "
            "arguments to resume it, or delete it to start over"
        )
