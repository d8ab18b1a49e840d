"""The engine against independent float64 computations (tests/reference.py) on tiny models."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from influence import Analyzer, FactorArguments, ScoreArguments, products
from tests.reference import (
    TinyTask,
    activations_and_output_gradients,
    batches,
    dense_scores,
    make_model,
    per_example_gradients,
    relative_error,
)

MODELS = ["mlp", "cnn", "seq"]
STRATEGIES = ["identity", "diagonal", "kfac", "ekfac"]


def fit(tmp_path, kind, strategy, empirical=True, batch_size=8, task=None):
    model, x, y = make_model(kind)
    analyzer = Analyzer("test", model, task or TinyTask(), output_dir=tmp_path, disable_tqdm=True)
    args = FactorArguments(strategy=strategy, use_empirical_fisher=empirical)
    factors = analyzer.fit_all_factors(strategy, batches(x, y, batch_size), args)
    return analyzer, model, x, y, factors


# ---------------------------------------------------------------------------- gradients and factors


@pytest.mark.parametrize("kind", MODELS)
def test_per_example_gradients_match_autograd(tmp_path, kind):
    model, x, y = make_model(kind)
    task = TinyTask()
    analyzer = Analyzer("test", model, task, output_dir=tmp_path, disable_tqdm=True)
    for measurement in (False, True):
        loss_fn = task.compute_measurement if measurement else task.compute_train_loss
        reference = per_example_gradients(model, loss_fn, x, y)
        captured = analyzer.per_example_gradients((x, y), measurement=measurement)
        assert captured.keys() == reference.keys()
        for name in reference:
            assert relative_error(captured[name], reference[name]) < 1e-10, name


@pytest.mark.filterwarnings("ignore:Using padding='same'")  # torch's own note on even kernels
def test_per_example_gradients_of_dilated_and_same_padded_convolutions(tmp_path):
    torch.manual_seed(3)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3, dilation=2, padding=2, stride=2),
        torch.nn.Tanh(),
        torch.nn.Conv2d(3, 2, (2, 3), padding="same"),
        torch.nn.Flatten(),
        torch.nn.LazyLinear(3),
    ).double()
    x, y = torch.randn(6, 2, 9, 9, dtype=torch.float64), torch.randint(0, 3, (6,))
    model(x)
    model.eval()
    task = TinyTask()
    reference = per_example_gradients(model, task.compute_train_loss, x, y)
    captured = Analyzer("t", model, task, output_dir=tmp_path, disable_tqdm=True).per_example_gradients((x, y))
    for name in reference:
        assert relative_error(captured[name], reference[name]) < 1e-10, name


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("empirical", [True, False])
def test_covariances_and_eigenbases_match_their_definitions(tmp_path, kind, empirical):
    analyzer, model, x, y, factors = fit(tmp_path, kind, "ekfac", empirical=empirical, batch_size=7)
    task = TinyTask()

    def loss(batch, model):
        return task.compute_train_loss(batch, model, sample=not empirical)

    captured = activations_and_output_gradients(model, loss, x, y)
    grads = per_example_gradients(model, loss, x, y)
    for name, (a, g) in captured.items():
        # the slicing reference itself must reproduce autograd's per-example gradients
        assert relative_error(torch.einsum("nto,nti->noi", g, a), grads[name]) < 1e-10
        rows = a.shape[0] * a.shape[1]
        a_cov = torch.einsum("nti,ntj->ij", a, a) / rows
        s_cov = torch.einsum("nti,ntj->ij", g, g) / rows
        assert relative_error(factors["activation_covariance"][name], a_cov) < 1e-12
        assert relative_error(factors["gradient_covariance"][name], s_cov) < 1e-12
        for side, cov in (("activation", a_cov), ("gradient", s_cov)):
            q, values = factors[f"{side}_eigenvectors"][name], factors[f"{side}_eigenvalues"][name]
            assert relative_error(q @ torch.diag(values) @ q.T, cov) < 1e-10
            assert relative_error(q.T @ q, torch.eye(len(values), dtype=q.dtype)) < 1e-10
        rotated = factors["gradient_eigenvectors"][name].T @ grads[name] @ factors["activation_eigenvectors"][name]
        assert relative_error(factors["lambda_matrix"][name], rotated.square().mean(0)) < 1e-10


@pytest.mark.parametrize("kind", MODELS)
def test_diagonal_and_kfac_lambda(tmp_path, kind):
    _, model, x, y, diagonal = fit(tmp_path, kind, "diagonal")
    grads = per_example_gradients(model, TinyTask().compute_train_loss, x, y)
    for name, g in grads.items():
        assert relative_error(diagonal["lambda_matrix"][name], g.square().mean(0)) < 1e-10
    assert "activation_covariance" not in diagonal
    # K-FAC's curvature (Q_S (x) Q_A) diag(Lambda) (Q_S (x) Q_A)^T is S (x) A, with A and S from the reference's
    # own patches and output gradients (fit's empirical Fisher: the dataset labels).
    _, model, x, y, kfac = fit(tmp_path, kind, "kfac")
    for name, (a, g) in activations_and_output_gradients(model, TinyTask().compute_train_loss, x, y).items():
        rows = a.shape[0] * a.shape[1]
        a_cov, s_cov = torch.einsum("nti,ntj->ij", a, a) / rows, torch.einsum("nti,ntj->ij", g, g) / rows
        basis = torch.kron(kfac["gradient_eigenvectors"][name], kfac["activation_eigenvectors"][name])
        curvature = basis @ torch.diag(kfac["lambda_matrix"][name].flatten()) @ basis.T
        assert relative_error(curvature, torch.kron(s_cov, a_cov)) < 1e-10, name


def test_max_examples_caps_the_fit(tmp_path):
    model, x, y = make_model("mlp")
    analyzer = Analyzer("test", model, TinyTask(), output_dir=tmp_path, disable_tqdm=True)
    args = FactorArguments(strategy="diagonal", use_empirical_fisher=True, max_examples=13)
    factors = analyzer.fit_all_factors("capped", batches(x, y, 5), args)
    grads = per_example_gradients(model, TinyTask().compute_train_loss, x[:13], y[:13])
    for name, g in grads.items():
        assert relative_error(factors["lambda_matrix"][name], g.square().mean(0)) < 1e-10
    assert analyzer.factor_counts("capped")["examples"] == {name: 13 for name in grads}


# Positions, out and in' such that Q_A rotates a's rows or G's, and Q_S g's rows or G's, in all four pairings.
ROTATION_SHAPES = [(2, 5, 7), (6, 3, 9), (4, 8, 3), (9, 3, 4), (5, 5, 5)]


@pytest.mark.parametrize("positions,out_dim,in_dim", ROTATION_SHAPES)
def test_rotated_gradient_is_the_rotated_per_example_gradient(positions, out_dim, in_dim):
    from influence.precondition import rotated_gradient

    a, g = (
        torch.randn(3, positions, in_dim, dtype=torch.float64),
        torch.randn(3, positions, out_dim, dtype=torch.float64),
    )
    q_a = torch.linalg.qr(torch.randn(in_dim, in_dim, dtype=torch.float64)).Q
    q_s = torch.linalg.qr(torch.randn(out_dim, out_dim, dtype=torch.float64)).Q
    expected = torch.einsum("os,nto,nti,ij->nsj", q_s, g, a, q_a)
    assert relative_error(rotated_gradient(a, g, q_a, q_s), expected) < 1e-12


# Position Gram matrices where positions * (in' + out) < out * in' (few positions, wide layers), else G itself.
SQUARED_NORM_SHAPES = [("gram", 2, 9, 8), ("gram", 3, 16, 5), ("direct", 12, 3, 4), ("direct", 6, 5, 5)]


@pytest.mark.parametrize("branch,positions,out_dim,in_dim", SQUARED_NORM_SHAPES)
def test_squared_gradient_norm_and_weighted_square_sums(monkeypatch, branch, positions, out_dim, in_dim):
    from influence import precondition
    from influence.precondition import squared_gradient_norm, weighted_square_sums

    formed = []  # the direct branch forms G; the Gram branch must not
    monkeypatch.setattr(
        precondition, "per_example_gradient", lambda a, g: formed.append(1) or torch.einsum("nto,nti->noi", g, a)
    )
    torch.manual_seed(positions)
    a = torch.randn(4, positions, in_dim, dtype=torch.float64)
    g = torch.randn(4, positions, out_dim, dtype=torch.float64)
    gradient = torch.einsum("nto,nti->noi", g, a)
    expected = torch.stack([(gradient[n] ** 2).sum() for n in range(4)])
    assert relative_error(squared_gradient_norm(a, g), expected) < 1e-12
    assert len(formed) == (1 if branch == "direct" else 0)
    weights = torch.rand(out_dim, in_dim, dtype=torch.float64)
    weighted = torch.stack([(gradient[n] ** 2 * weights).sum() for n in range(4)])
    assert relative_error(weighted_square_sums(gradient.clone(), weights), weighted) < 1e-12


# ---------------------------------------------------------------------------- scores


def reference_scores(analyzer, model, x, y, qx, qy, factors, strategy, damping, task=None):
    task = task or TinyTask()
    query = per_example_gradients(model, task.compute_measurement, qx, qy)
    train = per_example_gradients(model, task.compute_train_loss, x, y)
    return dense_scores(strategy, factors, query, train, damping)


def well_conditioned_damping(factors):
    lambdas = torch.cat([lam.flatten() for lam in factors["lambda_matrix"].values()])
    return 1e-3 * lambdas.mean().item()


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_pairwise_scores_match_dense_curvature(tmp_path, kind, strategy):
    analyzer, model, x, y, factors = fit(tmp_path, kind, strategy)
    damping = 0.0 if strategy == "identity" else well_conditioned_damping(factors)
    qx, qy = x[:10] + 0.1, y[:10]
    scores = analyzer.compute_pairwise_scores(
        "s", strategy, batches(qx, qy, 4), batches(x, y, 8), ScoreArguments(damping_factor=damping, per_module=True)
    )
    expected = reference_scores(analyzer, model, x, y, qx, qy, factors, strategy, damping)
    assert scores["all_modules"].shape == (10, 32)
    assert scores["all_modules"].dtype == torch.float64
    assert relative_error(scores["all_modules"], expected) < 1e-8
    per_module = sum(value for key, value in scores.items() if key != "all_modules")
    assert relative_error(per_module, scores["all_modules"]) < 1e-12


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_self_scores_match_dense_curvature(tmp_path, kind, strategy):
    """<P(G[n]), G[n]> against g_n^T (F + d I)^-1 g_n with F dense, from autograd's per-example gradients."""
    analyzer, model, x, y, factors = fit(tmp_path, kind, strategy)
    damping = 0.0 if strategy == "identity" else well_conditioned_damping(factors)
    scores = analyzer.compute_self_scores("s", strategy, batches(x, y, 5), ScoreArguments(damping_factor=damping))
    train = per_example_gradients(model, TinyTask().compute_train_loss, x, y)
    expected = torch.diagonal(dense_scores(strategy, factors, train, train, damping))
    assert scores["all_modules"].shape == (32,) and relative_error(scores["all_modules"], expected) < 1e-8


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("max_elements", [None, 40])  # 40: each layer's a, g and G in chunks of a few examples
def test_a_query_batch_runs_in_slices_of_query_slice_size(tmp_path, kind, max_elements):
    analyzer, model, x, y, factors = fit(tmp_path, kind, "ekfac")
    analyzer.max_elements = max_elements
    damping = well_conditioned_damping(factors)
    seen = []
    handle = model.register_forward_hook(lambda module, args, output: seen.append(len(args[0])))
    qx, qy = x[:11] - 0.2, y[:11]
    args = ScoreArguments(damping_factor=damping)
    scores = analyzer.compute_pairwise_scores(
        "s", "ekfac", batches(qx, qy, 11), batches(x, y, 8), args, query_slice_size=3
    )
    whole = analyzer.compute_pairwise_scores("w", "ekfac", batches(qx, qy, 11), batches(x, y, 8), args)
    handle.remove()
    expected = reference_scores(analyzer, model, x, y, qx, qy, factors, "ekfac", damping)
    assert relative_error(scores["all_modules"], expected) < 1e-8
    assert relative_error(whole["all_modules"], expected) < 1e-8
    # the 11 queries went through the model as 3 + 3 + 3 + 2, then the 32 training examples as 4 batches of 8;
    # without query_slice_size as one batch of 11
    assert seen == [3, 3, 3, 2] + [8] * 4 + [11] + [8] * 4


def test_batch_length_is_the_first_tensors_leading_dimension():
    from influence import InfluenceError
    from influence.capture import batch_length

    assert batch_length((["a", "b"], {"x": torch.zeros(3, 2)}, torch.zeros(5))) == 3  # names before the tensors
    assert batch_length([torch.tensor(1.0)]) == 1
    with pytest.raises(
        InfluenceError, match=r"cannot tell how many examples a batch holds: it has no tensor \(tuple\)"
    ):
        batch_length((["a", "b"], 3))


def test_batch_slice_cuts_every_tensor_and_refuses_what_it_cannot_cut():
    from collections import namedtuple

    from influence import InfluenceError
    from influence.capture import batch_slice

    pair = namedtuple("pair", "x y")
    x, y = torch.arange(10.0).view(5, 2), torch.arange(5)
    cut = batch_slice({"inputs": pair(x, y), "more": [y]}, 1, 3, 5)
    assert isinstance(cut["inputs"], pair)
    assert torch.equal(cut["inputs"].x, x[1:3]) and torch.equal(cut["inputs"].y, y[1:3])
    assert torch.equal(cut["more"][0], y[1:3])
    for ambiguous in [(x, ["a", "b", "c", "d", "e"]), (x, torch.ones(3)), (x, torch.tensor(1.0))]:
        with pytest.raises(InfluenceError, match="query_slice_size cuts query batches whose every item is a tensor"):
            batch_slice(ambiguous, 0, 2, 5)


@pytest.mark.parametrize("strategy", ["diagonal", "kfac", "ekfac"])
def test_pairwise_scores_at_default_damping(tmp_path, strategy):
    analyzer, model, x, y, factors = fit(tmp_path, "cnn", strategy)
    scores = analyzer.compute_pairwise_scores("s", strategy, batches(x[:6], y[:6], 6), batches(x, y, 8))
    explicit = analyzer.compute_pairwise_scores(
        "e", strategy, batches(x[:6], y[:6], 6), batches(x, y, 8), ScoreArguments(damping_factor=1e-8)
    )
    assert ScoreArguments().damping_factor == 1e-8 and torch.equal(scores["all_modules"], explicit["all_modules"])
    # Against the dense oracle too, loosely: inverting F + 1e-8 I densely loses digits to its condition number.
    expected = reference_scores(analyzer, model, x, y, x[:6], y[:6], factors, strategy, 1e-8)
    assert relative_error(scores["all_modules"], expected) < 1e-4


@pytest.mark.parametrize("kind", MODELS)
def test_heuristic_damping_is_a_tenth_of_mean_lambda(tmp_path, kind):
    analyzer, model, x, y, factors = fit(tmp_path, kind, "ekfac")
    scores = analyzer.compute_pairwise_scores(
        "s", "ekfac", batches(x[:5], y[:5], 5), batches(x, y, 8), ScoreArguments(damping_factor=None)
    )
    damping = {name: 0.1 * lam.mean().item() for name, lam in factors["lambda_matrix"].items()}
    expected = reference_scores(analyzer, model, x, y, x[:5], y[:5], factors, "ekfac", damping)
    assert relative_error(scores["all_modules"], expected) < 1e-8


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_self_scores_are_the_diagonal_of_loss_pairwise_scores(tmp_path, kind, strategy):
    task = TinyTask(measure_loss=True)
    analyzer, model, x, y, factors = fit(tmp_path, kind, strategy, task=task)
    args = ScoreArguments(damping_factor=None if strategy != "identity" else 1e-8, per_module=True)
    pairwise = analyzer.compute_pairwise_scores("p", strategy, batches(x, y, 16), batches(x, y, 8), args)
    self_scores = analyzer.compute_self_scores("s", strategy, batches(x, y, 5), args)
    assert self_scores["all_modules"].shape == (32,)
    for key in pairwise:
        assert relative_error(self_scores[key], torch.diagonal(pairwise[key])) < 1e-10, key


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_scores_do_not_depend_on_batch_sizes(tmp_path, strategy):
    analyzer, model, x, y, factors = fit(tmp_path, "cnn", strategy)
    args = ScoreArguments(damping_factor=None)
    base = analyzer.compute_pairwise_scores("a", strategy, batches(x[:9], y[:9], 9), batches(x, y, 32), args)
    other = analyzer.compute_pairwise_scores("b", strategy, batches(x[:9], y[:9], 2), batches(x, y, 3), args)
    assert relative_error(other["all_modules"], base["all_modules"]) < 1e-10
    self_a = analyzer.compute_self_scores("c", strategy, batches(x, y, 32), args)
    self_b = analyzer.compute_self_scores("d", strategy, batches(x, y, 1), args)
    assert relative_error(self_b["all_modules"], self_a["all_modules"]) < 1e-10
    factor_args = FactorArguments(strategy=strategy, use_empirical_fisher=True)
    refit = analyzer.fit_all_factors(f"{strategy}_small_batches", batches(x, y, 3), factor_args)
    for kind, tensors in refit.items():
        for name, tensor in tensors.items():
            if "eigenvectors" not in kind:  # eigenvectors are defined up to sign
                assert relative_error(tensor, factors[kind][name]) < 1e-10, (kind, name)


def test_sampled_fisher_is_used_for_factors_but_not_scores(tmp_path):
    analyzer, model, x, y, factors = fit(tmp_path, "mlp", "diagonal", empirical=False)
    task = TinyTask()
    sampled = per_example_gradients(model, lambda b, m: task.compute_train_loss(b, m, sample=True), x, y)
    for name, g in sampled.items():
        assert relative_error(factors["lambda_matrix"][name], g.square().mean(0)) < 1e-10
    damping = well_conditioned_damping(factors)
    args = ScoreArguments(damping_factor=damping)
    scores = analyzer.compute_pairwise_scores("s", "diagonal", batches(x[:4], y[:4], 4), batches(x, y, 8), args)
    expected = reference_scores(analyzer, model, x, y, x[:4], y[:4], factors, "diagonal", damping)
    assert relative_error(scores["all_modules"], expected) < 1e-10


def test_tracked_modules_restrict_scores(tmp_path):
    task = TinyTask(tracked=["4"])
    analyzer, model, x, y, factors = fit(tmp_path, "mlp", "ekfac", task=task)
    assert list(factors["lambda_matrix"]) == ["4"]
    damping = well_conditioned_damping(factors)
    args = ScoreArguments(damping_factor=damping)
    scores = analyzer.compute_pairwise_scores("s", "ekfac", batches(x[:4], y[:4], 4), batches(x, y, 8), args)
    query = per_example_gradients(model, task.compute_measurement, x[:4], y[:4])
    train = per_example_gradients(model, task.compute_train_loss, x, y)
    expected = dense_scores("ekfac", factors, {"4": query["4"]}, {"4": train["4"]}, damping)
    assert relative_error(scores["all_modules"], expected) < 1e-10


def float32_cnn(tmp_path, seed):
    """An fp32 CNN analyzer and 256 random examples in batches of 64, for the bf16 comparisons."""
    model, _, _ = make_model("cnn", dtype=torch.float32)
    torch.manual_seed(seed)
    x, y = torch.randn(256, 2, 7, 7), torch.randint(0, 3, (256,))
    analyzer = Analyzer("bf16", model, TinyTask(), output_dir=tmp_path, disable_tqdm=True)
    return analyzer, x, y, batches(x, y, 64)


def bf16_kernels(monkeypatch, native: bool) -> dict[str, int]:
    """bf16 products through torch's bf16 kernels (native) or in fp32 (influence.products), whatever this CPU has;
    the returned counts of the products carried in fp32, the engine's (matmul) and the model's (autocast), fill as
    they run."""
    monkeypatch.setattr(products, "native_cpu_bf16", lambda: native)
    widened = {"matmul": 0, "autocast": 0}

    def counted(name, function):
        def run(*args):
            result = function(*args)
            widened[name] += result is not False
            return result

        return run

    monkeypatch.setattr(products, "widens_bf16", counted("matmul", products.widens_bf16))
    monkeypatch.setattr(products, "_bf16_values_in_fp32", counted("autocast", products._bf16_values_in_fp32))
    return widened


@pytest.mark.parametrize("native", [True, False], ids=["torch-bf16-kernels", "bf16-in-fp32"])
def test_bf16_scores_rank_like_fp32(tmp_path, monkeypatch, native):
    from scipy.stats import spearmanr

    widened = bf16_kernels(monkeypatch, native)
    analyzer, x, y, data = float32_cnn(tmp_path, seed=5)
    results = {}
    for half in (False, True):
        name = "ekfac_half" if half else "ekfac"
        analyzer.fit_all_factors(name, data, FactorArguments(strategy="ekfac", use_half_precision=half))
        args = ScoreArguments(damping_factor=None, use_half_precision=half)
        results[half] = analyzer.compute_pairwise_scores(name, name, batches(x[:16], y[:16], 8), data, args)
    full, half = results[False]["all_modules"], results[True]["all_modules"]
    assert full.dtype == half.dtype == torch.float32
    correlations = [spearmanr(full[i].numpy(), half[i].numpy()).statistic for i in range(16)]
    assert sum(correlations) / len(correlations) > 0.95
    assert (widened["matmul"] > 0 and widened["autocast"] > 0) is not native, widened


@pytest.mark.parametrize("strategy", ["diagonal", "ekfac"])
def test_channels_last_model_gives_the_same_scores(tmp_path, strategy):
    analyzer, model, x, y, _ = fit(tmp_path, "cnn", strategy)
    expected = analyzer.compute_pairwise_scores("a", strategy, batches(x[:5], y[:5], 5), batches(x, y, 8))
    model.to(memory_format=torch.channels_last)
    last = [(bx.contiguous(memory_format=torch.channels_last), by) for bx, by in batches(x, y, 8)]
    factors = analyzer.fit_all_factors("last", last, FactorArguments(strategy=strategy, use_empirical_fisher=True))
    scores = analyzer.compute_pairwise_scores("b", "last", last[:1], last)
    assert relative_error(scores["all_modules"][:5], expected["all_modules"]) < 1e-10
    assert factors["lambda_matrix"].keys() == {"0", "2", "5"}


@pytest.mark.parametrize("native", [True, False], ids=["torch-bf16-kernels", "bf16-in-fp32"])
def test_bf16_self_scores_and_lambda_agree_with_fp32(tmp_path, monkeypatch, native):
    from scipy.stats import spearmanr

    widened = bf16_kernels(monkeypatch, native)
    analyzer, _, _, data = float32_cnn(tmp_path, seed=6)
    factors, scores = {}, {}
    for half in (False, True):
        name = "half" if half else "full"
        args = FactorArguments(strategy="ekfac", use_half_precision=half, use_empirical_fisher=True)
        factors[half] = analyzer.fit_all_factors(name, data, args)
        score_args = ScoreArguments(damping_factor=None, use_half_precision=half)
        scores[half] = analyzer.compute_self_scores(name, name, data, score_args)["all_modules"]
    for name, full in factors[False]["lambda_matrix"].items():
        assert relative_error(factors[True]["lambda_matrix"][name], full) < 0.05
    assert spearmanr(scores[False].numpy(), scores[True].numpy()).statistic > 0.99
    assert (widened["matmul"] > 0 and widened["autocast"] > 0) is not native, widened


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize(
    "shapes", [((40, 24), (24, 17)), ((3, 40, 24), (24, 17)), ((40, 24), (3, 24, 17)), ((3, 40, 24), (3, 24, 17))]
)
def test_bf16_products_are_what_bf16_units_compute(monkeypatch, native, shapes):
    """Native bf16 kernels, or bf16 values multiplied in fp32 where torch has none (influence.products): either way
    the float64 product of the bf16 operands, rounded to bf16, to within one bf16 rounding step (2^-8)."""
    widened = bf16_kernels(monkeypatch, native)
    torch.manual_seed(9)
    x, y = (torch.randn(shape).bfloat16() for shape in shapes)
    x = x.transpose(-1, -2).contiguous().transpose(-1, -2)  # one operand transposed in memory, as the passes have
    found = products.matmul(x, y)
    reference = torch.matmul(x.double(), y.double())
    assert found.dtype == torch.bfloat16 and found.shape == reference.shape
    assert ((found.double() - reference).abs() <= 2**-8 * reference.abs() + 1e-30).all()
    if not native:  # the fp32 product, rounded once
        assert widened["matmul"] == 1 and torch.equal(found, torch.matmul(x.float(), y.float()).bfloat16())
    assert products.matmul(x.float(), y.float()).dtype == torch.float32  # other dtypes as they are
    assert not products.widens_bf16(torch.empty(2, dtype=torch.bfloat16, device="meta"))  # a CPU's only


def test_bf16_queries_held_in_fp32_give_the_same_scores(tmp_path, monkeypatch):
    """Where bf16 products are carried in fp32, a pairwise pass holds its preconditioned queries in fp32 with bf16
    values (products.held_dtype), converted once instead of at every product: not one score bit changes."""
    from influence import analyzer as analyzer_module

    bf16_kernels(monkeypatch, native=False)
    assert products.held_dtype(torch.bfloat16, "cpu") == torch.float32
    assert products.held_dtype(torch.float32, "cpu") == torch.float32
    assert products.held_dtype(torch.bfloat16, "meta") == torch.bfloat16
    analyzer, x, y, data = float32_cnn(tmp_path, seed=8)
    analyzer.fit_all_factors("half", data, FactorArguments(strategy="ekfac", use_half_precision=True))
    args = ScoreArguments(damping_factor=None, use_half_precision=True)
    held = analyzer.compute_pairwise_scores("held", "half", batches(x[:8], y[:8], 8), data, args)["all_modules"]
    monkeypatch.setattr(analyzer_module, "held_dtype", lambda dtype, device: dtype)  # the queries kept in bf16
    kept = analyzer.compute_pairwise_scores("kept", "half", batches(x[:8], y[:8], 8), data, args)["all_modules"]
    assert torch.equal(held, kept)
    monkeypatch.setattr(products, "native_cpu_bf16", lambda: True)
    assert products.held_dtype(torch.bfloat16, "cpu") == torch.bfloat16  # bf16 kernels take bf16 as it is


@pytest.mark.parametrize("op", ["conv2d", "linear", "matmul"])
def test_bf16_autocast_products_carried_in_fp32_round_once(monkeypatch, op):
    """bf16_autocast where torch has no native bf16 kernels: a product's output and its operands' gradients are each
    the float64 result on the bf16 operands, rounded to bf16 once, as bf16 units give them (torch's generic bf16
    kernels round more often: here their convolution's input gradient is 2.4 times further off)."""
    import torch.nn.functional as F

    bf16_kernels(monkeypatch, native=False)
    torch.manual_seed(11)
    operands = {
        "conv2d": (torch.randn(4, 6, 7, 7), torch.randn(5, 6, 3, 3), torch.randn(5)),
        "linear": (torch.randn(9, 30), torch.randn(12, 30), torch.randn(12)),
        "matmul": (torch.randn(3, 9, 30), torch.randn(30, 12)),
    }[op]
    apply = {"conv2d": partial(F.conv2d, padding=1), "linear": F.linear, "matmul": lambda a, b: a @ b}[op]
    found = [operand.clone().requires_grad_() for operand in operands]
    with products.bf16_autocast("cpu"):
        output = apply(*found)
    assert output.dtype == torch.bfloat16
    output_gradient = torch.randn(output.shape).bfloat16()
    output.backward(output_gradient)
    exact = [operand.bfloat16().double().requires_grad_() for operand in operands]
    reference = apply(*exact)
    reference.backward(output_gradient.double())
    pairs = [(output, reference), *((f.grad, e.grad) for f, e in zip(found, exact, strict=True))]
    for value, expected in pairs:
        value, expected = value.detach(), expected.detach()
        assert torch.equal(value, value.bfloat16().to(value.dtype))  # rounded to bf16
        slack = 2**-8 * expected.abs() + 1e-5 * expected.abs().max()  # once; fp32 sums where terms cancel
        assert ((value.double() - expected).abs() <= slack).all()


def test_bf16_autocast_leaves_alone_what_autocast_leaves_alone(monkeypatch):
    """Products autocast does not cast (integers, float64, out=) run as they are, and on a GPU no mode is entered."""
    import warnings

    bf16_kernels(monkeypatch, native=False)
    x, written = torch.randn(4, 4), torch.zeros(4, 4)
    with products.bf16_autocast("cpu"):
        integers = torch.ones(3, 3, dtype=torch.long) @ torch.ones(3, 3, dtype=torch.long)
        doubles = x.double() @ x.double()
        torch.mm(x, x, out=written)
        assert torch._C._len_torch_function_stack() == 1
    assert integers.dtype == torch.long and doubles.dtype == torch.float64
    assert written.dtype == torch.float32 and torch.equal(written, torch.mm(x, x))  # not of bf16-rounded operands
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's note that CUDA autocast is off on a machine without CUDA
        with products.bf16_autocast("cuda"):
            assert torch._C._len_torch_function_stack() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dim", [11, 300, 600])
def test_the_covariance_update_tries_every_cpu_kernel_and_keeps_the_fastest(monkeypatch, dtype, dim):
    """A shape's first update splits its rows between BLAS's symmetric update, a general product and (past one
    block of columns) block rows, later ones run the fastest per row alone, updates too small to split the
    general product: every one adds rows^T rows to the lower triangle, as a float64 product says."""
    from influence import factors
    from influence.factors import KERNEL_SECONDS, TRIAL_ROWS, cpu_kernels, symmetrised, syrk_update

    kernels = cpu_kernels(dim)
    assert len(kernels) == (2 if dim == 11 else 3)
    ran = []
    for name, kernel in list(factors.CPU_KERNELS.items()):
        monkeypatch.setitem(factors.CPU_KERNELS, name, lambda t, r, k=kernel, n=name: ran.append(n) or k(t, r))
    count = TRIAL_ROWS * len(kernels) + 1
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(count, dim, generator=generator, dtype=torch.float64) for _ in range(3)]
    batches.append(torch.randn(TRIAL_ROWS, dim, generator=generator, dtype=torch.float64))  # too small to split
    key = (count, dim, dtype, torch.get_num_threads())
    KERNEL_SECONDS.pop(key, None)
    total, expected = torch.zeros(dim, dim, dtype=dtype), torch.zeros(dim, dim, dtype=torch.float64)
    # Entries are sums of about 800 products of unit normals (off the diagonal about 30 in size): fp32 rounds them
    # to about 1e-5 each.
    atol, rtol = (1e-11, 1e-12) if dtype == torch.float64 else (1e-4, 1e-5)
    for step, rows in enumerate(batches):
        if step == 1:  # make the slowest kernel per row the one that looks fastest: it alone runs from now on
            KERNEL_SECONDS[key] = {name: float(len(kernels) - i) for i, name in enumerate(kernels)}
        ran.clear()
        syrk_update(total, rows.to(dtype))
        expected += rows.T @ rows
        if step == 0:
            assert ran == list(kernels) and list(KERNEL_SECONDS[key]) == list(kernels)
        else:
            assert ran == [kernels[-1] if step < 3 else "general"]
        torch.testing.assert_close(symmetrised(total).double(), expected, rtol=rtol, atol=atol)


# Convolutions whose covariance comes from shifted products: paddings that read every column (1), skip some (0),
# reach past the input (3 on 3x3), asymmetric ('same' with an even kernel), dilations, non-square; strides that
# split the input into phases (ResNet-9's 5x5 stride 2), per axis, with a stride above the kernel (a phase no
# offset reads) and with an odd input size (phases of unequal length).
SHIFTED = [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=3, padding=0),
    dict(kernel_size=(3, 5), padding=(1, 2)),
    dict(kernel_size=3, padding=2, dilation=2),
    dict(kernel_size=3, padding=3),
    dict(kernel_size=(2, 3), padding="valid"),
    dict(kernel_size=4, padding="same", dilation=(1, 2)),
    dict(kernel_size=5, padding=2, stride=2),
    dict(kernel_size=3, padding=1, stride=2),
    dict(kernel_size=(3, 4), padding=(0, 1), stride=(1, 2)),
    dict(kernel_size=2, padding=1, stride=3),
    dict(kernel_size=3, padding=2, stride=2, dilation=(1, 2)),
]


def unfolded_by_torch(conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """[N * T, in'] patches in the weight's column order, by torch's unfold on explicitly padded input."""
    import torch.nn.functional as F

    (kh, kw), (dh, dw) = conv.kernel_size, conv.dilation
    if conv.padding == "same":
        pads = [d * (k - 1) for k, d in ((kw, dw), (kh, dh))]
        pad = (pads[0] // 2, pads[0] - pads[0] // 2, pads[1] // 2, pads[1] - pads[1] // 2)
    else:
        ph, pw = (0, 0) if conv.padding == "valid" else conv.padding
        pad = (pw, pw, ph, ph)
    a = F.unfold(F.pad(x, pad), conv.kernel_size, dilation=conv.dilation, stride=conv.stride).transpose(1, 2)
    if conv.bias is not None:
        a = torch.cat([a, torch.ones(*a.shape[:2], 1, dtype=a.dtype)], 2)
    return a.reshape(-1, a.shape[-1])


@pytest.mark.parametrize("geometry", SHIFTED, ids=str)
@pytest.mark.parametrize("bias", [False, True])
def test_shifted_products_give_the_patches_covariance(geometry, bias):
    """A^T A from shifted products of the input equals the product of the patches torch's unfold gathers, in
    float64, bias column included."""
    from influence.factors import symmetrised
    from influence.modules import find_layers
    from influence.shifted import add_shifted, shifted_input

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 3, bias=bias, **geometry).double()
    (layer,) = find_layers(torch.nn.Sequential(conv), None)
    x = torch.randn(5, 4, 7, 9, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    a = unfolded_by_torch(conv, x)
    total = torch.zeros(layer.in_dim, layer.in_dim, dtype=torch.float64)
    image = shifted_input(layer, x[:2])
    add_shifted(total, layer, image)
    add_shifted(total, layer, shifted_input(layer, x[2:]))  # updates add up
    assert image.plan.positions * 5 == a.shape[0]
    assert relative_error(layer.to_weight_order(symmetrised(total), dims=(0, 1)), a.T @ a) < 1e-13


def test_a_convolution_that_reads_only_padding_takes_the_patches():
    """Where no kernel offset reads the input (every patch is padding), there is nothing to shift: the covariance
    pass takes the patches, whose covariance is zero but for the bias."""
    from influence.modules import find_layers
    from influence.shifted import covariance_input

    conv = torch.nn.Conv2d(16, 4, 2, stride=3, padding=4, dilation=(3, 1)).double()
    (layer,) = find_layers(torch.nn.Sequential(conv), None)
    x = torch.randn(2, 16, 2, 2, dtype=torch.float64)
    a = covariance_input(layer, x)
    assert isinstance(a, torch.Tensor) and a.shape == (2, conv(x)[0, 0].numel(), layer.in_dim)
    assert (a[..., :-1] == 0).all() and (a[..., -1] == 1).all()


def test_the_covariance_pass_shifts_the_convolutions_where_that_takes_fewer_flops(tmp_path):
    """On the CPU the covariance pass takes shifted products for wide convolutions where they take fewer FLOPs
    than the patches (a 3x3 and a 5x5 with stride 2), patches for the narrow, 1x1 and 3x3 stride-2 ones (about as
    many FLOPs either way), and the fitted covariances are their definitions either way."""
    from influence.modules import find_layers
    from influence.shifted import ShiftedInput, covariance_input

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1),  # too narrow an input
        torch.nn.Tanh(),
        torch.nn.Conv2d(16, 16, 3, padding=1, bias=False),  # shifted
        torch.nn.Tanh(),
        torch.nn.Conv2d(16, 16, 5, stride=2, padding=2),  # shifted, in four phases
        torch.nn.Tanh(),
        torch.nn.Conv2d(16, 16, 3, stride=2, padding=1),  # no fewer FLOPs shifted
        torch.nn.Tanh(),
        torch.nn.Conv2d(16, 8, 1),  # 1x1
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 4, 3),
    ).double()
    x, y = torch.randn(12, 3, 8, 8, dtype=torch.float64), torch.randint(0, 3, (12,))
    shifted = {}

    def keep_input(layer, module, args):
        shifted[layer.name] = covariance_input(layer, args[0])

    handles = [layer.module.register_forward_pre_hook(partial(keep_input, layer)) for layer in find_layers(model, None)]
    model(x)
    for handle in handles:
        handle.remove()
    assert [name for name, inputs in shifted.items() if isinstance(inputs, ShiftedInput)] == ["2", "4"]
    analyzer = Analyzer("test", model, TinyTask(), output_dir=tmp_path, disable_tqdm=True)
    args = FactorArguments(strategy="kfac", use_empirical_fisher=True)
    factors = analyzer.fit_all_factors("kfac", batches(x, y, 5), args)
    captured = activations_and_output_gradients(model, TinyTask().compute_train_loss, x, y)
    for name, (a, _) in captured.items():
        a_cov = torch.einsum("nti,ntj->ij", a, a) / (a.shape[0] * a.shape[1])
        assert relative_error(factors["activation_covariance"][name], a_cov) < 1e-12, name
