"""Bad flags and bad paths are one line and exit 2 before any work starts; bf16 units are read off the CPU flags;
the walk-through passes a stop on to its step and reruns a step whose command changed."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from example.hardware import cpu_bf16_units, emulated_bf16_note
from tests.helpers import REPO_ROOT, one_line_error, run

# ---- Flags and paths: one line, exit 2, nothing written ----

BAD_FLAGS = [
    ("detect_mislabeled_dataset.py", ["--noisy_labels", "x.npz", "--corrupt_percentage", "0.2"], "cannot be combined"),
    ("analyze.py", ["--damping_factor", "inf"], "damping must be a finite number"),
    ("analyze.py", ["--save_interval", "nan"], "--save_interval: expected a finite number >= 0"),
    ("analyze.py", ["--save_interval", "-1"], "--save_interval: expected a finite number >= 0"),
    ("analyze.py", ["--dist_timeout", "nan"], "--dist_timeout: expected a finite number > 0"),
    ("analyze.py", ["--fisher_seed", str(2**70)], "a seed must be below 2**63"),
    ("analyze.py", ["--seed", str(2**70)], "a seed must be below 2**63"),
    ("analyze.py", ["--train_batch_size", "0"], "--influence_batch_size/--train_batch_size: expected an integer > 0"),
    ("analyze.py", ["--num_train", "0"], "--num_train: expected an integer > 0"),
    ("train.py", ["--learning_rate", "nan"], "--learning_rate: expected a finite number >= 0"),
    ("train.py", ["--weight_decay", "nan"], "--weight_decay: expected a finite number >= 0"),
    ("train.py", ["--seed", str(2**70)], "a seed must be below 2**63"),
    ("train.py", ["--train_batch_size", "0"], "--train_batch_size: expected an integer > 0"),
    ("train.py", ["--corrupt_percentage", "1.0"], "expected a fraction between 0 and 1"),
    ("detect_mislabeled_dataset.py", ["--corrupt_percentage", "1.0"], "expected a fraction between 0 and 1"),
    ("top_influential.py", ["--top_k", "-1"], "--top_k: expected an integer > 0"),
    ("top_influential.py", ["--queries", "-3"], "--queries: expected an integer >= 0"),
    ("bench.py", ["--num_train", "0"], "--num_train: expected an integer > 0"),
    ("bench.py", ["--query_batch_size", "-2"], "--query_batch_size: expected an integer > 0"),
    ("bench.py", ["--influence_batch_size", "0"], "--influence_batch_size: expected an integer > 0"),
    ("evaluate_lds.py", ["--influence_batch_size", "0"], "--influence_batch_size: expected an integer > 0"),
    ("bench.py", ["--device", "tpu"], "invalid choice: 'tpu'"),
]


@pytest.mark.parametrize("script, args, message", BAD_FLAGS, ids=[f"{s}{' '.join(a)}" for s, a, _ in BAD_FLAGS])
def test_bad_flag_values_are_one_line(script, args, message):
    assert message in one_line_error(run(script, *args, expect=2))


def test_world_size_that_is_not_a_number_is_one_line(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    assert "WORLD_SIZE='two' is not an integer" in one_line_error(run("train.py", "--num_train", "8", expect=2))


def test_bench_on_a_missing_gpu_is_one_line():  # run() hides a GPU the host has
    assert "a GPU was asked for but torch sees none" in one_line_error(run("bench.py", "--device", "cuda", expect=2))


def test_too_many_examples_name_their_flag(tmp_path, fake_cifar_dir):
    data = ["--dataset_dir", str(fake_cifar_dir), "--checkpoint_dir", str(tmp_path)]
    result = run("train.py", *data, "--num_train", "8", "--num_test", "5000", expect=2)
    assert "--num_test must be between 1 and 100 (valid examples), got 5000" in one_line_error(result)
    result = run("bench.py", "--dataset_dir", str(fake_cifar_dir), "--num_train", "8", "--num_queries", "900", expect=2)
    assert "--num_queries must be between 1 and 100" in one_line_error(result)


def test_paths_in_the_way_are_refused_before_any_work(tmp_path, fake_cifar_dir):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    data = ["--dataset_dir", str(fake_cifar_dir), "--num_train", "8", "--num_train_epochs", "1"]
    cases = [
        ("train.py", [*data, "--checkpoint_dir", str(a_file)], "is a file, not a folder"),
        ("train.py", [*data, "--checkpoint_dir", str(a_file / "below")], "is a file, not a folder"),
        ("analyze.py", [*data, "--output_dir", str(a_file)], "is a file, not a folder"),
        ("top_influential.py", ["--figure", str(tmp_path)], "is a folder: give a file name"),
        ("top_influential.py", ["--figure", str(tmp_path / "picture.pgn")], "end the name with .png"),
        ("half_precision_analysis.py", ["--figure", str(a_file / "f.png")], "is a file, not a folder"),
        ("evaluate_lds.py", [*data[:4], "--output_dir", str(a_file)], "is a file, not a folder"),
        ("evaluate_lds.py", [*data[:4], "--figure", str(tmp_path / "lds")], "end the name with .png"),
        ("detect_mislabeled_dataset.py", [*data[:4], "--top_figure", str(tmp_path)], "is a folder: give a file name"),
        ("walkthrough.py", ["--scale", "demo", "--out_dir", str(a_file)], "is a file, not a folder"),
    ]
    for script, args, message in cases:
        assert message in one_line_error(run(script, *args, expect=2)), (script, args)
    # A folder where the checkpoint file goes is refused before training, not after it.
    (tmp_path / "ckpt" / "model.safetensors").mkdir(parents=True)
    result = run("train.py", *data, "--checkpoint_dir", str(tmp_path / "ckpt"), expect=2)
    assert "model.safetensors is a folder" in one_line_error(result)
    assert "epoch" not in result.stdout + result.stderr  # no training step ran


# ---- bf16 units ----


@pytest.mark.parametrize(
    "flags, units",
    [
        ("fpu sse2 avx2 fma avx512f avx512bw amx_bf16 amx_tile avx512_bf16", "AMX"),  # Sapphire Rapids
        ("fpu sse2 avx2 fma avx512f avx512bw avx512_bf16 avx512_vnni", "AVX-512 BF16"),  # AMD Zen 4
        ("fpu sse2 avx2 fma avx512f avx512bw avx512_vnni", None),  # Skylake/Ice Lake: AVX-512, no bf16
        ("fpu sse2 avx2 fma", None),  # AVX2 only
        ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics bf16 i8mm", "Arm BF16"),  # Armv8.6 Features line
        ("fp asimd evtstrm aes pmull", None),
    ],
)
def test_bf16_units_from_cpu_flags(flags, units):
    assert cpu_bf16_units(flags) == units


def test_emulated_bf16_is_said_in_one_line():
    cpu = torch.device("cpu")
    note = emulated_bf16_note(cpu, half=True, units=None)
    assert note.startswith("note: this CPU has no bf16 units") and "\n" not in note and "emulated" in note
    assert emulated_bf16_note(cpu, half=True, units="AMX") is None
    assert emulated_bf16_note(cpu, half=False, units=None) is None
    assert emulated_bf16_note(torch.device("cuda"), half=True, units=None) is None


# ---- The walk-through's steps ----

STEP = """
import signal, sys, time
from pathlib import Path
def save(signum, frame):
    Path(sys.argv[1]).write_text("saved")
    sys.exit(143)
signal.signal(signal.SIGTERM, save)
print("started", flush=True)
time.sleep(60)
"""


def test_a_stop_reaches_the_running_step_and_the_walkthrough_waits_for_it(tmp_path):
    saved = tmp_path / "saved"
    (tmp_path / "step.py").write_text(STEP)
    parent = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        import walkthrough
        from example.run import run_cli
        run_cli(lambda: walkthrough.run_step("step", [sys.executable, {str(tmp_path / "step.py")!r},
            {str(saved)!r}], {{}}, Path({str(tmp_path)!r}), "the step"))
        """)
    process = subprocess.Popen(
        [sys.executable, "-c", parent], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT
    )
    log = tmp_path / "step.log"
    deadline = time.monotonic() + 30
    while "started" not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 2, (out, err)
    assert err == "error: stopped during step step, which saved its progress: run the same command again\n"
    assert saved.read_text() == "saved"  # the step got the signal and saved before the walk-through left
    assert not (tmp_path / "step.done").exists()


def test_a_step_runs_again_when_its_command_changed(tmp_path):
    import walkthrough

    marker = tmp_path / "train.done"
    marker.write_text("12.0 1.50\npython train.py --num_train 8\n")
    assert walkthrough.finished_before(marker, "python train.py --num_train 8") is None  # no log beside it
    (tmp_path / "train.log").write_text("$ python train.py --num_train 8\n")
    assert walkthrough.finished_before(marker, "python train.py --num_train 8") == (12.0, 1.5)
    assert walkthrough.finished_before(marker, "python train.py --num_train 16") is None
    marker.write_text("12.0 1.50\n")  # a marker from before markers named their command
    assert walkthrough.finished_before(marker, "python train.py --num_train 8") is None


def test_walkthrough_writes_nothing_under_tracked_paths(tmp_path):
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.split()
    tracked_folders = {str(Path(name).parent) for name in tracked} - {"."}
    for scale in ("demo", "cpu", "full"):
        plan = run("walkthrough.py", "--scale", scale, "--dry_run").stdout
        written = [
            word
            for line in plan.splitlines()
            for flag, word in zip(line.split()[:-1], line.split()[1:], strict=True)
            if flag in ("--figure", "--output_dir", "--checkpoint_dir")
        ]
        assert written, scale
        for path in written:
            resolved = os.path.relpath((REPO_ROOT / path).resolve(), REPO_ROOT)
            assert resolved.startswith(f"walkthrough{os.sep}{scale}"), (scale, path)
            assert not any(resolved.startswith(folder + os.sep) for folder in tracked_folders), (scale, path)


def test_walkthrough_skips_the_steps_named():
    plan = run("walkthrough.py", "--scale", "gpu", "--dry_run", "--skip", "lds", "bench_fp32").stdout
    names = [line.split(":")[0] for line in plan.splitlines()]
    assert "lds" not in names and "bench_fp32" not in names and "bench_bf16" in names
    result = run("walkthrough.py", "--scale", "gpu", "--dry_run", "--skip", "ldss", expect=2)
    assert "--skip ldss: no such step at scale gpu" in one_line_error(result)


def test_malformed_score_files_are_one_line_for_the_scripts_that_read_them(tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "cifar10" / "scores_ekfac"
    folder.mkdir(parents=True)
    save_file({"other": torch.zeros(2, 8)}, str(folder / "pairwise_scores.safetensors"))  # no all_modules
    (folder / "score_arguments.json").write_text('{"info": {"num_train": 8, "num_queries": 2}}')
    read = [("top_influential.py", ["--figure", str(tmp_path / "t.png")]), ("half_precision_analysis.py", [])]
    for script, extra in read:
        result = run(script, "--output_dir", str(tmp_path), *extra, expect=2)
        assert "does not hold analyze.py's scores" in one_line_error(result), script
    save_file({"all_modules": torch.zeros(2, 8)}, str(folder / "pairwise_scores.safetensors"))
    (folder / "score_arguments.json").write_text("{}")  # no info
    result = run("top_influential.py", "--output_dir", str(tmp_path), "--figure", str(tmp_path / "t.png"), expect=2)
    assert "python analyze.py --factor_strategy ekfac --overwrite_output_dir" in one_line_error(result)
    (folder / "score_arguments.json").write_text('{"info": {"num_train": 8, "num_queries": 3}}')  # another size
    result = run("top_influential.py", "--output_dir", str(tmp_path), "--figure", str(tmp_path / "t.png"), expect=2)
    assert "are [2, 8], not [3, 8] for these examples: make them again: python analyze.py" in one_line_error(result)
    (folder / "score_arguments.json").write_text("{")  # truncated
    result = run("top_influential.py", "--output_dir", str(tmp_path), "--figure", str(tmp_path / "t.png"), expect=2)
    assert "cannot read the scores" in one_line_error(result)


@pytest.mark.parametrize("script", ["train.py", "analyze.py", "walkthrough.py"])
def test_ctrl_c_while_torch_loads_is_quiet(script):
    process = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / script), "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    # Signal once torch's library is being mapped in (the script is past its first lines and importing torch,
    # which takes seconds); a fixed delay could land before the interpreter even reached the script.
    maps, deadline, importing = Path(f"/proc/{process.pid}/maps"), time.monotonic() + 20, False
    while maps.exists() and not importing and time.monotonic() < deadline:
        importing = "libtorch" in maps.read_text()
        time.sleep(0.01)
    if not maps.exists():  # no /proc (not Linux), or it already finished
        time.sleep(0.4)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=30)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    # Caught importing torch, the script must end by the signal; without /proc it may have finished first.
    allowed = (-signal.SIGINT,) if importing else (-signal.SIGINT, 0)
    assert process.returncode in allowed, (process.returncode, err)


def test_every_script_sets_ctrl_c_before_anything_that_loads_torch():
    """The timed test above samples three scripts; this holds all of them: only `import signal` comes first."""
    scripts = [p for p in REPO_ROOT.glob("*.py") if p.name not in ("pipeline.py", "conftest.py")]
    for path in scripts:
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.Expr) and "signal.SIG_DFL" in ast.unparse(node):
                break
            if isinstance(node, ast.Import | ast.ImportFrom):
                assert ast.unparse(node) in ("import signal", "from __future__ import annotations"), (path.name, node)
        else:
            raise AssertionError(f"{path.name} never sets SIGINT's default action")


def test_the_full_scale_keeps_the_training_precision_it_began_with(tmp_path, monkeypatch):
    import walkthrough

    def plan(*flags):
        args = walkthrough.parse_args(["--scale", "full", "--out_dir", str(tmp_path), *flags])
        args.train_in_bf16 = walkthrough.training_precision(args, tmp_path / "logs")
        return {name: command for name, command, _ in walkthrough.steps(args)}

    assert "--use_half_precision" in plan("--train_precision", "bf16", "--dry_run")["train_clean"]
    assert not (tmp_path / "logs" / "train_precision.txt").exists()  # a dry run decides nothing
    steps = plan("--train_precision", "bf16")
    assert (tmp_path / "logs" / "train_precision.txt").read_text().startswith("bf16 (given by --train_precision)")
    assert all("--use_half_precision" in steps[name] for name in ("train_clean", "train_corrupt"))
    # EK-FAC detects in fp32 as the original; the cheaper strategies follow the training precision.
    assert "--use_half_precision" not in steps["detect_ekfac"]
    assert all("--use_half_precision" in steps[f"detect_{name}"] for name in ("identity", "diagonal", "kfac"))
    assert list(steps)[:2] == ["train_corrupt", "detect_ekfac"]  # the headline result first
    # A resumed run trains as it began, whatever --train_precision now says; --force decides again.
    assert "--use_half_precision" in plan("--train_precision", "fp32")["train_corrupt"]
    # --num_queries sizes the two analyze steps (and so what half_precision compares), nothing else.
    for name, command in plan("--num_queries", "500").items():
        sized = "--num_queries" in command and command[command.index("--num_queries") + 1] == "500"
        assert sized == name.startswith("analyze_"), name
    # bf16 at full size on every machine (where bf16 has no units it is emulated at about the fp32 speed).
    names = list(plan())
    assert names[names.index("analyze_ekfac") + 1 :][:2] == ["analyze_ekfac_bf16", "half_precision"], names
    assert not any(name.startswith("half_check") for name in names)
    assert "--num_train" not in plan()["analyze_ekfac_bf16"] and "--use_half_precision" in plan()["analyze_ekfac_bf16"]
    in_fp32 = plan("--train_precision", "fp32", "--force")
    assert not any("--use_half_precision" in in_fp32[name] for name in ("train_corrupt", "detect_kfac"))
    assert (tmp_path / "logs" / "train_precision.txt").read_text().startswith("fp32")
    (tmp_path / "logs" / "train_precision.txt").write_text("")  # emptied: decided again, as if absent
    assert "--use_half_precision" in plan("--train_precision", "bf16")["train_corrupt"]


def test_a_step_resumed_in_a_later_run_keeps_its_earlier_time_and_output(tmp_path):
    import walkthrough

    command = [sys.executable, "-c", "print('second part')"]
    shown = walkthrough.shown_command(command, {})
    (tmp_path / "step.log").write_text(f"$ {shown}\nfirst part\n")
    (tmp_path / "step.spent").write_text(f"100.0 3.50\n{shown}\n")  # what a stopped run left
    seconds, peak = walkthrough.run_step("step", command, {}, tmp_path, shown)
    assert seconds >= 100.0 and peak == 3.5
    assert (tmp_path / "step.log").read_text().count(f"$ {shown}") == 2  # both parts' output, one after the other
    assert "first part" in (tmp_path / "step.log").read_text() and "second part" in (tmp_path / "step.log").read_text()
    assert not (tmp_path / "step.spent").exists()
    assert walkthrough.finished_before(tmp_path / "step.done", shown)[0] >= 100.0
    # A stopped run of another command leaves nothing this one adds.
    (tmp_path / "other.spent").write_text("50.0 1.00\npython other.py\n")
    assert walkthrough.recorded(tmp_path / "other.spent", shown) is None


KILLED_STEP = """
import sys, time
from pathlib import Path
started = Path(sys.argv[1])
print("second part" if started.exists() else "first part", flush=True)
if not started.exists():
    started.write_text("")
    time.sleep(60)
"""


def test_a_walkthrough_killed_without_warning_leaves_the_steps_time_and_output_to_the_next_run(tmp_path):
    import walkthrough

    (tmp_path / "step.py").write_text(KILLED_STEP)
    command = [sys.executable, str(tmp_path / "step.py"), str(tmp_path / "started")]
    shown = walkthrough.shown_command(command, {})
    parent = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        import walkthrough
        walkthrough.SPENT_INTERVAL = 0.2
        walkthrough.run_step("step", {command!r}, {{}}, Path({str(tmp_path)!r}), {shown!r})
        """)
    # Its own process group, so that SIGKILL takes the step with it, as the end of a machine's session does.
    process = subprocess.Popen([sys.executable, "-c", parent], cwd=REPO_ROOT, start_new_session=True)
    spent, deadline = tmp_path / "step.spent", time.monotonic() + 30
    while (walkthrough.recorded(spent, shown) or (0.0,))[0] < 0.5 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    killed_seconds = walkthrough.recorded(spent, shown)[0]
    assert killed_seconds >= 0.5
    seconds, _ = walkthrough.run_step("step", command, {}, tmp_path, shown)
    log = (tmp_path / "step.log").read_text()
    assert log == f"$ {shown}\nfirst part\n$ {shown}\nsecond part\n"  # the killed part's output is kept
    assert seconds >= killed_seconds and walkthrough.finished_before(tmp_path / "step.done", shown)[0] == pytest.approx(
        seconds, abs=0.1
    )
    assert not spent.exists()
