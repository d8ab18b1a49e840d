"""The documentation stays true: its commands parse, its links resolve, and the walk-through runs what it lists.

Every shell command in README.md, docs/*.md and the scripts' docstrings that runs one of the project's scripts is
handed to that script's own argument parser, so a renamed, removed or misspelt flag fails here.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
from functools import cache

import pytest

from tests.helpers import REPO_ROOT, run

DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
# The top level holds the scripts a user runs and pipeline.py, their shared model and data (checked below).
SCRIPTS = sorted(p.name for p in REPO_ROOT.glob("*.py") if p.name not in ("pipeline.py", "conftest.py"))
# What may stand before the script: an interpreter, torchrun and its options, environment settings, a prompt.
LAUNCHER = re.compile(r"^(\$|python3?|torchrun|-m|torch\.distributed\.run|--?[\w-]+(=\S+)?|\w+=\S*)$")


def shell_lines(markdown: str) -> list[str]:
    """The lines of the ```bash blocks, continuation lines joined, comments dropped."""
    lines = []
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", markdown, flags=re.S):
        lines += [line.split(" #")[0].strip() for line in block.replace("\\\n", " ").splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def docstring_lines(source: str) -> list[str]:
    """The commands shown in a script's docstring: indented lines that start with python or torchrun."""
    doc = source.split('"""')[1]
    lines = [line.strip() for line in doc.replace("\\\n", " ").splitlines()]
    return [line.split(" #")[0].strip() for line in lines if re.match(r"(python|torchrun|OMP_NUM_THREADS)\b", line)]


def script_call(line: str) -> tuple[str, list[str]] | None:
    """(script, its arguments) when the command runs one of the project's scripts, else None."""
    tokens = shlex.split(line)
    for i, token in enumerate(tokens):
        if token in SCRIPTS:
            assert all(LAUNCHER.match(t) for t in tokens[:i]), f"unexpected launcher in: {line}"
            return token, tokens[i + 1 :]
        if not LAUNCHER.match(token):
            return None
    return None


@cache
def script_module(name: str):
    spec = importlib.util.spec_from_file_location(f"doc_{name[:-3]}", REPO_ROOT / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_error(script: str, args: list[str], capsys) -> str | None:
    """What the script's parser says about these arguments, or None when it takes them."""
    try:
        script_module(script).parse_args(args)
    except SystemExit as e:  # --help exits 0
        return None if e.code == 0 else capsys.readouterr().err.strip() or f"exit {e.code}"
    return None


def documented_calls() -> list[tuple[str, str, list[str]]]:
    calls = []
    for path in DOCS:
        for line in shell_lines(path.read_text()):
            if (call := script_call(line)) is not None:
                calls.append((path.name, *call))
    for script in SCRIPTS:
        for line in docstring_lines((REPO_ROOT / script).read_text()):
            if (call := script_call(line)) is not None:
                calls.append((script, *call))
    return calls


def test_every_documented_command_parses(capsys):
    calls = documented_calls()
    shown = {script for _, script, _ in calls}
    # The README and docs show every script that takes flags, so each one's commands are checked here.
    assert shown == set(SCRIPTS), f"scripts without a documented command: {set(SCRIPTS) - shown}"
    failures = [
        f"{where}: {script} {' '.join(args)}\n    {error}"
        for where, script, args in calls
        if (error := parse_error(script, args, capsys)) is not None
    ]
    assert not failures, "\n".join(failures)


def test_a_misspelt_flag_is_caught(capsys):
    readme = (REPO_ROOT / "README.md").read_text()
    command = next(line for line in shell_lines(readme) if "analyze.py" in line and "--num_queries" not in line)
    script, args = script_call(command.replace("--factor_strategy", "--factor_stratgy"))
    assert "unrecognized arguments: --factor_stratgy" in parse_error(script, args, capsys)
    assert parse_error(*script_call(command), capsys) is None


def test_links_and_images_resolve_inside_the_repository():
    for path in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
            if re.match(r"[a-z]+://", target) or target.startswith("#"):
                continue
            resolved = (path.parent / target.split("#")[0]).resolve()
            assert resolved.is_relative_to(REPO_ROOT) and resolved.exists(), f"{path.name}: broken link {target}"


def test_no_file_points_outside_the_repository():
    files = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    outside = re.compile(r"\.\./(shared|\.\.)|make_" + "cifar10")  # written split so that this file passes
    for name in files.split():
        path = REPO_ROOT / name
        if path.suffix in {".py", ".md", ".txt", ".toml", ".sh"} or name.startswith(".ci/"):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                assert not outside.search(line), f"{name}:{number} names a path outside the repository: {line}"


def test_walkthrough_runs_the_steps_the_docs_list(tmp_path):
    labels = tmp_path / "CIFAR-10_human.pt"
    labels.write_bytes(b"")  # the dry run only checks that the file is there
    plan = run("walkthrough.py", "--scale", "cpu", "--noisy_labels", str(labels), "--dry_run").stdout
    steps = [line.split(":")[0] for line in plan.splitlines()]
    table = (REPO_ROOT / "docs" / "cpu_walkthrough.md").read_text()
    listed = re.findall(r"^\| `(\w+)` \|", table, flags=re.M)
    assert steps == listed

    demo = run("walkthrough.py", "--scale", "demo", "--dry_run").stdout
    names = [line.split(":")[0] for line in demo.splitlines()]
    assert names == ["train_clean", "train_corrupt", "analyze_ekfac", "top_influential", "detect_ekfac"]
    readme = (REPO_ROOT / "README.md").read_text()
    for figure in ("walkthrough/demo/figures/top_influential.png", "walkthrough/demo/figures/mislabel.png"):
        assert figure in demo and figure in readme


def test_the_full_size_page_lists_the_full_scale_steps_in_order(tmp_path):
    labels = tmp_path / "CIFAR-10_human.pt"
    labels.write_bytes(b"")
    plan = run("walkthrough.py", "--scale", "full", "--noisy_labels", str(labels), "--dry_run").stdout
    steps = [line.split(":")[0] for line in plan.splitlines()]
    page = (REPO_ROOT / "docs" / "full_size.md").read_text()
    table = page[page.index("| step |") : page.index("\n\n", page.index("| step |"))]
    listed = re.findall(r"`(\w+)`", "".join(row.split(" | ")[0] for row in table.splitlines()[2:]))
    assert listed == steps


@pytest.mark.parametrize("scale", ["cpu", "gpu"])
def test_walkthrough_says_when_cifar10n_steps_are_skipped(scale):
    result = run("walkthrough.py", "--scale", scale, "--dry_run")
    note = "CIFAR-10N steps skipped: no --noisy_labels (download CIFAR-10_human.pt from https://"
    assert result.stderr.startswith(note)
    assert "train_noisy" not in result.stdout and "detect_noisy" not in result.stdout


def test_the_top_level_holds_scripts_and_the_file_list_is_the_tree():
    for name in SCRIPTS:  # a script reads its flags and runs when started, and only then
        source = (REPO_ROOT / name).read_text()
        assert "def parse_args(" in source and 'if __name__ == "__main__":' in source, name
    block = (REPO_ROOT / "docs" / "engine.md").read_text().split("## Files", 1)[1].split("```")[1]
    listed, folder = set(), ""
    for line in block.splitlines():
        entry = line.split()[0] if line.strip() else ""
        if entry.endswith("/"):
            folder = entry if not line.startswith(" ") else folder + entry
        elif entry.endswith(".py"):
            listed.add((folder if line.startswith(" ") else "") + entry)
    tree = {p.name for p in REPO_ROOT.glob("*.py") if p.name != "conftest.py"}
    tree |= {f"{package}/{p.name}" for package in ("example", "influence") for p in (REPO_ROOT / package).glob("*.py")}
    assert listed == tree, (
        f"docs/engine.md lists {sorted(listed - tree)} that are not there, misses {sorted(tree - listed)}"
    )


def test_the_docs_python_imports_resolve():
    """Every import in the docs' Python blocks names a module and names that exist (a moved module fails here)."""
    for doc in DOCS:
        for block in re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S):
            for line in (line.strip() for line in block.splitlines()):  # blocks inside list items are indented
                if line.startswith(("from ", "import ")):
                    exec(line, {})  # noqa: S102 - the docs' own import lines, nothing else
