"""The user's API: fit factors, pairwise and self scores, each step a pass saved as it finishes.

    fit_all_factors:          covariance pass -> eigendecomposition -> Lambda pass   (what the strategy needs)
    compute_pairwise_scores:  per query batch: precondition its gradients once, then one pass over the
                              training data contracting them with each batch's per-example gradients
    compute_self_scores:      one pass over the training data

A dataset is any iterable of batches that can be iterated more than once (a DataLoader, a list...).
Batches are moved to the model's device and handed to the Task as they are.

Each pass is described here (its data, loss, dtype, per-layer step, running state and result files) and run by
passes.Loop, the one place that splits batches across processes (torchrun), saves partial results every
`save_interval` seconds (the pairwise pass: after each query batch), stops on SIGTERM, resumes, reduces and
writes the result. Files are read and written through storage.Store, which does the disk work on rank 0.

Peak memory of compute_pairwise_scores, in elements (times 4 bytes in fp32, 2 for the bf16 parts):
    Q * P                 preconditioned query gradients, Q = query batch size, P = tracked parameters
  + C * max_l(out_l * in'_l) + C * max_l(T_l * (in'_l + out_l))   one chunk's per-example gradients and a, g,
                          C = examples per chunk (max_elements bounds each of these tensors)
  + Q * N                 the scores
  + the model's own forward/backward memory for a batch of B examples (a training batch, or a query batch's
                          slice of query_slice_size queries; without it the whole query batch).
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

from influence import flops
from influence.arguments import FactorArguments, ScoreArguments, to_dict
from influence.capture import (
    Capture,
    Inputs,
    backward_batch,
    batch_length,
    batch_slice,
    per_example_gradient,
    to_device,
)
from influence.distributed import Group, balanced_owners
from influence.errors import InfluenceError
from influence.factors import CovarianceAccumulator, LambdaAccumulator, eigendecomposition, kfac_lambda
from influence.modules import Layer, find_layers, input_patches
from influence.passes import ALL_MODULES, SECONDS, Columns, Loop, Pass, Rows
from influence.precondition import LayerPreconditioner
from influence.products import held_dtype, matmul
from influence.profiler import Profiler, synchronize
from influence.shifted import covariance_input
from influence.storage import (
    FACTOR_ARGUMENTS,
    FIX_HINT,
    PAIRWISE_SCORES,
    SCORE_ARGUMENTS,
    SELF_SCORES,
    Store,
    partial_path,
)
from influence.strategies import COVARIANCES, EIGENDECOMPOSITION, LAMBDA, Strategy, get_strategy
from influence.task import Task

# Largest a, g or per-example-gradient tensor handed to a step at once, in elements, on the CPU: 256 MB in fp32.
# Measured on a 2-core CPU (EK-FAC factors and self-influence of 512 images): batches of 512 in chunks of this
# size ran as fast as the best plain batch size, where whole batches of 512 took 30% longer and twice the memory,
# re-faulting hundreds of MB of fresh pages per layer. GPUs take whole batches.
CPU_MAX_ELEMENTS = 2**26

# Metadata key of a factor file: the strategy it was fitted for (K-FAC and EK-FAC share covariances and eigenbases).
FITTED_FOR = "strategy"

# A factor step's report that it found its result made by an earlier run: finished(action, result file).
Finished = Callable[[str, Path], None]

# What a query batch's errors ask of the model: the preconditioned rows of a module come from every forward pass.
EVERY_FORWARD = "every tracked module must run in every forward pass (leave it out of tracked_modules())"

# Seconds between saves of a pass's partial sums when the Analyzer is given none.
DEFAULT_SAVE_INTERVAL = 120.0


def batch_seed(seed: int, offset: int, count: int) -> int:
    """The RNG seed of the batch of `count` examples starting at example `offset`: the same on any rank."""
    return (seed * 0x9E3779B1 + offset * 0x85EBCA77 + count * 0xC2B2AE3D) % (2**63 - 1)


@contextlib.contextmanager
def seeded_rngs(seed: int, device: torch.device | str) -> Iterator[None]:
    """Run with torch's global RNGs of the CPU and of `device` (a GPU's, where it is one) seeded `seed`, then
    restore them: what a batch draws (the true Fisher's labels) depends on the seed alone."""
    device = torch.device(device)
    devices = [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.random.default_generator.manual_seed(seed)
        if devices:
            with torch.cuda.device(devices[0]):
                torch.cuda.manual_seed(seed)
        yield


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
        save_interval: float = DEFAULT_SAVE_INTERVAL,
        max_elements: int | None | str = "auto",
        log: Callable[[str], None] | None = None,
    ) -> None:
        parameters = list(model.parameters())
        if not parameters:
            raise InfluenceError("the model has no parameters to score")
        self.model, self.task = model.eval(), task
        self.layers: list[Layer] = find_layers(model, task.tracked_modules())
        self.device = parameters[0].device
        self.dtype = torch.float64 if parameters[0].dtype == torch.float64 else torch.float32
        self.folder = Path(output_dir) / analysis_name
        self.user_log = log
        self.profiler = Profiler(profile, self.device)
        self.group = Group(self.device)
        self.store = Store(self.folder, self.group, self._log)
        self.loop = Loop(self.group, self.store, self.profiler, save_interval, disable_tqdm or not self.group.is_main)
        if max_elements == "auto":
            max_elements = CPU_MAX_ELEMENTS if self.device.type == "cpu" else None
        self.max_elements = max_elements

    def _log(self, message: str) -> None:
        """What the analyzer says of reused, resumed or discarded results: one line on rank 0, through `log` when
        given (a program may say it in its own terms), else beside the progress bars."""
        if self.group.is_main:
            (self.user_log or tqdm.write)(message)

    # ------------------------------------------------------------------ one batch's forward and backward

    def _pass_dtype(self, half: bool) -> torch.dtype:
        """bf16 passes keep a and g in bf16 for the products of Lambda, self-influence and pairwise scores;
        covariances and the preconditioning of queries stay in fp32."""
        return torch.bfloat16 if half else self.dtype

    def _backward(
        self, capture: Capture, batch: Any, loss: str, half: bool, desc: str, seed: int, offset: int, count: int
    ) -> None:
        """Forward and backward one batch (its first `count` examples) with `capture`'s hooks handing each layer's
        (a, g) to its step. loss: "train" (dataset labels), "sampled" (true Fisher) or "measurement"."""
        if loss == "measurement":
            loss_fn, what = self.task.compute_measurement, "compute_measurement"
        else:
            sample = loss == "sampled"

            def loss_fn(batch: Any, model: nn.Module) -> torch.Tensor:
                return self.task.compute_train_loss(batch, model, sample=sample)

            what = "compute_train_loss"
        examples = batch_length(batch)
        sampling = (
            seeded_rngs(batch_seed(seed, offset, count), self.device) if loss == "sampled" else contextlib.nullcontext()
        )
        try:
            batch = to_device(batch, self.device)
            with sampling:
                backward_batch(capture, self.model, batch, loss_fn, half, what, count)
        except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError (the same class) needs torch 2.5
            raise InfluenceError(
                f"out of memory on {self.device} in '{desc}' with batches of {examples}: "
                "use smaller training or query batches"
            ) from None

    def _one_batch(self, batch: Any, step: Callable[..., None], loss: str, half: bool, desc: str) -> None:
        """A batch that every rank runs whole, as part of a larger step (a query batch): not a pass of its own."""
        with Capture(self.model, self.layers, step, self.dtype, self.max_elements) as capture:
            self._backward(capture, batch, loss, half, desc, 0, 0, batch_length(batch))

    def _train_pass(
        self,
        job: Pass,
        step: Callable[..., None],
        loss: str,
        half: bool,
        dtype: torch.dtype,
        after=None,
        seed=0,
        gradients: bool = True,
        inputs: Inputs = input_patches,
    ) -> list | None:
        """Run `job` over training batches: each batch's forward and backward hands every layer's (a, g) to `step`
        in `dtype`, then after(offset) follows. Returns the loop's result files (rank 0). `gradients`: whether
        `step` forms per-example gradients, `inputs` what it gets of a layer's input (see Capture)."""
        with Capture(self.model, self.layers, step, dtype, self.max_elements, gradients, inputs) as capture:

            def run_batch(_: int, offset: int, batch: Any, count: int) -> None:
                self._backward(capture, batch, loss, half, job.desc, seed, offset, count)
                if after is not None:
                    after(offset)

            job.run_batch = run_batch
            return self.loop.run(job)

    def per_example_gradients(
        self, batch: Any, measurement: bool = False, sample: bool = False
    ) -> dict[str, torch.Tensor]:
        """G[n] per tracked module, [B, out, in'] (bias as the last column), of the loss or of the measurement."""
        chunks: dict[str, list[torch.Tensor]] = {}

        def process(layer: Layer, a: torch.Tensor, g: torch.Tensor) -> None:
            chunks.setdefault(layer.name, []).append(layer.to_weight_order(per_example_gradient(a, g)))

        kind = "measurement" if measurement else ("sampled" if sample else "train")
        self._one_batch(batch, process, kind, False, "Per-example gradients")
        return {name: torch.cat(parts) for name, parts in chunks.items()}

    # ------------------------------------------------------------------ factors

    def factors_folder(self, factors_name: str) -> Path:
        return self.store.factors(factors_name)

    def scores_folder(self, scores_name: str) -> Path:
        return self.store.scores(scores_name)

    def fit_all_factors(
        self,
        factors_name: str,
        dataset: Iterable[Any],
        factor_args: FactorArguments | None = None,
        overwrite_output_dir: bool = False,
    ) -> dict[str, dict[str, torch.Tensor]]:
        """Fit (or reuse) every factor the strategy needs; each step is saved as it ends, so a rerun resumes."""
        args = factor_args or FactorArguments()
        strategy = get_strategy(args.strategy)
        folder = self.factors_folder(factors_name)
        recorded = {**to_dict(args), "modules": [layer.name for layer in self.layers]}
        results = [folder / f"{kind}.safetensors" for kind in strategy.factor_kinds()]

        def claimed() -> Path | None:  # scores that a stopped run was making from these factors
            return self.store.unfinished_scores(factors_name, to_dict(args))

        with self.store.writing(folder):
            self.store.prepare(folder, FACTOR_ARGUMENTS, recorded, "factors", overwrite_output_dir, results, claimed)
            # A job stopped after some of its steps had ended (the factors begun, or scores from them unfinished):
            # the steps it finished are rows of this run's timing table too, with the seconds their files keep.
            resumed = self.profiler.enabled and self.group.on_main(
                lambda: (
                    (any(folder.glob("*.safetensors")) and not all(path.exists() for path in results))
                    or claimed() is not None
                )
            )

            def finished(action: str, path: Path) -> None:
                if resumed:
                    self._count_finished(action, path, args.strategy)

            if strategy.eigenbasis:
                if not overwrite_output_dir:
                    self._take_eigenbasis(folder, recorded)
                self._fit_covariance(folder, dataset, args, finished)
                self._perform_eigendecomposition(folder, strategy, finished)
            if strategy.fits_lambda:
                self._fit_lambda(folder, dataset, args, strategy, finished)
            with self.profiler.record("Load All Factors"):
                return self.load_all_factors(factors_name)

    def _factor_pass(
        self,
        job: Pass,
        step: Callable[..., None],
        args: FactorArguments,
        dtype: torch.dtype,
        gradients: bool = True,
        inputs: Inputs = input_patches,
    ) -> None:
        """A pass over at most max_examples training examples under the factor arguments' loss."""
        job.limit = args.max_examples
        loss = "train" if args.use_empirical_fisher else "sampled"
        half = args.use_half_precision
        self._train_pass(job, step, loss, half, dtype, seed=args.seed, gradients=gradients, inputs=inputs)

    def _count_finished(self, action: str, path: Path, strategy: str) -> None:
        """`action`, which made `path` in an earlier run, as a row of the timing table with the seconds the file
        keeps; not for files of another strategy (K-FAC's covariances taken from EK-FAC's, see _take_eigenbasis)."""
        kept = self.store.metadata(path)
        seconds = kept.get(SECONDS)
        if kept.get(FITTED_FOR) != strategy or isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
            return
        self.profiler.earlier(action, float(seconds))
        self._log(f"{action}: {seconds:.1f} s in an earlier run of this job (kept in {path.name})")

    def _take_eigenbasis(self, folder: Path, recorded: dict[str, Any]) -> None:
        """K-FAC and EK-FAC fit the same covariances and eigenbases: take them from factors of this analysis made
        with the same arguments but the strategy, where there are such, instead of a pass and the decompositions."""
        names = [f"{name}.safetensors" for name in (*COVARIANCES, *EIGENDECOMPOSITION)]
        if self.store.exists(*(folder / name for name in names)):
            return
        source = self.store.take_from_sibling(folder, recorded, names, ignore="strategy")  # links: no timing row
        if source is not None:
            self._log(
                f"{folder.name}: the covariances and eigendecomposition are those of {source.name}, fitted with the "
                "same arguments"
            )

    def _fit_covariance(self, folder: Path, dataset: Iterable[Any], args: FactorArguments, finished: Finished) -> None:
        result = folder / "activation_covariance.safetensors"
        if self.store.exists(*(folder / f"{name}.safetensors" for name in COVARIANCES)):
            finished("Fit Covariance", result)
            return
        accumulator = CovarianceAccumulator(self.layers, self.dtype, self.device)

        def finish() -> list:
            activation, gradient, rows = accumulator.finish()
            kept = {"rows": rows, FITTED_FOR: args.strategy}
            return [(folder / "gradient_covariance.safetensors", gradient, kept), (result, activation, kept)]

        job = Pass("Fit covariance", dataset, accumulator, result, finish=finish, record="Fit Covariance")
        job.save_record = "Save Covariance"
        # Sums of a a^T and g g^T only, a convolution's a a^T from shifted products of its input where that is faster.
        self._factor_pass(job, accumulator.update, args, self.dtype, gradients=False, inputs=covariance_input)

    def _perform_eigendecomposition(self, folder: Path, strategy: Strategy, finished: Finished) -> None:
        """Rank 0 reads the covariances and shares them; each rank decomposes its share of them (the one step of a
        factor fit that is not a pass over the data, so it would otherwise bound the speed-up); rank 0 saves.
        K-FAC's Lambda comes from the eigenvalues, which are read back where they are saved already."""
        done = [folder / f"{name}.safetensors" for name in EIGENDECOMPOSITION]
        lambda_file = folder / f"{LAMBDA}.safetensors"
        needs_lambda = strategy.lambda_from_eigenvalues and not self.store.exists(lambda_file)
        if self.store.exists(*done):
            finished("Perform Eigendecomposition", done[0])
            if not needs_lambda:
                return
            with self.profiler.record("Load Eigendecomposition"):
                values = {
                    side: self.store.load(folder / f"{side}_eigenvalues.safetensors", self.device)
                    for side in ("activation", "gradient")
                }
        else:
            values = self._decompose(folder, strategy)
        if needs_lambda:
            lambdas = {
                module: kfac_lambda(values["gradient"][module], activation)
                for module, activation in values["activation"].items()
            }
            with self.profiler.record("Save Lambda"):
                self.store.save([(lambda_file, lambdas, None)])

    def _decompose(self, folder: Path, strategy: Strategy) -> dict[str, dict[str, torch.Tensor]]:
        """Eigendecompose and save every covariance; the eigenvalues per side ("activation", "gradient")."""
        with self.profiler.record("Load Covariance"):
            covariances = {name: self.store.load(folder / f"{name}.safetensors", self.device) for name in COVARIANCES}
        jobs = [
            (side, module, covariance)
            for side in ("activation", "gradient")
            for module, covariance in covariances[f"{side}_covariance"].items()
        ]
        owners = balanced_owners([covariance.shape[0] ** 3 for _, _, covariance in jobs], self.group.world)
        results: dict[str, dict[str, torch.Tensor]] = {name: {} for name in EIGENDECOMPOSITION}
        synchronize(self.device)
        start = time.perf_counter()
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
        synchronize(self.device)
        kept = {SECONDS: time.perf_counter() - start, FITTED_FOR: strategy.name}
        with self.profiler.record("Save Eigendecomposition"):
            self.store.save([(folder / f"{name}.safetensors", tensors, kept) for name, tensors in results.items()])
        return {side: results[f"{side}_eigenvalues"] for side in ("activation", "gradient")}

    def _fit_lambda(
        self, folder: Path, dataset: Iterable[Any], args: FactorArguments, strategy: Strategy, finished: Finished
    ) -> None:
        result = folder / f"{LAMBDA}.safetensors"
        if self.store.exists(result):
            finished("Fit Lambda", result)
            return
        eigenvectors = None  # Lambda of the gradients as they are, or in the strategy's eigenbasis
        if strategy.eigenbasis:
            with self.profiler.record("Load Eigendecomposition"):
                q_a, q_s = (
                    self.store.load(folder / f"{side}_eigenvectors.safetensors", self.device)
                    for side in ("activation", "gradient")
                )
            eigenvectors = {name: (q_a[name], q_s[name]) for name in q_a}
        accumulator = LambdaAccumulator(self.layers, self.dtype, self.device, eigenvectors)

        def finish() -> list:
            lambdas, examples = accumulator.finish()
            return [(result, lambdas, {"examples": examples, FITTED_FOR: args.strategy})]

        job = Pass("Fit Lambda", dataset, accumulator, result, finish=finish, record="Fit Lambda")
        job.save_record = "Save Lambda"
        self._factor_pass(job, accumulator.update, args, self._pass_dtype(args.use_half_precision))

    def load_factor_arguments(self, factors_name: str) -> FactorArguments:
        path = self.factors_folder(factors_name) / FACTOR_ARGUMENTS
        missing = f"no factors named {factors_name!r} in {path.parent}: fit them first (fit_all_factors)"
        saved = self.store.read_json(path, missing)
        saved.pop("modules", None)
        try:
            return FactorArguments(**saved)
        except TypeError as error:
            raise InfluenceError(f"{path} does not hold factor arguments ({error}): {FIX_HINT}") from None

    def load_all_factors(self, factors_name: str) -> dict[str, dict[str, torch.Tensor]]:
        """{factor kind: {module name: tensor}} for every factor file the strategy leaves on disk."""
        args = self.load_factor_arguments(factors_name)
        folder = self.factors_folder(factors_name)
        factors = {}
        for kind in get_strategy(args.strategy).factor_kinds():
            path = folder / f"{kind}.safetensors"
            missing = (
                f"factors {factors_name!r} in {folder} are incomplete ({path.name} is missing): "
                "run fit_all_factors again to finish them"
            )
            factors[kind] = self.store.load(path, self.device, missing)
        return factors

    def factor_counts(self, factors_name: str) -> dict[str, Any]:
        """How many rows (covariances) and examples (Lambda) the saved factors were fitted on."""
        folder = self.factors_folder(factors_name)
        return self.store.metadata(*(folder / f"{kind}.safetensors" for kind in ("activation_covariance", LAMBDA)))

    # ------------------------------------------------------------------ scores

    def _preconditioners(self, factors_name: str, args: ScoreArguments) -> tuple[dict[str, LayerPreconditioner], dict]:
        factor_args = self.load_factor_arguments(factors_name)
        strategy = get_strategy(factor_args.strategy)
        with self.profiler.record("Load All Factors"):
            factors = self.load_all_factors(factors_name)
        preconditioners = {}
        for layer in self.layers:
            if LAMBDA in factors and layer.name not in factors[LAMBDA]:
                raise InfluenceError(
                    f"factors {factors_name!r} have no entry for module {layer.name!r}: refit them for this model"
                )
            per_module = {kind: tensors[layer.name] for kind, tensors in factors.items() if layer.name in tensors}
            preconditioners[layer.name] = strategy.preconditioner(per_module, args.damping_factor, layer)
        return preconditioners, to_dict(factor_args)

    def _scores(
        self,
        scores_name: str,
        factors_name: str,
        args: ScoreArguments,
        overwrite: bool,
        filename: str,
        what: str,
        compute: Callable[..., list | None],
    ) -> dict[str, torch.Tensor]:
        """The scores saved with these arguments, or compute(path, preconditioners, args)'s, saved; on every rank."""
        preconditioners, factor_args = self._preconditioners(factors_name, args)
        folder = self.scores_folder(scores_name)
        recorded = {**to_dict(args), "factors_name": factors_name, "factor_arguments": factor_args}
        path = folder / filename
        with self.store.writing(folder):
            self.store.prepare(folder, SCORE_ARGUMENTS, recorded, "scores", overwrite, [path])
            if self.store.exists(path):
                with self.profiler.record(f"Load {what}"):
                    return self.store.load(path, "cpu")
            files = compute(path, preconditioners, args)
        return self.group.share(files[0][1] if self.group.is_main else None, device="cpu")

    def _names(self, per_module: bool) -> list[str]:
        return [ALL_MODULES] + ([layer.name for layer in self.layers] if per_module else [])

    def compute_pairwise_scores(
        self,
        scores_name: str,
        factors_name: str,
        query_dataset: Iterable[Any],
        train_dataset: Iterable[Any],
        score_args: ScoreArguments | None = None,
        overwrite_output_dir: bool = False,
        query_slice_size: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """{"all_modules": [n_query, n_train]} (plus one entry per module with per_module), saved and returned.

        Each query batch is preconditioned once and held while one pass over the training data contracts it
        with every training batch's per-example gradients: the query batch size trades memory for passes.
        query_slice_size: run each query batch's forward and backward in slices of this many queries (batches
        whose every item is a tensor with one row per query), so that a large query batch costs the memory of its
        preconditioned gradients and of a slice's activations, not of its own; None runs each query batch whole.
        The pass over query batches keeps the rows done as its state, saved after each query batch; the pass of
        the query batch in progress saves its columns in the same file, so an interrupted run resumes there.
        """
        args = score_args or ScoreArguments()
        if query_slice_size is not None and not (isinstance(query_slice_size, int) and query_slice_size >= 1):
            raise InfluenceError(
                f"query_slice_size must be a positive number of queries or None, got {query_slice_size}"
            )

        def compute(path: Path, preconditioners: dict[str, LayerPreconditioner], args: ScoreArguments) -> list | None:
            rows = Rows(self._names(args.per_module), partial_path(path))
            queries = Pass("Pairwise scores", query_dataset, rows, path, finish=lambda: [(path, rows.rows, None)])
            queries.record, queries.save_record = "Compute Pairwise Score", "Save Pairwise Score"
            queries.split, queries.units = False, ("query batches", "queries")
            queries.empty = "the query dataset yielded no batch"

            def query_batch(index: int, offset: int, batch: Any, count: int) -> None:
                desc = f"Pairwise scores of query batch {index + 1}"
                block = self._pairwise_block(preconditioners, batch, train_dataset, args, path, desc, query_slice_size)
                if self.group.is_main:
                    rows.add(block)

            queries.run_batch = query_batch
            return self.loop.run(queries)

        return self._scores(
            scores_name, factors_name, args, overwrite_output_dir, PAIRWISE_SCORES, "Pairwise Score", compute
        )

    def _pairwise_block(
        self,
        preconditioners: dict[str, LayerPreconditioner],
        query_batch: Any,
        train_dataset: Iterable[Any],
        args: ScoreArguments,
        path: Path,
        desc: str,
        slice_size: int | None,
    ) -> dict[str, torch.Tensor]:
        """Scores of one query batch against every training example, [Q, N], on rank 0's CPU."""
        contract_dtype = self._pass_dtype(args.use_half_precision)
        held = held_dtype(contract_dtype, self.device)  # the queries' storage; their values: contract_dtype's
        count = batch_length(query_batch)
        queries: dict[str, torch.Tensor] = {}  # per layer, [Q, out * in'], filled in order as the chunks come
        filled: dict[str, int] = {}

        def precondition(layer: Layer, a: torch.Tensor, g: torch.Tensor) -> None:
            gradient = preconditioners[layer.name].precondition(a, g)
            gradient = gradient.reshape(gradient.shape[0], -1)
            if layer.name not in queries:
                queries[layer.name] = gradient.new_empty((count, gradient.shape[1]), dtype=held)
            start = filled.get(layer.name, 0)
            queries[layer.name][start : start + len(gradient)] = gradient.to(contract_dtype)
            filled[layer.name] = start + len(gradient)

        # What a query batch must hold at once is its Q x P preconditioned gradients, written once into place; in
        # slices, its forward and backward take a slice's memory, not its own (ResNet-9, 256 training images, 500
        # queries per batch: 10.9 GB run whole, 6.4 GB in slices of 128; 1,000 queries: 10.8 GB).
        # Every rank preconditions the query batch itself: it costs one query batch's gradients, where sending
        # the preconditioned [Q, P] gradients would cost Q * P elements per rank.
        step = count if slice_size is None else slice_size
        for start in range(0, count, step):
            part = batch_slice(query_batch, start, start + step, count) if step < count else query_batch
            self._one_batch(part, precondition, "measurement", args.use_half_precision, "Query gradients")
        for name, done in filled.items():  # rows never written would be whatever memory held
            if done != count:
                raise InfluenceError(f"module {name!r} ran for {done} of a batch's {count} queries: {EVERY_FORWARD}")
        columns = Columns(self.layers, args.per_module, (count,), self.dtype, self.device)

        def contract(layer: Layer, a: torch.Tensor, g: torch.Tensor) -> None:
            gradient = per_example_gradient(a, g).flatten(1)
            query = queries.get(layer.name)
            if query is None:
                raise InfluenceError(
                    f"module {layer.name!r} ran for the training examples but not for the queries: {EVERY_FORWARD}"
                )
            flops.add(2 * query.shape[0] * gradient.numel(), gradient.dtype, gradient.device)
            columns.add(layer.name, matmul(query, gradient.T).to(self.dtype))

        job = Pass(desc, train_dataset, columns, path)
        self._train_pass(job, contract, "train", args.use_half_precision, contract_dtype, after=columns.end_batch)
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

        def compute(path: Path, preconditioners: dict[str, LayerPreconditioner], args: ScoreArguments) -> list | None:
            columns = Columns(self.layers, args.per_module, (), self.dtype, self.device)

            def score(layer: Layer, a: torch.Tensor, g: torch.Tensor) -> None:
                columns.add(layer.name, preconditioners[layer.name].self_score(a, g).to(self.dtype))

            job = Pass("Self-influence scores", train_dataset, columns, path)
            job.finish = lambda: [(path, columns.result(), None)]
            job.record, job.save_record = "Compute Self-Influence Score", "Save Self-Influence Score"
            half = args.use_half_precision
            return self._train_pass(job, score, "train", half, self._pass_dtype(half), after=columns.end_batch)

        return self._scores(
            scores_name, factors_name, args, overwrite_output_dir, SELF_SCORES, "Self-Influence Score", compute
        )

    def load_score_arguments(self, scores_name: str) -> dict[str, Any]:
        """The arguments recorded with saved scores (as in score_arguments.json)."""
        path = self.scores_folder(scores_name) / SCORE_ARGUMENTS
        return self.store.read_json(path, f"no scores named {scores_name!r} in {path.parent}: compute them first")

    def has_self_scores(self, scores_name: str) -> bool:
        return self.store.exists(self.scores_folder(scores_name) / SELF_SCORES)

    def load_self_scores(self, scores_name: str) -> dict[str, torch.Tensor]:
        path = self.scores_folder(scores_name) / SELF_SCORES
        return self.store.load(path, "cpu", f"no scores at {path}: compute them first")
