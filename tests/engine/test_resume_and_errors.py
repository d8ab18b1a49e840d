"""Resuming saved work, refusing mismatched results, atomic writes, and one-sentence errors."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

import influence.analyzer
import influence.storage
from influence import Analyzer, FactorArguments, InfluenceError, ScoreArguments
from influence.errors import first_line
from influence.storage import load_metadata
from tests.reference import TinyTask, batches, make_model


class CountingData:
    """A re-iterable dataset that counts its passes (and can forbid them)."""

    def __init__(self, items, forbid=False):
        self.items, self.forbid, self.passes = items, forbid, 0

    def __iter__(self):
        if self.forbid:
            raise AssertionError("a pass over the data ran")
        self.passes += 1
        return iter(self.items)

    def __len__(self):
        return len(self.items)


@pytest.fixture
def setup(tmp_path):
    model, x, y = make_model("cnn")
    analyzer = Analyzer("test", model, TinyTask(), output_dir=tmp_path, disable_tqdm=True)
    return analyzer, batches(x, y, 8)


def test_resume_reuses_factors_without_a_pass(setup):
    analyzer, data = setup
    args = FactorArguments(strategy="ekfac")
    first = analyzer.fit_all_factors("ekfac", CountingData(data), args)
    again = analyzer.fit_all_factors("ekfac", CountingData(data, forbid=True), args)
    for kind in first:
        for name in first[kind]:
            assert torch.equal(first[kind][name], again[kind][name])


def test_resume_finishes_only_the_missing_step(setup):
    analyzer, data = setup
    args = FactorArguments(strategy="ekfac")
    analyzer.fit_all_factors("ekfac", CountingData(data), args)
    (analyzer.factors_folder("ekfac") / "lambda_matrix.safetensors").unlink()
    counting = CountingData(data)
    analyzer.fit_all_factors("ekfac", counting, args)
    assert counting.passes == 1  # the Lambda pass only; covariances and eigenbases were reused


class SlowData(CountingData):
    """Each batch comes `delay` seconds late."""

    def __init__(self, items, delay):
        super().__init__(items)
        self.delay = delay

    def __iter__(self):
        for item in super().__iter__():
            time.sleep(self.delay)
            yield item


def test_a_resumed_fit_counts_the_steps_an_earlier_run_finished(tmp_path):
    """The timing table of a fit resumed after some of its steps ended has their rows, with the seconds their files
    keep; a fit that only reuses finished factors, or takes another strategy's, has none."""
    model, x, y = make_model("cnn")
    data = batches(x, y, 8)

    def fit(strategy, dataset):
        said = []
        analyzer = Analyzer("test", model, TinyTask(), tmp_path, profile=True, disable_tqdm=True, log=said.append)
        analyzer.fit_all_factors(strategy, dataset, FactorArguments(strategy=strategy))
        return analyzer.profiler.records, said, analyzer.factors_folder(strategy)

    records, _, folder = fit("ekfac", SlowData(data, 0.1))  # each pass at least 0.1 s per batch
    kept = {name: load_metadata(folder / f"{name}.safetensors")["seconds"] for name in ("activation_covariance",
            "activation_eigenvectors", "lambda_matrix")}  # fmt: skip
    assert kept["activation_covariance"] >= 0.1 * len(data) and kept["lambda_matrix"] >= 0.1 * len(data)
    # The decompositions' seconds: the span the profiler times, give or take its own bookkeeping.
    assert kept["activation_eigenvectors"] == pytest.approx(records["Perform Eigendecomposition"][0], abs=0.01)
    assert "Fit Covariance" in records and "Fit Lambda" in records

    (folder / "lambda_matrix.safetensors").unlink()  # as if stopped in the Lambda pass
    records, said, _ = fit("ekfac", data)
    assert records["Fit Covariance"] == [kept["activation_covariance"]]
    assert records["Perform Eigendecomposition"] == [kept["activation_eigenvectors"]]
    assert len(records["Fit Lambda"]) == 1 and records["Fit Lambda"][0] < 0.1 * len(data)  # this run's own pass
    assert f"Fit Covariance: {kept['activation_covariance']:.1f} s in an earlier run of this job" in said[0]

    records, said, _ = fit("ekfac", data)  # nothing left to do: a reuse, not a resumed job
    assert not {"Fit Covariance", "Perform Eigendecomposition", "Fit Lambda"} & records.keys() and said == []

    # K-FAC takes EK-FAC's covariances and eigenbases; stopped before its Lambda was saved, it resumes without
    # EK-FAC's seconds in its table.
    fit("kfac", data)
    (tmp_path / "test" / "factors_kfac" / "lambda_matrix.safetensors").unlink()
    records, said, _ = fit("kfac", data)
    assert not {"Fit Covariance", "Perform Eigendecomposition"} & records.keys(), records
    assert not any("earlier run" in line for line in said), said


@pytest.mark.parametrize("first,second", [("kfac", "ekfac"), ("ekfac", "kfac")])
def test_kfac_and_ekfac_of_the_same_arguments_share_covariances_and_eigenbases(tmp_path, monkeypatch, first, second):
    model, x, y = make_model("cnn")
    said = []
    analyzer = Analyzer("test", model, TinyTask(), output_dir=tmp_path / "one", disable_tqdm=True, log=said.append)
    data = batches(x, y, 8)
    analyzer.fit_all_factors(first, data, FactorArguments(strategy=first))
    fresh = Analyzer("test", model, TinyTask(), output_dir=tmp_path / "fresh", disable_tqdm=True)
    expected = fresh.fit_all_factors(second, data, FactorArguments(strategy=second))

    def no_decomposition(*_):
        raise AssertionError("an eigendecomposition ran")

    monkeypatch.setattr(influence.analyzer, "eigendecomposition", no_decomposition)
    counting = CountingData(data)
    found = analyzer.fit_all_factors(second, counting, FactorArguments(strategy=second))
    assert counting.passes == (1 if second == "ekfac" else 0)  # EK-FAC's Lambda pass only
    assert said == [
        f"factors_{second}: the covariances and eigendecomposition are those of factors_{first}, fitted with the "
        "same arguments"
    ]
    assert found.keys() == expected.keys()
    for kind in expected:
        for name in expected[kind]:
            assert torch.allclose(found[kind][name], expected[kind][name], rtol=1e-12, atol=0), (kind, name)

    # Factors of other arguments are not taken.
    counting = CountingData(data)
    monkeypatch.undo()
    analyzer.fit_all_factors("other", counting, FactorArguments(strategy=second, seed=1))
    assert counting.passes == (2 if second == "ekfac" else 1) and len(said) == 1


def test_scores_are_reused_without_a_pass(setup):
    analyzer, data = setup
    analyzer.fit_all_factors("diagonal", data, FactorArguments(strategy="diagonal"))
    first = analyzer.compute_self_scores("s", "diagonal", data)
    again = analyzer.compute_self_scores("s", "diagonal", CountingData(data, forbid=True))
    assert torch.equal(first["all_modules"], again["all_modules"])
    assert torch.equal(analyzer.load_self_scores("s")["all_modules"], first["all_modules"])


def test_changed_arguments_are_refused_then_overwritten(setup):
    analyzer, data = setup
    analyzer.fit_all_factors("f", data, FactorArguments(strategy="diagonal"))
    changed = FactorArguments(strategy="diagonal", use_empirical_fisher=True)
    with pytest.raises(InfluenceError, match=r"use_empirical_fisher=False, now use_empirical_fisher=True.*overwrite"):
        analyzer.fit_all_factors("f", data, changed)
    analyzer.fit_all_factors("f", data, changed, overwrite_output_dir=True)
    assert analyzer.load_factor_arguments("f").use_empirical_fisher

    analyzer.compute_self_scores("s", "f", data, ScoreArguments(damping_factor=1e-3))
    with pytest.raises(InfluenceError, match=r"damping_factor=0.001, now damping_factor=0.01.*overwrite_output_dir"):
        analyzer.compute_self_scores("s", "f", data, ScoreArguments(damping_factor=1e-2))
    # Scores remember the factors they were made with: refitting the factors invalidates them.
    analyzer.fit_all_factors("f", data, FactorArguments(strategy="diagonal"), overwrite_output_dir=True)
    with pytest.raises(InfluenceError, match="factor_arguments.use_empirical_fisher"):
        analyzer.compute_self_scores("s", "f", data, ScoreArguments(damping_factor=1e-3))


def test_interrupted_save_leaves_no_file(setup, monkeypatch):
    analyzer, data = setup

    def failing_save(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(influence.storage, "save_file", failing_save)
    with pytest.raises(KeyboardInterrupt):
        analyzer.fit_all_factors("f", data, FactorArguments(strategy="kfac"))
    folder = analyzer.factors_folder("f")
    assert sorted(path.name for path in folder.iterdir()) == ["factor_arguments.json"]
    monkeypatch.undo()
    analyzer.fit_all_factors("f", data, FactorArguments(strategy="kfac"))  # and the rerun completes
    assert (folder / "lambda_matrix.safetensors").exists()


def test_unknown_strategy():
    with pytest.raises(InfluenceError, match="unknown factor strategy 'ekfca': choose one of identity"):
        FactorArguments(strategy="ekfca")


def test_model_without_trackable_layers(tmp_path):
    with pytest.raises(InfluenceError, match=r"no nn.Linear or nn.Conv2d module to track"):
        Analyzer("t", nn.Sequential(nn.BatchNorm1d(3)), TinyTask(), output_dir=tmp_path)
    with pytest.raises(InfluenceError, match=r"'1' is a Tanh; only nn.Linear and nn.Conv2d"):
        Analyzer("t", make_model("mlp")[0], TinyTask(tracked=["1"]), output_dir=tmp_path)


def test_grouped_convolution_is_refused_by_name(tmp_path):
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(InfluenceError, match=r"module '0' is a grouped convolution"):
        Analyzer("t", model, TinyTask(), output_dir=tmp_path)


def test_scores_before_factors(setup):
    analyzer, data = setup
    with pytest.raises(InfluenceError, match=r"no factors named 'ekfac' .*fit them first"):
        analyzer.compute_pairwise_scores("s", "ekfac", data, data)


def test_non_scalar_measurement(setup):
    analyzer, data = setup
    analyzer.fit_all_factors("identity", data, FactorArguments(strategy="identity"))

    class VectorTask(TinyTask):
        def compute_measurement(self, batch, model):
            return model(batch[0]).sum(dim=1)

    analyzer.task = VectorTask()
    with pytest.raises(InfluenceError, match=r"compute_measurement must return a scalar tensor .* got \(8,\)"):
        analyzer.compute_pairwise_scores("s", "identity", data, data)


class NoGradTask(TinyTask):
    def compute_train_loss(self, batch, model, sample=False):
        with torch.no_grad():
            return super().compute_train_loss(batch, model, sample)


class WithoutModelTask(TinyTask):
    def compute_train_loss(self, batch, model, sample=False):
        return batch[0].sum()


class BesideModelTask(TinyTask):  # a loss that needs gradients, from a tensor of its own, not from the model
    def compute_train_loss(self, batch, model, sample=False):
        return (batch[0] * torch.ones_like(batch[0], requires_grad=True)).sum()


@pytest.mark.parametrize(
    "task, message",
    [
        (NoGradTask(), "compute_train_loss does not depend on the tracked modules' outputs: does it call the model"),
        (WithoutModelTask(), "compute_train_loss does not depend on the tracked modules' outputs"),
        (BesideModelTask(), "compute_train_loss ran no tracked module: does it call the model on the batch"),
    ],
)
def test_a_loss_without_the_models_gradients_is_refused(tmp_path, task, message):
    model, x, y = make_model("cnn")
    analyzer = Analyzer("t", model, task, output_dir=tmp_path, disable_tqdm=True)
    with pytest.raises(InfluenceError, match=message):
        analyzer.fit_all_factors("f", batches(x, y, 8), FactorArguments(strategy="diagonal"))


def test_weight_sharing_is_refused(tmp_path):
    layer = nn.Linear(3, 3)
    model = nn.Sequential(layer, nn.Tanh(), layer).double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 3, (4,))
    analyzer = Analyzer("t", model, TinyTask(), output_dir=tmp_path, disable_tqdm=True)
    with pytest.raises(InfluenceError, match="ran twice in one forward pass"):
        analyzer.fit_all_factors("f", [(x, y)], FactorArguments(strategy="diagonal"))


class RowsAsExamples(nn.Module):
    """Its second layer sees the batch [B, 2, 3] reshaped to [B * 2, 3]: rows that are not examples."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(3, 3), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = torch.tanh(self.first(x.reshape(-1, 3)))
        return self.second(rows.reshape(len(x), 6))


class ChangesItsInput(nn.Module):
    """The second layer's input is changed in place after that layer ran (as `h = f(x); x.mul_(2)` would), and no
    other operation saved it, so autograd itself cannot notice."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.first(x) + 1.0
        out = self.second(hidden)
        hidden.mul_(2)
        return out + hidden


@pytest.mark.parametrize(
    "model,shape,message",
    [
        (RowsAsExamples, (4, 2, 3), "module 'first' got an input with 8 rows for a batch of 4 examples"),
        (ChangesItsInput, (4, 3), "the input of module 'second' was changed in place after the module ran"),
    ],
)
def test_inputs_the_engine_would_misread_are_refused_by_name(tmp_path, model, shape, message):
    x, y = torch.randn(*shape, dtype=torch.float64), torch.randint(0, 3, (4,))
    analyzer = Analyzer("t", model().double(), TinyTask(), output_dir=tmp_path, disable_tqdm=True)
    with pytest.raises(InfluenceError, match=message):
        analyzer.fit_all_factors("f", [(x, y)], FactorArguments(strategy="diagonal"))


class SkipsSmallBatches(nn.Module):
    """Its second layer runs only on batches of 3 or more examples."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.first(x))
        return self.second(x) if len(x) >= 3 else x


@pytest.mark.parametrize(
    "queries,message",
    [(5, "module 'second' ran for 3 of a batch's 5 queries"), (2, "module 'second' ran for the training examples")],
)
def test_a_module_that_skips_some_queries_is_refused_by_name(tmp_path, queries, message):
    model = SkipsSmallBatches().double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 3, (6,))
    analyzer = Analyzer("t", model, TinyTask(), output_dir=tmp_path, disable_tqdm=True)
    analyzer.fit_all_factors("f", batches(x, y, 3), FactorArguments(strategy="diagonal"))
    # 5 queries run as slices of 3 and 2, 2 queries as one slice of 2
    with pytest.raises(InfluenceError, match=message):
        query_batches = batches(x[:queries], y[:queries], queries)
        analyzer.compute_pairwise_scores("s", "f", query_batches, batches(x, y, 3), query_slice_size=3)
    with pytest.raises(InfluenceError, match="query_slice_size must be a positive number of queries or None, got 0"):
        analyzer.compute_pairwise_scores("s", "f", batches(x, y, 3), batches(x, y, 3), query_slice_size=0)


def test_profile_table_has_the_original_rows(setup):
    analyzer, data = setup
    analyzer.profiler.enabled = True
    analyzer.fit_all_factors("ekfac", data, FactorArguments(strategy="ekfac"))
    analyzer.compute_pairwise_scores("s", "ekfac", data[:1], data)
    table = analyzer.profiler.table()
    for action in (
        "Total",
        "Fit Covariance",
        "Perform Eigendecomposition",
        "Fit Lambda",
        "Compute Pairwise Score",
        "Save Pairwise Score",
        "Save Covariance",
        "Load All Factors",
    ):
        assert f"|  {action} " in table
    assert table.splitlines()[1].startswith("|  Action                       |  Mean duration (s)    |")


@pytest.mark.parametrize(
    "error, plain, typed",
    [
        (ValueError("  first\nsecond"), "first", "ValueError: first"),
        (OSError(), "OSError", "OSError"),  # a message of its own says nothing: the type does
    ],
)
def test_an_unexpected_error_is_told_in_one_line(error, plain, typed):
    assert (first_line(error), first_line(error, typed=True)) == (plain, typed)
