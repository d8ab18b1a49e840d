"""The steps of an influence analysis, run over datasets in batches and saved as they finish.

    fit_all_factors:          covariance pass -> eigendecomposition -> Lambda pass   (what the strategy needs)
    compute_pairwise_scores:  per query batch: precondition its gradients once, then one pass over the
                              training data contracting them with each batch's per-example gradients
    compute_self_scores:      one pass over the training data

A dataset is any iterable of batches that can be iterated more than once (a DataLoader, a list...).
Batches are moved to the model's device and handed to the Task as they are.

Under torchrun (an initialised process group) every process iterates the same batches and runs its share of
them (see distributed.py); sums and score columns meet on rank 0, which alone reads and writes files. The
covariance, Lambda and self-influence passes save their partial sums every `save_interval` seconds, the
pairwise pass each finished query batch, so that a rerun after a kill resumes where the last save left off.

Peak memory of compute_pairwise_scores, in elements (times 4 bytes in fp32, 2 for the bf16 parts):
    Q * P                 preconditioned query gradients, Q = query batch size, P = tracked parameters
  + C * max_l(out_l * in'_l) + C * max_l(T_l * (in'_l + out_l))   one chunk's per-example gradients and a, g,
                          C = examples per chunk (max_elements bounds each of these tensors)
  + Q * N                 the scores
  + the model's own forward/backward memory for a batch of B (training) or Q (queries) examples.
compute_self_scores needs the last three terms with Q = 0; the factor passes need C * max_l T_l * (in'_l + out_l)
plus the factors, sum_l (in'_l^2 + out_l^2 + out_l * in'_l).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from influence import flops, interrupt
from influence.arguments import FactorArguments, ScoreArguments, to_dict
from influence.capture import Capture, backward_batch, per_example_gradient, to_device
from influence.distributed import Group, balanced_owners
from influence.errors import InfluenceError
from influence.factors import CovarianceAccumulator, LambdaAccumulator, Sums, eigendecomposition, kfac_lambda
from influence.modules import Layer, find_layers
from influence.precondition import LayerPreconditioner
from influence.profiler import Profiler
from influence.storage import (
    FIX_HINT,
    check_arguments,
    clear_folder,
    load_metadata,
    load_partial,
    load_tensors,
    partial_path,
    read_json,
    save_partial,
    save_tensors,
)
from influence.task import Task

FACTOR_ARGUMENTS = "factor_arguments.json"
SCORE_ARGUMENTS = "score_arguments.json"
COVARIANCES = ("activation_covariance", "gradient_covariance")
EIGENDECOMPOSITION = (
    "activation_eigenvalues",
    "activation_eigenvectors",
    "gradient_eigenvalues",
    "gradient_eigenvectors",
)
LAMBDA = "lambda_matrix"
PAIRWISE_SCORES = "pairwise_scores.safetensors"
SELF_SCORES = "self_scores.safetensors"
ALL_MODULES = "all_modules"
BLOCK = "block/"  # prefix, in a pairwise partial file, of the columns of the query batch in progress
# Largest a, g or per-example-gradient tensor handed to a step at once, in elements, on the CPU: 256 MB in fp32.
# Measured on a 2-core CPU (EK-FAC factors and self-influence of 512 images): batches of 512 in chunks of this
# size ran as fast as the best plain batch size (256), where whole batches of 512 took 30% longer and twice the
# memory, re-faulting hundreds of MB of fresh pages per layer. GPUs take whole batches.
CPU_MAX_ELEMENTS = 2**26


def _needs(strategy: str) -> tuple[bool, bool]:
    """(covariance + eigendecomposition, Lambda pass) for a strategy."""
    return strategy in ("kfac", "ekfac"), strategy in ("ekfac", "diagonal")


def batch_length(batch: Any) -> int:
    """Examples in a batch: the leading dimension of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else 1
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    for item in items:
        found = batch_length(item) if isinstance(item, (torch.Tensor, dict, list, tuple)) else None
        if found is not None:
            return found
    raise InfluenceError(f"cannot tell how many examples a batch holds: it has no tensor ({type(batch).__name__})")


def batch_seed(seed: int, offset: int, count: int) -> int:
    """The RNG seed of the batch of `count` examples starting at example `offset`: the same on any rank."""
    return (seed * 0x9E3779B1 + offset * 0x85EBCA77 + count * 0xC2B2AE3D) % (2**63 - 1)


class _Restart(Exception):
    """The saved partial result was made with other batches: the pass starts over."""


class Analyzer:
    """Fits factors and computes scores for `model` under `task`, saving under output_dir/analysis_name.

    save_interval: seconds between saves of the partial sums of a pass (covariance, Lambda, self-influence).
    max_elements: bound on the per-layer tensors of one chunk of a batch (None: whole batches; the default is
        CPU_MAX_ELEMENTS on the CPU and whole batches on a GPU).
    """

    def __init__(
        self,
        analysis_name: str,
        model: nn.Module,
        task: Task,
        output_dir: str | Path = "./influence_results",
        profile: bool = False,
        disable_tqdm: bool = False,
        save_interval: float = 120.0,
        max_elements: int | None | str = "auto",
    ) -> None:
        parameters = list(model.parameters())
        if not parameters:
            raise InfluenceError("the model has no parameters to score")
        self.model, self.task = model.eval(), task
        self.layers: list[Layer] = find_layers(model, task.tracked_modules())
        self.device = parameters[0].device
        self.dtype = torch.float64 if parameters[0].dtype == torch.float64 else torch.float32
        self.folder = Path(output_dir) / analysis_name
        self.profiler = Profiler(profile, self.device)
        self.group = Group(self.device)
        self._single = Group(self.device, single=True)  # for work every rank does whole (a query batch)
        self.disable_tqdm = disable_tqdm or not self.group.is_main
        self.save_interval = save_interval
        if max_elements == "auto":
            max_elements = CPU_MAX_ELEMENTS if self.device.type == "cpu" else None
        self.max_elements = max_elements

    def _log(self, message: str) -> None:
        if self.group.is_main:
            tqdm.write(message)

    # ------------------------------------------------------------------ passes over data

    def _loss(self, kind: str) -> tuple[Callable[[Any, nn.Module], torch.Tensor], str]:
        if kind == "measurement":
            return self.task.compute_measurement, "compute_measurement"
        sample = kind == "sampled"
        return (lambda batch, model: self.task.compute_train_loss(batch, model, sample=sample)), "compute_train_loss"

    def _pass_dtype(self, half: bool) -> torch.dtype:
        """bf16 passes keep a and g in bf16 for the products of Lambda, self-influence and pairwise scores;
        covariances and the preconditioning of queries stay in fp32."""
        return torch.bfloat16 if half else self.dtype

    @contextlib.contextmanager
    def _seeded(self, seed: int) -> Iterator[None]:
        """Run with the global RNGs seeded, then restore them: sampled labels depend on the batch alone."""
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.random.default_generator.manual_seed(seed)
            if devices:
                with torch.cuda.device(self.device):
                    torch.cuda.manual_seed(seed)
            yield

    def _pass(
        self,
        data: Iterable[Any],
        process: Callable[[Layer, torch.Tensor, torch.Tensor], None],
        loss: str,
        half: bool,
        desc: str,
        dtype: torch.dtype | None = None,
        limit: int | None = None,
        end_batch: Callable[[int, int], None] | None = None,
        seed: int = 0,
        first: int = 0,
        done_sizes: list[int] | None = None,
        save: Callable[[int, list[int]], None] | None = None,
        local: bool = False,
    ) -> list[int]:
        """One pass: forward/backward this rank's batches, `process` each layer's (a, g); returns every batch's size.

        Batches before `first` were done by an interrupted run (their sizes must be `done_sizes`); the rest go
        round-robin to the ranks. end_batch(offset, count) follows each batch this rank ran; save(batches,
        sizes) runs on every rank at the end of a round, once every save_interval seconds, and returns what it
        saved (rank 0). A stop asked by SIGTERM or SIGINT (see interrupt.py) on any rank is acted on at the end of
        the round: every rank saves its share, then raises interrupt.Interrupted.
        """
        loss_fn, what = self._loss(loss)
        sizes: list[int] = []
        offset = 0
        last_save = time.monotonic()
        group = self._single if local else self.group
        world, rank = group.world, group.rank
        total = len(data) if hasattr(data, "__len__") else None
        progress = tqdm(desc=desc, total=total, initial=first, disable=self.disable_tqdm, leave=False)
        # A local pass (one batch that every rank runs whole) is part of a larger step: the stop waits for that.
        stoppable = contextlib.nullcontext() if local else interrupt.polling()
        capture = Capture(self.model, self.layers, process, dtype or self.dtype, self.max_elements)
        with progress, stoppable, capture:
            for index, batch in enumerate(data):
                size = batch_length(batch)
                count = size if limit is None else max(0, min(size, limit - offset))
                if count == 0:
                    break
                if index < first:
                    if done_sizes is None or index >= len(done_sizes) or done_sizes[index] != count:
                        raise _Restart
                elif (index - first) % world == rank:
                    batch = to_device(batch, self.device)
                    sampling = self._seeded(batch_seed(seed, offset, count)) if loss == "sampled" else None
                    try:
                        with sampling or contextlib.nullcontext():
                            backward_batch(capture, self.model, batch, loss_fn, half, what, count)
                    except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError (the same class) needs torch 2.5
                        raise InfluenceError(
                            f"out of memory on {self.device} in '{desc}' with batches of {capture.batch_size}: "
                            "use smaller batches (--train_batch_size, --query_batch_size)"
                        ) from None
                    if end_batch is not None:
                        end_batch(offset, count)
                offset += count
                sizes.append(count)
                if index >= first:
                    progress.update(1)
                    if (index - first) % world == world - 1:
                        wanted = save is not None and time.monotonic() - last_save >= self.save_interval
                        saving, stop = group.sync_round(wanted, None if local else interrupt.requested())
                        if stop:
                            self._stop(stop, save, index + 1, sizes)
                        if saving and save is not None:
                            save(index + 1, sizes)
                            last_save = time.monotonic()
        if first > len(sizes):
            raise _Restart
        if not sizes:
            raise InfluenceError(f"{desc}: the dataset yielded no batch")
        return sizes

    def _stop(self, signum: int, save: Callable[[int, list[int]], str] | None, batches: int, sizes: list[int]) -> None:
        """Save what the pass has (every rank its share) and raise Interrupted; rank 0's message says what and where.

        The ranks wait for rank 0's write before any of them leaves: torchrun stops the remaining workers as soon
        as one exits with an error."""
        interrupt.note(signum)
        saved = None
        if save is not None:
            start = time.monotonic()
            saved = save(batches, sizes)
            self.group.barrier()
            saved = f"{saved} in {time.monotonic() - start:.2f} s"
        raise interrupt.stopped(signum, saved)

    def _resumable_pass(
        self,
        result: Path,
        state: Sums | _Columns,
        run: Callable[..., list[int]],
        desc: str,
        saved: tuple[dict[str, torch.Tensor], dict[str, Any]] | None | str = "read",
        write: Callable[[dict[str, torch.Tensor], dict[str, Any]], None] | None = None,
    ) -> list[int]:
        """Run a pass through `run(first=, done_sizes=, save=)`, resuming from (and saving) result's partial file.

        `state` holds what the pass accumulates (sums, or score columns); on rank 0 it starts from the partial
        result, and at each save every rank's share is summed into rank 0's, which writes it. A pass whose
        partial state shares a file with other results (a pairwise query batch) gets that state as `saved`
        (rank 0: (tensors, progress) or None) and writes it through write(tensors, progress).
        """
        partial = partial_path(result)

        def resume() -> dict[str, Any] | None:
            loaded = self._read_partial(partial, desc, self.device) if saved == "read" else saved
            if loaded is None:
                return None
            tensors, progress = loaded
            try:
                state.load(tensors)
            except (KeyError, ValueError, RuntimeError):
                if saved != "read":  # the file holds other results: keep it, redo this pass
                    self._log(f"{desc}: the state saved in {partial.name} does not fit; starting the pass over")
                    return None
                return self._discard_partial(partial, desc, "made for another model")
            return progress

        progress = self.group.on_main(resume) or {"batches": 0, "sizes": []}
        first, done = progress["batches"], progress["sizes"]
        state.start_at(sum(done))
        if first:
            self._log(
                f"{desc}: resuming from {partial.name} after {first} batches ({sum(done)} examples) "
                "saved by an interrupted run"
            )

        def save(batches: int, sizes: list[int]) -> str:
            state.flush(self.group, sum(sizes))
            if self.group.is_main:
                progress = {"batches": batches, "sizes": sizes}
                with self.profiler.record("Save Partial Result"):
                    if write is None:
                        save_partial(partial, state.tensors(), progress)
                    else:
                        write(state.tensors(), progress)
            return f"{desc} after {batches} batches ({sum(sizes)} examples) to {partial}"

        try:
            sizes = run(first=first, done_sizes=done, save=save)
        except _Restart:
            self._log(f"{desc}: {partial.name} was saved with other batches; starting the pass over")
            state.reset()
            sizes = run(first=0, done_sizes=None, save=save)
        state.flush(self.group, sum(sizes))
        return sizes

    def _read_partial(
        self, partial: Path, desc: str, device: torch.device | str
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """Rank 0: (tensors, progress) saved by an interrupted run, or None (none saved, or discarded as unusable)."""
        if not partial.exists():
            return None
        loaded = load_partial(partial, device)
        if isinstance(loaded, str):
            return self._discard_partial(partial, desc, loaded)
        return loaded

    def _discard_partial(self, partial: Path, desc: str, reason: str) -> None:
        self._log(f"{desc}: discarding {partial} ({reason}); starting the pass over")
        partial.unlink()

    def _drop_partial(self, result: Path) -> None:
        partial_path(result).unlink(missing_ok=True)

    def per_example_gradients(
        self, batch: Any, measurement: bool = False, sample: bool = False
    ) -> dict[str, torch.Tensor]:
        """G[n] per tracked module, [B, out, in'] (bias as the last column), of the loss or of the measurement."""
        chunks: dict[str, list[torch.Tensor]] = {}

        def process(layer: Layer, a: torch.Tensor, g: torch.Tensor) -> None:
            chunks.setdefault(layer.name, []).append(layer.to_weight_order(per_example_gradient(a, g)))

        kind = "measurement" if measurement else ("sampled" if sample else "train")
        self._pass([batch], process, kind, half=False, desc="Per-example gradients", local=True)
        return {name: torch.cat(parts) for name, parts in chunks.items()}

    # ------------------------------------------------------------------ factors

    def factors_folder(self, factors_name: str) -> Path:
        return self.folder / f"factors_{factors_name}"

    def scores_folder(self, scores_name: str) -> Path:
        return self.folder / f"scores_{scores_name}"

    def _exists(self, *paths: Path) -> bool:
        return self.group.on_main(lambda: all(path.exists() for path in paths))

    def fit_all_factors(
        self,
        factors_name: str,
        dataset: Iterable[Any],
        factor_args: FactorArguments | None = None,
        overwrite_output_dir: bool = False,
    ) -> dict[str, dict[str, torch.Tensor]]:
        """Fit (or reuse) every factor the strategy needs; each step is saved as it ends, so a rerun resumes."""
        args = factor_args or FactorArguments()
        folder = self.factors_folder(factors_name)
        module_names = [layer.name for layer in self.layers]

        def prepare() -> None:
            if overwrite_output_dir:
                clear_folder(folder)
            check_arguments(folder, FACTOR_ARGUMENTS, {**to_dict(args), "modules": module_names}, "factors")

        self.group.on_main(prepare)
        eigen, fit_lambda = _needs(args.strategy)
        if eigen:
            self._fit_covariance(folder, dataset, args)
            self._perform_eigendecomposition(folder, args)
        if fit_lambda:
            self._fit_lambda(folder, dataset, args)
        with self.profiler.record("Load All Factors"):
            return self.load_all_factors(factors_name)

    def _factor_pass(
        self,
        result: Path,
        accumulator: Sums,
        dataset: Iterable[Any],
        args: FactorArguments,
        desc: str,
        dtype: torch.dtype,
    ) -> None:
        """A resumable pass over the training data accumulating `accumulator` under the factor arguments' loss."""
        self._resumable_pass(
            result,
            accumulator,
            lambda **resume: self._pass(
                dataset,
                accumulator.update,
                "train" if args.use_empirical_fisher else "sampled",
                args.use_half_precision,
                desc,
                dtype=dtype,
                limit=args.max_examples,
                seed=args.seed,
                **resume,
            ),
            desc,
        )

    def _fit_covariance(self, folder: Path, dataset: Iterable[Any], args: FactorArguments) -> None:
        if self._exists(*(folder / f"{name}.safetensors" for name in COVARIANCES)):
            return
        accumulator = CovarianceAccumulator(self.layers, self.dtype, self.device)
        result = folder / "activation_covariance.safetensors"
        with self.profiler.record("Fit Covariance"):
            self._factor_pass(result, accumulator, dataset, args, "Fit covariance", self.dtype)

        def save() -> None:
            activation, gradient, rows = accumulator.finish()
            with self.profiler.record("Save Covariance"):
                save_tensors(folder / "gradient_covariance.safetensors", gradient, {"rows": rows})
                save_tensors(result, activation, {"rows": rows})
            self._drop_partial(result)

        self.group.on_main(save)

    def _perform_eigendecomposition(self, folder: Path, args: FactorArguments) -> None:
        """Rank 0 reads the covariances and shares them; each rank decomposes its share of them (the one step of a
        factor fit that is not a pass over the data, so it would otherwise bound the speed-up); rank 0 saves."""
        done = [folder / f"{name}.safetensors" for name in EIGENDECOMPOSITION]

        def read() -> dict[str, dict[str, torch.Tensor]] | None:
            if all(path.exists() for path in done) and (
                args.strategy != "kfac" or (folder / f"{LAMBDA}.safetensors").exists()
            ):
                return None
            with self.profiler.record("Load Covariance"):
                return {name: load_tensors(folder / f"{name}.safetensors", self.device) for name in COVARIANCES}

        covariances = self.group.on_main(read)
        if covariances is None:
            return
        jobs = [
            (side, module, covariance)
            for side in ("activation", "gradient")
            for module, covariance in covariances[f"{side}_covariance"].items()
        ]
        owners = balanced_owners([covariance.shape[0] ** 3 for _, _, covariance in jobs], self.group.world)
        results: dict[str, dict[str, torch.Tensor]] = {name: {} for name in EIGENDECOMPOSITION}
        with self.profiler.record("Perform Eigendecomposition"):
            for (side, module, covariance), owner in zip(jobs, owners, strict=True):
                if owner == self.group.rank:
                    values, vectors = eigendecomposition(covariance, self.dtype)
                else:  # zeros, so that the sum into rank 0 is the owner's result exactly
                    size = covariance.shape[0]
                    values = torch.zeros(size, dtype=self.dtype, device=self.device)
                    vectors = torch.zeros(size, size, dtype=self.dtype, device=self.device)
                results[f"{side}_eigenvalues"][module] = values
                results[f"{side}_eigenvectors"][module] = vectors
            self.group.sum_to_main([tensor for tensors in results.values() for tensor in tensors.values()])

        def save() -> None:
            with self.profiler.record("Save Eigendecomposition"):
                for name, tensors in results.items():
                    save_tensors(folder / f"{name}.safetensors", tensors)
            if args.strategy == "kfac":
                lambdas = {
                    module: kfac_lambda(results["gradient_eigenvalues"][module], values)
                    for module, values in results["activation_eigenvalues"].items()
                }
                with self.profiler.record("Save Lambda"):
                    save_tensors(folder / f"{LAMBDA}.safetensors", lambdas)

        self.group.on_main(save)

    def _fit_lambda(self, folder: Path, dataset: Iterable[Any], args: FactorArguments) -> None:
        result = folder / f"{LAMBDA}.safetensors"
        if self._exists(result):
            return
        eigenvectors = None
        if args.strategy == "ekfac":
            with self.profiler.record("Load Eigendecomposition"):
                q_a, q_s = self.group.on_main(
                    lambda: [
                        load_tensors(folder / f"{side}_eigenvectors.safetensors", self.device)
                        for side in ("activation", "gradient")
                    ]
                )
            eigenvectors = {name: (q_a[name], q_s[name]) for name in q_a}
        accumulator = LambdaAccumulator(self.layers, self.dtype, self.device, eigenvectors)
        with self.profiler.record("Fit Lambda"):
            self._factor_pass(
                result, accumulator, dataset, args, "Fit Lambda", self._pass_dtype(args.use_half_precision)
            )

        def save() -> None:
            lambdas, examples = accumulator.finish()
            with self.profiler.record("Save Lambda"):
                save_tensors(result, lambdas, {"examples": examples})
            self._drop_partial(result)

        self.group.on_main(save)

    def load_factor_arguments(self, factors_name: str) -> FactorArguments:
        path = self.factors_folder(factors_name) / FACTOR_ARGUMENTS

        def read() -> dict[str, Any]:
            if not path.exists():
                raise InfluenceError(
                    f"no factors named {factors_name!r} in {path.parent}: "
                    "fit them first (fit_all_factors, or analyze.py)"
                )
            saved = read_json(path)
            saved.pop("modules", None)
            return saved

        saved = self.group.on_main(read)
        try:
            return FactorArguments(**saved)
        except TypeError as error:
            raise InfluenceError(f"{path} does not hold factor arguments ({error}): {FIX_HINT}") from None

    def load_all_factors(self, factors_name: str) -> dict[str, dict[str, torch.Tensor]]:
        """{factor kind: {module name: tensor}} for every factor file the strategy leaves on disk."""
        args = self.load_factor_arguments(factors_name)
        folder = self.factors_folder(factors_name)
        eigen, fit_lambda = _needs(args.strategy)
        kinds = (list(COVARIANCES) + list(EIGENDECOMPOSITION) if eigen else []) + (
            [LAMBDA] if eigen or fit_lambda else []
        )

        def read() -> dict[str, dict[str, torch.Tensor]]:
            factors = {}
            for kind in kinds:
                path = folder / f"{kind}.safetensors"
                if not path.exists():
                    raise InfluenceError(
                        f"factors {factors_name!r} in {folder} are incomplete ({path.name} is missing): "
                        "run fit_all_factors again to finish them"
                    )
                factors[kind] = load_tensors(path, self.device)
            return factors

        return self.group.on_main(read)

    def factor_counts(self, factors_name: str) -> dict[str, Any]:
        """How many rows (covariances) and examples (Lambda) the saved factors were fitted on."""
        folder = self.factors_folder(factors_name)

        def read() -> dict[str, Any]:
            counts = {}
            for kind in ("activation_covariance", LAMBDA):
                path = folder / f"{kind}.safetensors"
                if path.exists():
                    counts.update(load_metadata(path))
            return counts

        return self.group.on_main(read)

    # ------------------------------------------------------------------ scores

    def _preconditioners(self, factors_name: str, args: ScoreArguments) -> tuple[dict[str, LayerPreconditioner], dict]:
        factor_args = self.load_factor_arguments(factors_name)
        with self.profiler.record("Load All Factors"):
            factors = self.load_all_factors(factors_name)
        preconditioners = {}
        for layer in self.layers:
            if LAMBDA in factors and layer.name not in factors[LAMBDA]:
                raise InfluenceError(
                    f"factors {factors_name!r} have no entry for module {layer.name!r}: refit them for this model"
                )
            per_module = {kind: tensors[layer.name] for kind, tensors in factors.items() if layer.name in tensors}
            preconditioners[layer.name] = LayerPreconditioner.build(
                factor_args.strategy, per_module, args.damping_factor, layer
            )
        return preconditioners, to_dict(factor_args)

    def _prepare_scores(
        self, scores_name: str, factors_name: str, args: ScoreArguments, overwrite: bool, filename: str
    ) -> tuple[Path, dict[str, LayerPreconditioner], bool]:
        """(result path, preconditioners, whether the scores are on disk already)."""
        preconditioners, factor_args = self._preconditioners(factors_name, args)
        folder = self.scores_folder(scores_name)
        path = folder / filename

        def prepare() -> bool:
            if overwrite:
                clear_folder(folder)
            recorded = {**to_dict(args), "factors_name": factors_name, "factor_arguments": factor_args}
            check_arguments(folder, SCORE_ARGUMENTS, recorded, "scores")
            return path.exists()

        return path, preconditioners, self.group.on_main(prepare)

    def compute_pairwise_scores(
        self,
        scores_name: str,
        factors_name: str,
        query_dataset: Iterable[Any],
        train_dataset: Iterable[Any],
        score_args: ScoreArguments | None = None,
        overwrite_output_dir: bool = False,
    ) -> dict[str, torch.Tensor]:
        """{"all_modules": [n_query, n_train]} (plus one entry per module with per_module), saved and returned.

        Each query batch is preconditioned once and held while one pass over the training data contracts it
        with every training batch's per-example gradients: the query batch size trades memory for passes.
        Each finished query batch's rows are saved as a partial result, so an interrupted run resumes there.
        """
        args = score_args or ScoreArguments()
        path, preconditioners, saved = self._prepare_scores(
            scores_name, factors_name, args, overwrite_output_dir, PAIRWISE_SCORES
        )
        if saved:
            with self.profiler.record("Load Pairwise Score"):
                return self._load_scores(scores_name, PAIRWISE_SCORES)
        with self.profiler.record("Compute Pairwise Score"):
            scores = self._pairwise(path, preconditioners, query_dataset, train_dataset, args)

        def save() -> None:
            with self.profiler.record("Save Pairwise Score"):
                save_tensors(path, scores)
            self._drop_partial(path)

        self.group.on_main(save)
        return self.group.share(scores if self.group.is_main else None, device="cpu")

    def _pairwise(
        self,
        path: Path,
        preconditioners: dict[str, LayerPreconditioner],
        query_dataset: Iterable[Any],
        train_dataset: Iterable[Any],
        args: ScoreArguments,
    ) -> dict[str, torch.Tensor] | None:
        """Every query batch's block of scores, joined on rank 0 (None elsewhere); resumes from a partial file.

        The partial file holds the rows of the finished query batches and, under keys "block/<name>" with
        progress "block", the columns the next query batch had when its pass over the training data was saved.
        """
        partial = partial_path(path)

        resumed = self.group.on_main(lambda: self._read_partial(partial, "Pairwise scores", "cpu"))
        rows: dict[str, torch.Tensor] = {}
        done_sizes: list[int] = []
        block_saved = None
        if resumed is not None:
            tensors, progress = resumed
            rows = {name: tensor for name, tensor in tensors.items() if not name.startswith(BLOCK)}
            done_sizes = progress["query_sizes"]
            if isinstance(progress.get("block"), dict):
                block = {name.removeprefix(BLOCK): t for name, t in tensors.items() if name.startswith(BLOCK)}
                block_saved = (block, progress["block"])
            self._log(
                f"Pairwise scores: resuming from {partial.name} after {len(done_sizes)} query batches "
                f"({sum(done_sizes)} queries) saved by an interrupted run"
            )
        sizes: list[int] = []
        total = len(query_dataset) if hasattr(query_dataset, "__len__") else None
        progress_bar = tqdm(desc="Query batches", total=total, disable=self.disable_tqdm)
        with progress_bar:
            for index, query_batch in enumerate(query_dataset):
                size = batch_length(query_batch)
                sizes.append(size)
                if index < len(done_sizes):
                    if done_sizes[index] != size:
                        raise InfluenceError(
                            f"{partial} was saved with query batches of other sizes: delete it, or rerun with the "
                            "same query batch size"
                        )
                    progress_bar.update(1)
                    continue

                def write(columns: dict[str, torch.Tensor], progress: dict[str, Any], rows=rows, done=sizes[:-1]):
                    block = {f"{BLOCK}{name}": tensor for name, tensor in columns.items()}
                    save_partial(partial, {**rows, **block}, {"query_sizes": done, "block": progress})

                resume = block_saved if index == len(done_sizes) else None
                desc = f"Pairwise scores of query batch {index + 1}"
                block = self._pairwise_block(
                    preconditioners, query_batch, train_dataset, args, path, desc, resume, write
                )
                if self.group.is_main:
                    if rows and any(rows[name].shape[1] != block[name].shape[1] for name in block):
                        raise InfluenceError(
                            f"{partial} holds scores of another number of training examples: delete it"
                        )
                    rows = {name: torch.cat([rows[name], part]) if rows else part for name, part in block.items()}
                    with self.profiler.record("Save Partial Result"):
                        save_partial(partial, rows, {"query_sizes": sizes})
                progress_bar.update(1)
        if not sizes:
            raise InfluenceError("the query dataset yielded no batch")
        return rows if self.group.is_main else None

    def _pairwise_block(
        self,
        preconditioners: dict[str, LayerPreconditioner],
        query_batch: Any,
        train_dataset: Iterable[Any],
        args: ScoreArguments,
        path: Path,
        desc: str,
        saved: tuple[dict[str, torch.Tensor], dict[str, Any]] | None,
        write: Callable[[dict[str, torch.Tensor], dict[str, Any]], None],
    ) -> dict[str, torch.Tensor]:
        """Scores of one query batch against every training example, [Q, N], on rank 0's CPU.

        Its pass over the training data is resumable: it starts from `saved` (rank 0) and saves through `write`.
        """
        contract_dtype = self._pass_dtype(args.use_half_precision)
        preconditioned: dict[str, list[torch.Tensor]] = {}

        def precondition(layer: Layer, a: torch.Tensor, g: torch.Tensor) -> None:
            gradient = preconditioners[layer.name].precondition(a, g)
            preconditioned.setdefault(layer.name, []).append(gradient.reshape(gradient.shape[0], -1))

        # Every rank preconditions the query batch itself: it costs one query batch's gradients, where sending
        # the preconditioned [Q, P] gradients would cost Q * P elements per rank.
        self._pass([query_batch], precondition, "measurement", args.use_half_precision, "Query gradients", local=True)
        queries = {name: torch.cat(parts).to(contract_dtype) for name, parts in preconditioned.items()}
        preconditioned.clear()  # the per-chunk copies; `queries` holds them joined
        count = next(iter(queries.values())).shape[0]
        columns = _Columns(self.layers, args.per_module, (count,), self.dtype, self.device)

        def contract(layer: Layer, a: torch.Tensor, g: torch.Tensor) -> None:
            gradient = per_example_gradient(a, g).flatten(1)
            query = queries[layer.name]
            flops.add(2 * query.shape[0] * gradient.numel(), query.dtype, query.device)
            columns.add(layer.name, (query @ gradient.T).to(self.dtype))

        self._resumable_pass(
            path,
            columns,
            lambda **resume: self._pass(
                train_dataset,
                contract,
                "train",
                args.use_half_precision,
                "Pairwise scores",
                dtype=contract_dtype,
                end_batch=columns.end_batch,
                **resume,
            ),
            desc,
            saved=saved,
            write=write,
        )
        return columns.result()

    def compute_self_scores(
        self,
        scores_name: str,
        factors_name: str,
        train_dataset: Iterable[Any],
        score_args: ScoreArguments | None = None,
        overwrite_output_dir: bool = False,
    ) -> dict[str, torch.Tensor]:
        """{"all_modules": [n_train]} of <P(G_L[n]), G_L[n]> (plus one entry per module with per_module), saved."""
        args = score_args or ScoreArguments()
        path, preconditioners, saved = self._prepare_scores(
            scores_name, factors_name, args, overwrite_output_dir, SELF_SCORES
        )
        if saved:
            with self.profiler.record("Load Self-Influence Score"):
                return self._load_scores(scores_name, SELF_SCORES)
        columns = _Columns(self.layers, args.per_module, (), self.dtype, self.device)

        def score(layer: Layer, a: torch.Tensor, g: torch.Tensor) -> None:
            columns.add(layer.name, preconditioners[layer.name].self_score(a, g).to(self.dtype))

        with self.profiler.record("Compute Self-Influence Score"):
            self._resumable_pass(
                path,
                columns,
                lambda **resume: self._pass(
                    train_dataset,
                    score,
                    "train",
                    args.use_half_precision,
                    "Self-influence scores",
                    dtype=self._pass_dtype(args.use_half_precision),
                    end_batch=columns.end_batch,
                    **resume,
                ),
                "Self-influence scores",
            )
        scores = columns.result() if self.group.is_main else None

        def save() -> None:
            with self.profiler.record("Save Self-Influence Score"):
                save_tensors(path, scores)
            self._drop_partial(path)

        self.group.on_main(save)
        return self.group.share(scores, device="cpu")

    def load_score_arguments(self, scores_name: str) -> dict[str, Any]:
        """The arguments recorded with saved scores (as in score_arguments.json)."""
        path = self.scores_folder(scores_name) / SCORE_ARGUMENTS

        def read() -> dict[str, Any]:
            if not path.exists():
                raise InfluenceError(f"no scores named {scores_name!r} in {path.parent}: compute them first")
            return read_json(path)

        return self.group.on_main(read)

    def has_self_scores(self, scores_name: str) -> bool:
        return self._exists(self.scores_folder(scores_name) / SELF_SCORES)

    def has_pairwise_scores(self, scores_name: str) -> bool:
        return self._exists(self.scores_folder(scores_name) / PAIRWISE_SCORES)

    def load_pairwise_scores(self, scores_name: str) -> dict[str, torch.Tensor]:
        return self._load_scores(scores_name, PAIRWISE_SCORES)

    def load_self_scores(self, scores_name: str) -> dict[str, torch.Tensor]:
        return self._load_scores(scores_name, SELF_SCORES)

    def _load_scores(self, scores_name: str, filename: str) -> dict[str, torch.Tensor]:
        path = self.scores_folder(scores_name) / filename

        def read() -> dict[str, torch.Tensor]:
            if not path.exists():
                raise InfluenceError(f"no scores at {path}: compute them first")
            return load_tensors(path)

        return self.group.on_main(read, device="cpu")


class _Columns:
    """Score columns of the training examples: all modules summed (and each module, when asked).

    Each rank keeps the columns of the batches it ran since the last flush; a flush sums the ranks' columns into
    rank 0 (zeros where a rank did not run a batch, so the sum is exact), which appends them to the columns done.
    """

    def __init__(
        self, layers: list[Layer], per_module: bool, lead: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> None:
        self.names = [ALL_MODULES] + ([layer.name for layer in layers] if per_module else [])
        self.per_module, self.lead, self.dtype, self.device = per_module, lead, dtype, device
        self.reset()

    def reset(self) -> None:
        self.done = {name: torch.zeros(*self.lead, 0, dtype=self.dtype, device=self.device) for name in self.names}
        self.pending: list[tuple[int, dict[str, torch.Tensor]]] = []
        self.current: dict[str, list[torch.Tensor]] = {}
        self.flushed = 0  # examples whose columns are on rank 0 (known to every rank)

    def start_at(self, examples: int) -> None:
        """A resumed pass: the columns of the first `examples` came from the partial result (on rank 0)."""
        self.flushed = examples

    def add(self, module: str, part: torch.Tensor) -> None:
        """A chunk of consecutive examples of the current batch, for one module."""
        self.current.setdefault(module, []).append(part)

    def end_batch(self, offset: int, _: int) -> None:
        per_module = {name: torch.cat(parts, dim=-1) for name, parts in self.current.items()}
        batch = {ALL_MODULES: sum(per_module.values())}
        if self.per_module:
            batch.update(per_module)
        self.pending.append((offset, batch))
        self.current = {}

    def flush(self, group: Group, examples: int) -> None:
        """Columns up to example `examples` (a prefix every rank has finished) onto rank 0."""
        start, self.flushed = self.flushed, examples
        new = {
            name: torch.zeros(*self.lead, examples - start, dtype=self.dtype, device=self.device) for name in self.names
        }
        for offset, batch in self.pending:
            for name, part in batch.items():
                new[name][..., offset - start : offset - start + part.shape[-1]] = part
        self.pending = []
        group.sum_to_main(list(new.values()))
        if group.is_main:
            self.done = {name: torch.cat([self.done[name], new[name]], dim=-1) for name in self.names}

    def tensors(self) -> dict[str, torch.Tensor]:
        return self.done

    def load(self, saved: dict[str, torch.Tensor]) -> None:
        if set(saved) != set(self.names) or any(saved[n].shape[:-1] != self.done[n].shape[:-1] for n in self.names):
            raise KeyError("columns")
        self.done = {name: saved[name].to(self.device, self.dtype) for name in self.names}

    def result(self) -> dict[str, torch.Tensor]:
        """Float32 on the CPU, or float64 for a float64 model."""
        out = torch.float64 if self.dtype == torch.float64 else torch.float32
        return {name: tensor.to("cpu", out) for name, tensor in self.done.items()}
