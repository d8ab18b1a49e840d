"""The engine is a library: its documented example runs from outside the repository, and its wheel holds it alone."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

import influence
from tests.helpers import REPO_ROOT

EXAMPLE_HEADING = "## Example: an MLP on generated data"


def documented_example() -> str:
    """The first ```python block after EXAMPLE_HEADING in docs/engine.md."""
    text = (REPO_ROOT / "docs" / "engine.md").read_text()
    assert EXAMPLE_HEADING in text, f"docs/engine.md has no section {EXAMPLE_HEADING!r}"
    found = re.search(r"```python\n(.*?)```", text.split(EXAMPLE_HEADING, 1)[1], flags=re.S)
    assert found, f"no python block after {EXAMPLE_HEADING!r} in docs/engine.md"
    return found.group(1)


def test_the_documented_example_runs_outside_the_repository(tmp_path):
    # PYTHONPATH stands in for the installed package; the working folder holds nothing of the repository.
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", documented_example()],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "EK-FAC pairwise scores: (20, 200)" in result.stdout, result.stdout
    assert "EK-FAC self-influence: (200,)" in result.stdout, result.stdout
    assert list(tmp_path.iterdir()) == []  # everything went into the example's temporary folder


def test_the_wheel_holds_the_engine_alone(tmp_path):
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed, so the wheel cannot be built without downloading it")
    # A copy of the project's packaging and engine, beside stand-ins for everything else at the repository's root
    # (its scripts, and its folders as would-be packages), so that the build neither writes into the repository
    # nor could pass by finding nothing else to package.
    source = tmp_path / "source"
    shutil.copytree(REPO_ROOT / "influence", source / "influence", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO_ROOT / "pyproject.toml", source / "pyproject.toml")
    for path in REPO_ROOT.iterdir():
        if path.name.startswith(".") or path.name == "influence":
            continue
        if path.suffix == ".py":
            (source / path.name).write_text("")
        elif path.is_dir():
            (source / path.name).mkdir()
            (source / path.name / "__init__.py").write_text("")
    (source / "example").mkdir(exist_ok=True)
    (source / "example" / "__init__.py").write_text("")

    wheels = tmp_path / "wheels"
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels)]
    result = subprocess.run([*command, str(source)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = wheels.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/", 1)[0] for name in names}
    dist_info = {name for name in top if name.endswith(".dist-info")}
    assert len(dist_info) == 1 and top - dist_info == {"influence"}, sorted(top)
    engine = {name.removeprefix("influence/") for name in names if name.startswith("influence/")}
    expected = {path.name for path in (REPO_ROOT / "influence").glob("*.py")}
    assert {"__init__.py", "analyzer.py", "strategies.py"} <= engine and engine == expected, sorted(engine ^ expected)
    metadata = zipfile.ZipFile(wheel).read(f"{dist_info.pop()}/METADATA").decode()
    requires = sorted(re.findall(r"^Requires-Dist: ([\w-]+)", metadata, flags=re.M))
    assert requires == ["numpy", "safetensors", "scipy", "torch", "tqdm"], requires


def test_the_public_api_is_importable_from_the_package():
    import influence

    missing = [name for name in influence.__all__ if not hasattr(influence, name)]
    assert not missing, missing
    assert len(set(influence.__all__)) == len(influence.__all__)
    from influence import interrupt  # a module as well as the home of handling and Interrupted

    assert interrupt.handling is influence.handling and interrupt.Interrupted is influence.Interrupted


def test_one_object_per_strategy():
    from influence import (
        ALL_STRATEGIES,
        STRATEGIES,
        STRATEGY_LABELS,
        FactorArguments,
        InfluenceError,
        get_strategy,
    )

    assert STRATEGIES == ("identity", "diagonal", "kfac", "ekfac")
    assert tuple(strategy.name for strategy in ALL_STRATEGIES) == STRATEGIES
    assert STRATEGY_LABELS == {"identity": "identity", "diagonal": "diagonal", "kfac": "K-FAC", "ekfac": "EK-FAC"}
    assert [get_strategy(name).label for name in STRATEGIES] == ["identity", "diagonal", "K-FAC", "EK-FAC"]
    needs = {name: (get_strategy(name).eigenbasis, get_strategy(name).fits_lambda) for name in STRATEGIES}
    assert needs == {
        "identity": (False, False),
        "diagonal": (False, True),
        "kfac": (True, False),
        "ekfac": (True, True),
    }
    assert get_strategy("identity").factor_kinds() == [] and get_strategy("diagonal").factor_kinds() == [
        "lambda_matrix"
    ]
    assert get_strategy("kfac").factor_kinds() == get_strategy("ekfac").factor_kinds()
    assert get_strategy("kfac").factor_kinds()[-1] == "lambda_matrix"
    assert FactorArguments(strategy=get_strategy("kfac")).strategy == "kfac"  # saved as its name
    with pytest.raises(InfluenceError, match=r"^unknown factor strategy 'EK-FAC': choose one of identity, diagonal"):
        get_strategy("EK-FAC")


def test_the_engine_names_no_script_and_no_flag():
    """Its messages, defaults and comments speak of the Analyzer's arguments; the scripts translate them."""
    found = []
    for path in sorted((REPO_ROOT / "influence").glob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"--[a-z]|\b\w+\.py\b", line):
                found.append(f"{path.name}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


def test_the_example_imports_only_what_the_engine_exports():
    """The scripts, pipeline.py and example/ use the engine through `influence` alone, never its private modules."""
    example = [*REPO_ROOT.glob("*.py"), *(REPO_ROOT / "example").glob("*.py")]
    reaching = [
        f"{path.name}: {line.strip()}"
        for path in example
        for line in path.read_text().splitlines()
        if re.match(r"\s*(from influence\.\w+ import|import influence\.)", line)
    ]
    assert not reaching, reaching
    exported = set(influence.__all__)
    for path in example:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "influence":
                used = {alias.name for alias in node.names}
                assert used <= exported, (path.name, sorted(used - exported))


def test_every_exported_name_is_documented():
    api = (REPO_ROOT / "docs" / "engine.md").read_text().split("## API", 1)[1].split("## Files", 1)[0]
    undocumented = [name for name in influence.__all__ if f"`{name}`" not in api]
    assert not undocumented, f"docs/engine.md's API section does not name {undocumented}"
