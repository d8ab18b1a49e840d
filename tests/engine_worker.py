"""One process of the engine's multi-process and interruption tests (tests/engine/test_distributed.py), started
by tests.helpers.launch from the repository root, as a module so that it imports the engine and `tests`:

    RANK=.. WORLD_SIZE=.. MASTER_ADDR=127.0.0.1 MASTER_PORT=.. python -m tests.engine_worker OUT '{"...": ...}'

Fits factors and computes pairwise and self scores for every case of CASES on a tiny float64 CNN, with the
scripts' own process set-up (example.run.start_processes) and error handling (example.run.run_cli). Rank 0's
engine writes the results under OUT/<case>/; every rank also writes the scores the engine returned to it as
OUT/returned_rank<r>_<case>.safetensors, so the test can check that every rank can read the results.

Options (JSON): "cases" (names, default all), "max_elements" (chunk bound), "save_interval" (seconds),
"kill": [k, b] (SIGKILL this process when the k-th pass over the training data of this run reaches batch b),
"term": [k, b, r] (SIGTERM rank r at the same point: the engine stops at the end of the round and saves),
"fail_rank": r (that rank raises in its first training batch), "timeout" (seconds, the process group's),
"analysis": one analysis name for every case (default: each case its own; the cases' factors and scores are
then named after the case, so that K-FAC and EK-FAC cases of the same Fisher share their eigenbasis),
"device": the processes' device, and so the backend ("cpu": gloo, the default, so that the CPU tests stay on the
CPU on a GPU host; "cuda": nccl, one GPU per rank), "model_device": where the model and data live (default: the
processes' device; "cpu" under "cuda" is a CPU model in an nccl job).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from example.run import run_cli, start_processes
from influence import Analyzer, FactorArguments, ScoreArguments
from influence.storage import save_tensors
from tests.reference import TinyTask, batches, make_model

NUM_TRAIN = 31  # divisible neither by the batch sizes below nor by 2 or 3 processes


def cases() -> dict[str, dict]:
    """Every strategy, true and empirical Fisher, batches of 7 (5 batches); ekfac also in batches of 16 (2 batches,
    fewer than 3 processes)."""
    found = {}
    for strategy in ("identity", "diagonal", "kfac", "ekfac"):
        for empirical in (False, True):
            fisher = "empirical" if empirical else "true"
            found[f"{strategy}_{fisher}_b7"] = {"strategy": strategy, "empirical": empirical, "batch": 7}
    found["ekfac_true_b16"] = {"strategy": "ekfac", "empirical": False, "batch": 16}
    return found


class SamplingTask(TinyTask):
    """TinyTask whose true-Fisher labels are drawn with torch.multinomial from the global RNG, as a real task's."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.fail = fail

    def compute_train_loss(self, batch, model, sample=False):
        if self.fail:
            raise ValueError("injected failure")
        x, y = batch
        logits = model(x)
        if sample:
            y = torch.multinomial(logits.detach().softmax(-1), 1).flatten()
        return F.cross_entropy(logits, y, reduction="sum")


class KillingData:
    """Re-iterable batches that send `signum` to the process at batch `at[1]` of the `at[0]`-th pass (from 1)."""

    def __init__(self, items, at=None, signum=signal.SIGKILL):
        self.items, self.at, self.passes, self.signum = items, at, 0, signum

    def __len__(self):
        return len(self.items)

    def __iter__(self):
        self.passes += 1
        for index, item in enumerate(self.items):
            if self.at is not None and [self.passes, index] == list(self.at):
                sys.stdout.flush()
                os.kill(os.getpid(), self.signum)
            yield item


def run(out: Path, options: dict) -> None:
    """Every case of `options`, saved under out/<case> (by rank 0) and out/returned_rank<r>_<case>.safetensors."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    device = torch.device(options.get("model_device") or options.get("device", "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    model, x, y = make_model("cnn")
    model, x, y = model.to(device), x[:NUM_TRAIN].to(device), y[:NUM_TRAIN].to(device)
    queries = batches(x[:5] + 0.1, y[:5], 3)
    task = SamplingTask(fail=options.get("fail_rank") == rank)
    shared = options.get("analysis")
    for name in options.get("cases") or list(cases()):
        case = cases()[name]
        factors, pairwise_name, self_name = (
            (name, f"pairwise_{name}", f"self_{name}") if shared else (case["strategy"], "pairwise", "self")
        )
        term = options.get("term")
        if term is not None and term[2] == rank:
            train = KillingData(batches(x, y, case["batch"]), term[:2], signal.SIGTERM)
        else:
            train = KillingData(batches(x, y, case["batch"]), options.get("kill"))
        analyzer = Analyzer(
            shared or name,
            model,
            task,
            output_dir=out,
            disable_tqdm=True,
            save_interval=options.get("save_interval", 120.0),
            max_elements=options.get("max_elements"),
        )
        factor_args = FactorArguments(strategy=case["strategy"], use_empirical_fisher=case["empirical"], seed=3)
        analyzer.fit_all_factors(factors, train, factor_args)
        score_args = ScoreArguments(damping_factor=None, per_module=True)
        pairwise = analyzer.compute_pairwise_scores(pairwise_name, factors, queries, train, score_args)
        own = analyzer.compute_self_scores(self_name, factors, train, score_args)
        returned = {f"pairwise/{k}": v for k, v in pairwise.items()} | {f"self/{k}": v for k, v in own.items()}
        save_tensors(out / f"returned_rank{rank}_{name}.safetensors", returned)


def main() -> None:
    out, options = Path(sys.argv[1]), json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    start_processes(options.get("timeout", 60.0), options.get("device", "cpu"))
    run(out, options)


if __name__ == "__main__":
    run_cli(main)
