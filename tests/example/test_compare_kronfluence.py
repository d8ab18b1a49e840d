"""compare_kronfluence.py: without kronfluence it says in one line how to install it, bad inputs stop in one line,
its copy of the engine's Fisher seed is the engine's, and (where kronfluence is installed, which this project does
not require) the two engines' scores of a tiny job agree."""

from __future__ import annotations

import importlib.util
import re
import sys
import types

import pytest

from tests.helpers import one_line_error, run

SCRIPT = "compare_kronfluence.py"
HAS_KRONFLUENCE = importlib.util.find_spec("kronfluence") is not None


def test_without_kronfluence_it_says_how_to_install_it(monkeypatch, tmp_path):
    # A kronfluence that cannot be imported, ahead of any installed one on the path: what a machine without it sees.
    (tmp_path / "kronfluence.py").write_text("raise ModuleNotFoundError(\"No module named 'kronfluence'\")\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "kronfluence", raising=False)
    result = run(SCRIPT, "--num_train", "8", expect=2)
    error = one_line_error(result)
    assert error.startswith("error: kronfluence is not installed (No module named 'kronfluence')")
    assert "pip install kronfluence==1.0.1" in error


def test_a_broken_kronfluence_and_bad_inputs_are_one_line_errors(monkeypatch, fake_cifar_dir, tmp_path):
    # Installed but failing as it is imported (a dependency that does not fit, say).
    (tmp_path / "kronfluence.py").write_text("1 / 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "kronfluence", raising=False)
    error = one_line_error(run(SCRIPT, expect=2))
    assert "kronfluence could not be imported (ZeroDivisionError: division by zero)" in error

    # An importable kronfluence from here on (the inputs are refused before any side starts).
    monkeypatch.setitem(sys.modules, "kronfluence", types.SimpleNamespace(__version__="1.0.1"))
    data = ["--dataset_dir", str(fake_cifar_dir)]
    cases = [
        ([*data, "--num_train", "0"], "--num_train: expected an integer > 0, got 0"),
        ([*data, "--jobs", "all"], "invalid choice: 'all'"),
        ([*data, "--num_train", "500"], "--num_train must be between 1 and 200"),
        ([*data, "--num_train", "8", "--num_queries", "101"], "--num_queries must be between 1 and 100"),
        ([*data, "--num_train", "8", "--checkpoint", str(tmp_path / "none.safetensors")], "no checkpoint at"),
        (["--dataset_dir", str(tmp_path / "none"), "--num_train", "8"], "copy cifar-10-batches-py/ into"),
        ([*data, "--num_train", "8", "--device", "cuda"], "a GPU was asked for but torch sees none"),  # run() hides it
    ]
    for args, hint in cases:
        assert hint in one_line_error(run(SCRIPT, *args, expect=2)), (args, hint)


@pytest.mark.skipif(not HAS_KRONFLUENCE, reason="kronfluence is not installed (pip install kronfluence==1.0.1)")
def test_both_engines_compute_the_same_scores(fake_cifar_dir):
    result = run(SCRIPT, "--dataset_dir", str(fake_cifar_dir), "--num_train", "64", "--num_queries", "4")
    out = result.stdout
    assert out.startswith("ResNet-9, EK-FAC, fp32, cpu, 64 training examples, 4 queries, training batches of 128")
    assert "\nDevice: " in out and "threads" in out
    for job in ("factors + pairwise", "factors + self-influence"):
        assert re.search(rf"^{re.escape(job)} +[\d.]+ +[\d.]+ +[\d.]+$", out, flags=re.M), out
    pairwise = float(re.search(r"mean per-query Spearman ([\d.]+)", out).group(1))
    self_influence = float(re.search(r"self-influence scores: Spearman ([\d.]+)", out).group(1))
    differences = [float(found) for found in re.findall(r"relative difference ([\d.e+-]+)", out)]
    assert pairwise > 0.9 and self_influence > 0.9, out
    assert len(differences) == 2 and max(differences) < 0.05, out  # same sign and scale, not only the same ranks
