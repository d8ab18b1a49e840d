"""The steps of an influence analysis, run over datasets in batches and saved as they finish.

    fit_all_factors:          covariance pass -> eigendecomposition -> Lambda pass   (what the strategy needs)
    compute_pairwise_scores:  per query batch: precondition its gradients once, then one pass over the
                              training data contracting them with each batch's per-example gradients
    compute_self_scores:      one pass over the training data

A dataset is any iterable of batches that can be iterated more than once (a DataLoader, a list...).
Batches are moved to the model's device and handed to the Task as they are.

Peak memory of compute_pairwise_scores, in elements (times 4 bytes in fp32, 2 for the bf16 parts):
    Q * P                 preconditioned query gradients, Q = query batch size, P = tracked parameters
  + B * max_l(out_l * in'_l) + B * max_l(T_l * (in'_l + out_l))   one layer's per-example gradients and a, g
  + Q * N                 the scores (kept on the CPU between query batches; one query block on the device)
  + the model's own forward/backward memory for a batch of B (training) or Q (queries) examples.
compute_self_scores needs the last three terms with Q = 0; the factor passes need B * max_l T_l * (in'_l + out_l)
plus the factors, sum_l (in'_l^2 + out_l^2 + out_l * in'_l).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from influence import flops
from influence.arguments import FactorArguments, ScoreArguments, to_dict
from influence.capture import Capture, backward_batch, per_example_gradient, to_device
from influence.errors import InfluenceError
from influence.factors import CovarianceAccumulator, LambdaAccumulator, eigendecomposition, kfac_lambda
from influence.modules import Layer, find_layers
from influence.precondition import LayerPreconditioner
from influence.profiler import Profiler
from influence.storage import check_arguments, clear_folder, load_metadata, load_tensors, save_tensors
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


def _needs(strategy: str) -> tuple[bool, bool]:
    """(covariance + eigendecomposition, Lambda pass) for a strategy."""
    return strategy in ("kfac", "ekfac"), strategy in ("ekfac", "diagonal")


class Analyzer:
    """Fits factors and computes scores for `model` under `task`, saving under output_dir/analysis_name."""

    def __init__(
        self,
        analysis_name: str,
        model: nn.Module,
        task: Task,
        output_dir: str | Path = "./influence_results",
        profile: bool = False,
        disable_tqdm: bool = False,
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
        self.disable_tqdm = disable_tqdm

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

    def _pass(
        self,
        data: Iterable[Any],
        process: Callable[[Layer, torch.Tensor, torch.Tensor], None],
        loss: str,
        half: bool,
        desc: str,
        dtype: torch.dtype | None = None,
        limit: int | None = None,
        end_batch: Callable[[int], None] | None = None,
    ) -> int:
        """One pass: forward/backward every batch, `process` each layer's (a, g); returns the examples seen."""
        loss_fn, what = self._loss(loss)
        seen = 0
        total = len(data) if hasattr(data, "__len__") else None
        with Capture(self.model, self.layers, process, dtype or self.dtype) as capture:
            for batch in tqdm(data, desc=desc, total=total, disable=self.disable_tqdm, leave=False):
                if limit is not None and seen >= limit:
                    break
                try:
                    kept = backward_batch(
                        capture,
                        self.model,
                        to_device(batch, self.device),
                        loss_fn,
                        half,
                        what,
                        None if limit is None else limit - seen,
                    )
                except torch.OutOfMemoryError:
                    raise InfluenceError(
                        f"out of memory on {self.device} in '{desc}' with batches of {capture.batch_size}: "
                        "use smaller batches (--train_batch_size, --query_batch_size)"
                    ) from None
                seen += kept
                if end_batch is not None:
                    end_batch(kept)
        if seen == 0:
            raise InfluenceError(f"{desc}: the dataset yielded no batch")
        return seen

    def per_example_gradients(
        self, batch: Any, measurement: bool = False, sample: bool = False
    ) -> dict[str, torch.Tensor]:
        """G[n] per tracked module, [B, out, in'] (bias as the last column), of the loss or of the measurement."""
        gradients: dict[str, torch.Tensor] = {}

        def process(layer: Layer, a: torch.Tensor, g: torch.Tensor) -> None:
            gradients[layer.name] = layer.to_weight_order(per_example_gradient(a, g))

        kind = "measurement" if measurement else ("sampled" if sample else "train")
        self._pass([batch], process, kind, half=False, desc="Per-example gradients")
        return gradients

    # ------------------------------------------------------------------ factors

    def factors_folder(self, factors_name: str) -> Path:
        return self.folder / f"factors_{factors_name}"

    def scores_folder(self, scores_name: str) -> Path:
        return self.folder / f"scores_{scores_name}"

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
        if overwrite_output_dir:
            clear_folder(folder)
        module_names = [layer.name for layer in self.layers]
        check_arguments(folder, FACTOR_ARGUMENTS, {**to_dict(args), "modules": module_names}, "factors")
        eigen, fit_lambda = _needs(args.strategy)
        if eigen:
            self._fit_covariance(folder, dataset, args)
            self._perform_eigendecomposition(folder, args)
        if fit_lambda:
            self._fit_lambda(folder, dataset, args)
        with self.profiler.record("Load All Factors"):
            return self.load_all_factors(factors_name)

    def _fit_covariance(self, folder: Path, dataset: Iterable[Any], args: FactorArguments) -> None:
        if all((folder / f"{name}.safetensors").exists() for name in COVARIANCES):
            return
        accumulator = CovarianceAccumulator(self.layers, self.dtype, self.device)
        with self.profiler.record("Fit Covariance"):
            self._pass(
                dataset,
                accumulator.update,
                "train" if args.use_empirical_fisher else "sampled",
                args.use_half_precision,
                "Fit covariance",
                limit=args.max_examples,
            )
            activation, gradient, rows = accumulator.finish()
        with self.profiler.record("Save Covariance"):
            save_tensors(folder / "activation_covariance.safetensors", activation, {"rows": rows})
            save_tensors(folder / "gradient_covariance.safetensors", gradient, {"rows": rows})

    def _perform_eigendecomposition(self, folder: Path, args: FactorArguments) -> None:
        done = [folder / f"{name}.safetensors" for name in EIGENDECOMPOSITION]
        if all(path.exists() for path in done) and (
            args.strategy != "kfac" or (folder / f"{LAMBDA}.safetensors").exists()
        ):
            return
        with self.profiler.record("Load Covariance"):
            covariances = {name: load_tensors(folder / f"{name}.safetensors", self.device) for name in COVARIANCES}
        results: dict[str, dict[str, torch.Tensor]] = {name: {} for name in EIGENDECOMPOSITION}
        with self.profiler.record("Perform Eigendecomposition"):
            for side in ("activation", "gradient"):
                for module, covariance in covariances[f"{side}_covariance"].items():
                    values, vectors = eigendecomposition(covariance, self.dtype)
                    results[f"{side}_eigenvalues"][module] = values
                    results[f"{side}_eigenvectors"][module] = vectors
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

    def _fit_lambda(self, folder: Path, dataset: Iterable[Any], args: FactorArguments) -> None:
        if (folder / f"{LAMBDA}.safetensors").exists():
            return
        eigenvectors = None
        if args.strategy == "ekfac":
            with self.profiler.record("Load Eigendecomposition"):
                q_a = load_tensors(folder / "activation_eigenvectors.safetensors", self.device)
                q_s = load_tensors(folder / "gradient_eigenvectors.safetensors", self.device)
            eigenvectors = {name: (q_a[name], q_s[name]) for name in q_a}
        accumulator = LambdaAccumulator(self.layers, self.dtype, self.device, eigenvectors)
        with self.profiler.record("Fit Lambda"):
            self._pass(
                dataset,
                accumulator.update,
                "train" if args.use_empirical_fisher else "sampled",
                args.use_half_precision,
                "Fit Lambda",
                dtype=self._pass_dtype(args.use_half_precision),
                limit=args.max_examples,
            )
            lambdas, examples = accumulator.finish()
        with self.profiler.record("Save Lambda"):
            save_tensors(folder / f"{LAMBDA}.safetensors", lambdas, {"examples": examples})

    def load_factor_arguments(self, factors_name: str) -> FactorArguments:
        path = self.factors_folder(factors_name) / FACTOR_ARGUMENTS
        if not path.exists():
            raise InfluenceError(
                f"no factors named {factors_name!r} in {path.parent}: fit them first (fit_all_factors, or analyze.py)"
            )
        saved = json.loads(path.read_text())
        saved.pop("modules", None)
        return FactorArguments(**saved)

    def load_all_factors(self, factors_name: str) -> dict[str, dict[str, torch.Tensor]]:
        """{factor kind: {module name: tensor}} for every factor file the strategy leaves on disk."""
        args = self.load_factor_arguments(factors_name)
        folder = self.factors_folder(factors_name)
        eigen, fit_lambda = _needs(args.strategy)
        kinds = (list(COVARIANCES) + list(EIGENDECOMPOSITION) if eigen else []) + (
            [LAMBDA] if eigen or fit_lambda else []
        )
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

    def factor_counts(self, factors_name: str) -> dict[str, Any]:
        """How many rows (covariances) and examples (Lambda) the saved factors were fitted on."""
        folder = self.factors_folder(factors_name)
        counts = {}
        for kind in ("activation_covariance", LAMBDA):
            path = folder / f"{kind}.safetensors"
            if path.exists():
                counts.update(load_metadata(path))
        return counts

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
    ) -> tuple[Path, dict[str, LayerPreconditioner]]:
        preconditioners, factor_args = self._preconditioners(factors_name, args)
        folder = self.scores_folder(scores_name)
        if overwrite:
            clear_folder(folder)
        recorded = {**to_dict(args), "factors_name": factors_name, "factor_arguments": factor_args}
        check_arguments(folder, SCORE_ARGUMENTS, recorded, "scores")
        return folder / filename, preconditioners

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
        """
        args = score_args or ScoreArguments()
        path, preconditioners = self._prepare_scores(
            scores_name, factors_name, args, overwrite_output_dir, PAIRWISE_SCORES
        )
        if path.exists():
            with self.profiler.record("Load Pairwise Score"):
                return load_tensors(path)
        with self.profiler.record("Compute Pairwise Score"):
            scores = self._pairwise(preconditioners, query_dataset, train_dataset, args)
        with self.profiler.record("Save Pairwise Score"):
            save_tensors(path, scores)
        return scores

    def _pairwise(
        self,
        preconditioners: dict[str, LayerPreconditioner],
        query_dataset: Iterable[Any],
        train_dataset: Iterable[Any],
        args: ScoreArguments,
    ) -> dict[str, torch.Tensor]:
        blocks = []
        total = len(query_dataset) if hasattr(query_dataset, "__len__") else None
        for query_batch in tqdm(query_dataset, desc="Query batches", total=total, disable=self.disable_tqdm):
            blocks.append(self._pairwise_block(preconditioners, query_batch, train_dataset, args))
        return {name: torch.cat([block[name] for block in blocks], dim=0) for name in blocks[0]}

    def _pairwise_block(
        self,
        preconditioners: dict[str, LayerPreconditioner],
        query_batch: Any,
        train_dataset: Iterable[Any],
        args: ScoreArguments,
    ) -> dict[str, torch.Tensor]:
        """Scores of one query batch against every training example, [Q, N], on the CPU."""
        contract_dtype = self._pass_dtype(args.use_half_precision)
        preconditioned: dict[str, torch.Tensor] = {}

        def precondition(layer: Layer, a: torch.Tensor, g: torch.Tensor) -> None:
            gradient = preconditioners[layer.name].precondition(a, g)
            preconditioned[layer.name] = gradient.reshape(gradient.shape[0], -1).to(contract_dtype)

        self._pass([query_batch], precondition, "measurement", args.use_half_precision, "Query gradients")
        columns = _Columns(self.layers, args.per_module)

        def contract(layer: Layer, a: torch.Tensor, g: torch.Tensor) -> None:
            gradient = per_example_gradient(a, g).flatten(1)
            queries = preconditioned[layer.name]
            flops.add(2 * queries.shape[0] * gradient.numel(), queries.dtype)
            columns.add(layer.name, (queries @ gradient.T).to(self.dtype))

        self._pass(
            train_dataset,
            contract,
            "train",
            args.use_half_precision,
            "Pairwise scores",
            dtype=contract_dtype,
            end_batch=columns.end_batch,
        )
        return columns.result(self.dtype)

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
        path, preconditioners = self._prepare_scores(scores_name, factors_name, args, overwrite_output_dir, SELF_SCORES)
        if path.exists():
            with self.profiler.record("Load Self-Influence Score"):
                return load_tensors(path)
        columns = _Columns(self.layers, args.per_module)

        def score(layer: Layer, a: torch.Tensor, g: torch.Tensor) -> None:
            columns.add(layer.name, preconditioners[layer.name].self_score(a, g))

        with self.profiler.record("Compute Self-Influence Score"):
            self._pass(
                train_dataset,
                score,
                "train",
                args.use_half_precision,
                "Self-influence scores",
                dtype=self._pass_dtype(args.use_half_precision),
                end_batch=columns.end_batch,
            )
            scores = columns.result(self.dtype)
        with self.profiler.record("Save Self-Influence Score"):
            save_tensors(path, scores)
        return scores

    def load_score_arguments(self, scores_name: str) -> dict[str, Any]:
        """The arguments recorded with saved scores (as in score_arguments.json)."""
        path = self.scores_folder(scores_name) / SCORE_ARGUMENTS
        if not path.exists():
            raise InfluenceError(f"no scores named {scores_name!r} in {path.parent}: compute them first")
        return json.loads(path.read_text())

    def load_pairwise_scores(self, scores_name: str) -> dict[str, torch.Tensor]:
        return self._load_scores(scores_name, PAIRWISE_SCORES)

    def load_self_scores(self, scores_name: str) -> dict[str, torch.Tensor]:
        return self._load_scores(scores_name, SELF_SCORES)

    def _load_scores(self, scores_name: str, filename: str) -> dict[str, torch.Tensor]:
        path = self.scores_folder(scores_name) / filename
        if not path.exists():
            raise InfluenceError(f"no scores at {path}: compute them first")
        return load_tensors(path)


class _Columns:
    """Score parts of each training batch, summed over modules (and kept per module when asked), joined at the end."""

    def __init__(self, layers: list[Layer], per_module: bool) -> None:
        self.per_module = per_module
        self.names = [ALL_MODULES] + ([layer.name for layer in layers] if per_module else [])
        self.done: dict[str, list[torch.Tensor]] = {name: [] for name in self.names}
        self.current: dict[str, torch.Tensor] = {}

    def add(self, module: str, part: torch.Tensor) -> None:
        total = self.current.get(ALL_MODULES)
        self.current[ALL_MODULES] = part if total is None else total + part
        if self.per_module:
            self.current[module] = part

    def end_batch(self, _: int) -> None:
        for name in self.names:
            self.done[name].append(self.current.pop(name))

    def result(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Joined along the training axis, on the CPU: float32, or float64 for a float64 model."""
        out = torch.float64 if dtype == torch.float64 else torch.float32
        return {name: torch.cat(parts, dim=-1).to("cpu", out) for name, parts in self.done.items()}
