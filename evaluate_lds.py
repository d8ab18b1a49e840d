"""Do the scores predict retraining? The linear datamodeling score (LDS) of every strategy (math: example/lds.py).

Draws M random subsets of alpha * N of the first N training images (from --seed), trains K models on each from
scratch with train.py's recipe (example/training.py, the same code), and records each model's margin on the first Q test
images; trains the model on all N the same way and scores it with every --factor_strategy and --damping_factor
through the engine; then LDS(q) = Spearman over the subsets of (sum of the scores of the subset's examples) against the
measured margin (mean over seeds), reported as the mean over queries with a 95% bootstrap interval, beside random
scores (about 0) and, with K >= 2, the agreement of two seeds' margins (what retraining noise leaves to explain).

Tiny check (minutes on a CPU):
    python evaluate_lds.py --dataset_dir ./data --output_dir ./lds_results/tiny --num_train 64 --num_queries 8 \
        --num_subsets 6 --seeds_per_subset 2 --train_batch_size 32 --num_train_epochs 2
CPU scale (docs/lds.md says why these sizes; about an hour on 2 cores with two processes):
    torchrun --nproc_per_node=2 evaluate_lds.py --dataset_dir ./data --output_dir ./lds_results/cpu \
        --num_train 500 --num_queries 100 --num_subsets 30 --seeds_per_subset 2 \
        --train_batch_size 32 --num_train_epochs 20 --damping_factor 1e-8 heuristic --profile
GPU scale (the original recipe on 25,000-image halves of all 50,000, 100 subsets; one process per GPU):
    python evaluate_lds.py --dataset_dir ./data --output_dir ./lds_results/gpu --num_subsets 100 \
        --seeds_per_subset 2 --num_queries 2000 --use_channels_last --damping_factor 1e-8 heuristic --profile

Files in --output_dir, readable on their own: masks.safetensors ("masks", bool [M, N], the settings in its
metadata), margins.safetensors ("margins", float32 [M, K, Q]), lds.json and lds.md (the table), lds.png (the
figure), model_full.safetensors (the model scored), influence_results/ (the engine's factors and scores) and
units/ (one margins file per finished model). A rerun trains only the models not finished; a model stopped by
SIGTERM or SIGINT resumes from its training state (units/*.partial.safetensors, saved at the end of the step in
progress and every --save_interval seconds). Under torchrun every process trains whole models, one thread each
on a CPU, with the results of one process.
"""

from __future__ import annotations

import signal

# Ctrl-C while torch loads (a few seconds) ends the script quietly; run_cli handles it from then on.
signal.signal(signal.SIGINT, signal.SIG_DFL)

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from example import lds
from example.checkpoints import load_model, save_model
from example.errors import PipelineError
from example.figures import save_figure, subplots
from example.flags import (
    POSITIVE_INT,
    add_damping_flag,
    add_data_flags,
    add_eval_batch_flag,
    add_figure_flag,
    add_fisher_flags,
    add_influence_batch_flag,
    add_num_queries_flag,
    add_num_train_flag,
    add_process_flags,
    add_profile_flag,
    add_query_batch_flag,
    add_strategy_flag,
    folder,
    influence_batch_size,
)
from example.hardware import keep_freed_memory
from example.results import check_shape, data_fingerprint, made_from, make_analyzer
from example.run import ArgumentParser, is_main, run_cli, start_processes
from example.task import evaluate as evaluate_model
from example.task import label_margins
from example.training import add_recipe_flags, recipe_of, train_model
from influence import (
    DEFAULT_DAMPING,
    IDENTITY,
    STRATEGY_LABELS,
    FactorArguments,
    Group,
    ScoreArguments,
    balanced_owners,
    first_difference,
    partial_path,
    read_safetensors,
    save_tensors,
    write_atomically,
)
from pipeline import CifarData, TensorBatches, get_cifar10

REDO = "delete it to redo it"  # what to do about a file of this script's that cannot be read
REMAKE_FULL_MODEL = "delete it and run evaluate_lds.py again, which trains it again"  # model_full.safetensors


def parse_args(argv=None):
    examples = __doc__.split("\n\n", 2)[2].split("\n\nFiles in")[0]  # the commands of the docstring, each
    examples = re.sub(r"(?<=\S) {2,}", " ", examples)  # on one line (its continuation lines joined)
    parser = ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=examples + "\n\nFiles, sizes and costs: docs/lds.md",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_data_flags(parser)
    parser.add_argument(
        "--output_dir", type=folder, default="./lds_results", help="where every file goes (default ./lds_results)"
    )
    sizes = parser.add_argument_group("retrainings")
    add_num_train_flag(sizes)
    add_num_queries_flag(sizes)
    sizes.add_argument("--alpha", type=float, default=0.5, help="each subset holds round(alpha * N) (default 0.5)")
    sizes.add_argument("--num_subsets", type=POSITIVE_INT, default=100, help="M random subsets (default 100)")
    sizes.add_argument("--seeds_per_subset", type=POSITIVE_INT, default=2, help="K models per subset (default 2)")
    add_eval_batch_flag(sizes)
    add_recipe_flags(
        parser,
        seeds="the full model's initial weights, batch order and augmentation, the subsets, retraining (j, k)'s "
        "seed (drawn from seed, j and k) and the random scores",
        saves="a model's training state and an influence pass's partial results, from which a stopped run resumes",
    )
    scores = parser.add_argument_group("scores")
    add_strategy_flag(scores, several=True)
    add_damping_flag(scores, several=True)
    add_fisher_flags(scores)
    add_query_batch_flag(scores)
    add_influence_batch_flag(scores)
    add_figure_flag(parser, None, "the figure (default <output_dir>/lds.png)")
    add_profile_flag(parser)
    add_process_flags(parser)
    args = parser.parse_args(argv)
    if args.num_subsets < 3:
        parser.error(f"--num_subsets must be at least 3 for a rank correlation, got {args.num_subsets}")
    if not 0 < args.alpha < 1:
        parser.error(f"--alpha must be between 0 and 1, got {args.alpha}")
    args.factor_strategy = list(dict.fromkeys(args.factor_strategy))
    args.damping_factor = list(dict.fromkeys(args.damping_factor))
    return args


# ---- Files ----


def load(path: Path, key: str) -> tuple[torch.Tensor, dict]:
    """A tensor and the JSON metadata of a file written by save_tensors(); unreadable: a one-line error."""
    tensors, meta = read_safetensors(path, fix=REDO)
    if key not in tensors:
        raise PipelineError(f"cannot read {path} (it holds no {key!r}): {REDO}")
    return tensors[key], meta


def settings_of(args: argparse.Namespace, train: CifarData, queries: CifarData) -> dict:
    """What makes the retrainings: files made with other settings, or from other images or labels, are never
    mixed in."""
    return {
        "num_train": len(train),
        "num_queries": len(queries),
        "data_sha256": data_fingerprint(train.images, train.labels),
        "queries_sha256": data_fingerprint(queries.images, queries.labels),
        "alpha": args.alpha,
        "num_subsets": args.num_subsets,
        "seeds_per_subset": args.seeds_per_subset,
        "recipe": recipe_of(args),
        "unit_seeds": "SeedSequence([seed, j, k])",  # how unit_seed derives them
    }


def masks_for(out: Path, settings: dict, seed: int) -> torch.Tensor:
    """The subsets, drawn once and saved first (rank 0); a folder holding another run's is refused."""
    path = out / "masks.safetensors"
    made = [*out.glob("model_full*.safetensors"), *out.glob("units/*.safetensors")]
    if not path.exists() and made:  # models whose subsets and settings nothing records: never mixed in
        raise PipelineError(
            f"{out} holds retrained models but no masks.safetensors saying which settings made them: "
            "choose another --output_dir, or delete it to start over"
        )
    if path.exists():
        masks, meta = load(path, "masks")
        difference = first_difference(meta.get("settings", {}), settings)
        if difference and difference[0] == "unit_seeds":
            raise PipelineError(
                f"{out} holds retrainings seeded seed + 1 + j * K + k, whose consecutive seeds share most epochs' "
                "batches: choose another --output_dir, or delete it to start over"
            )
        if difference:
            key, old, new = difference
            raise PipelineError(
                f"{out} holds retrainings with {key}={old!r}, now {key}={new!r}: "
                "choose another --output_dir, or delete it to start over"
            )
        return masks
    masks = lds.draw_masks(settings["num_subsets"], settings["num_train"], settings["alpha"], seed)
    save_tensors(path, {"masks": masks}, {"settings": settings})
    return masks


# ---- Units: one model each ----


def unit_path(out: Path, unit: tuple[int, int] | None) -> Path:
    """A unit's finished file: model_full.safetensors for the model on all N (unit None), the query margins
    units/margins_{j}_{k}.safetensors for subset j, seed k; its training state is beside it (partial_path)."""
    if unit is None:
        return out / "model_full.safetensors"
    return out / "units" / f"margins_{unit[0]:04d}_{unit[1]:02d}.safetensors"


@torch.no_grad()
def query_margins(model: torch.nn.Module, queries: CifarData, batch_size: int) -> torch.Tensor:
    """float32 [Q]: each query's margin (example.task.label_margins, the measurement analyze.py scores, summed and
    negated there), in eval mode."""
    model.eval()
    return torch.cat([label_margins(model(x).float(), y) for x, y in TensorBatches(queries, batch_size)]).cpu()


def unit_seed(seed: int, j: int, k: int) -> int:
    """Retraining (j, k)'s seed, drawn from (seed, j, k). Not seed + 1 + j * K + k: a run seeds each epoch's order
    and augmentation with its seed + epoch (pipeline.TensorBatches), so consecutive seeds would share all epochs
    but one, a seed's epoch e being the next seed's epoch e - 1, and the seeds' agreement would be overstated."""
    state = np.random.SeedSequence([seed, j, k]).generate_state(1, dtype=np.uint64)[0]
    return int(state % 2**62)  # seed + epoch stays below 2**63, the bound the seed flags keep to


def train_unit(args, out: Path, unit, train: CifarData, masks, queries: CifarData, device) -> float:
    """Train one model, save its margins (or, for the full model, its weights); the seconds it took."""
    if unit is None:
        data, seed = train, args.seed
    else:
        j, k = unit
        index = masks[j].nonzero().flatten().to(train.labels.device)
        data = CifarData(train.images[index], train.labels[index], train.clean_labels[index], "train")
        seed = unit_seed(args.seed, j, k)
    state = partial_path(unit_path(out, unit))
    state.parent.mkdir(parents=True, exist_ok=True)
    model, seconds = train_model(args, data, device, state, seed=seed, verbose=False)
    if unit is None:
        save_model(model, unit_path(out, None))
    else:
        margins = query_margins(model, queries, args.eval_batch_size)
        accuracy = evaluate_model(model, TensorBatches(queries, args.eval_batch_size))[1]
        save_tensors(
            unit_path(out, unit), {"margins": margins}, {"seed": seed, "seconds": seconds, "accuracy": accuracy}
        )
    state.unlink(missing_ok=True)
    return seconds


def retrain(args, out: Path, train: CifarData, masks, queries: CifarData, device, group: Group) -> None:
    world, rank = group.world, group.rank
    units = [None] + [(j, k) for j in range(args.num_subsets) for k in range(args.seeds_per_subset)]
    done = [unit_path(out, unit).exists() for unit in units]
    done = group.share(done)  # rank 0's view of the finished units, so that every rank splits the same list
    remaining = [u for u, finished in zip(units, done, strict=True) if not finished]
    if is_main():
        print(
            f"models: {sum(done)} of {len(units)} done, {len(remaining)} to train "
            f"({'the full model and ' if None in remaining else ''}{len(remaining) - (None in remaining)} retrainings "
            f"of {len(masks[0].nonzero())} images; {world} process{'es' if world > 1 else ''})",
            flush=True,
        )
    # Each unit to the least loaded rank; the full model counts 1 / alpha, a retraining 1.
    owners = balanced_owners([1.0 if unit is not None else 1.0 / args.alpha for unit in remaining], world)
    mine = [unit for unit, owner in zip(remaining, owners, strict=True) if owner == rank]
    seconds = []
    for unit in tqdm(mine, desc="models", disable=not is_main() or not mine):
        took = train_unit(args, out, unit, train, masks, queries, device)
        if unit is not None:
            seconds.append(took)
    if seconds:  # every rank says, so that a slow process shows
        print(f"rank {rank}: {len(seconds)} retrainings, {np.mean(seconds):.1f} s per model", flush=True)
    group.barrier()  # every model is trained before the scores and the LDS


# ---- Scores ----


def damping_name(damping: float | None) -> str:
    if damping is None:
        return "heuristic"
    return f"{damping:g}"


def compute_scores(args, out: Path, train_eval: CifarData, queries: CifarData, device) -> dict:
    """{(strategy, damping name): scores [Q, N]} of the full model, through the engine (saved and reused)."""
    model = load_model(unit_path(out, None), device, remake=REMAKE_FULL_MODEL)
    analyzer = make_analyzer("lds", model, args, output_dir=out / "influence_results")
    train_batches = TensorBatches(train_eval, influence_batch_size(args, device))
    query_batches = TensorBatches(queries, min(args.query_batch_size, len(queries)))
    # Saved factors and scores are reused only for this model and data (the engine checks these facts).
    info = made_from(unit_path(out, None), train_eval, num_queries=len(queries))
    info["queries_sha256"] = data_fingerprint(queries.images, queries.labels)
    found = {}
    for strategy in args.factor_strategy:
        factor_args = FactorArguments(
            strategy=strategy, use_empirical_fisher=args.use_empirical_fisher, seed=args.fisher_seed, info=info
        )
        analyzer.fit_all_factors(strategy, train_batches, factor_args)
        for damping in args.damping_factor:
            name = strategy if damping == DEFAULT_DAMPING else f"{strategy}_damping_{damping_name(damping)}"
            score_args = ScoreArguments(damping_factor=damping, info=info)
            result = analyzer.compute_pairwise_scores(
                name, strategy, query_batches, train_batches, score_args, query_slice_size=train_batches.batch_size
            )
            folder = analyzer.scores_folder(name)
            check_shape(result["all_modules"], (len(queries), len(train_eval)), folder, f"delete {folder} to redo them")
            found[(strategy, damping_name(damping))] = result["all_modules"].float().cpu()
    if args.profile and is_main():
        print(analyzer.profiler.table())
    return found


# ---- The score ----


def lds_rows(args, masks: torch.Tensor, margins: torch.Tensor, scores: dict) -> list[dict]:
    """One row per (strategy, damping) and per reference. With identity among the strategies, each strategy's
    row also holds its paired difference from identity at the same damping (`vs_identity`)."""
    per_query = {
        key: lds.lds_per_query(lds.predicted_margins(values, masks), margins) for key, values in scores.items()
    }
    rows = []
    for (strategy, damping), values in per_query.items():
        row = {"scores": strategy, "damping": damping, **lds.summarize(values)}
        identity = per_query.get((IDENTITY.name, damping))
        if strategy != IDENTITY.name and identity is not None:
            row["vs_identity"] = lds.paired_difference(values, identity)
        rows.append(row)
    num_queries, num_train = margins.shape[2], masks.shape[1]
    random = lds.lds_per_query(
        lds.predicted_margins(lds.random_scores(num_queries, num_train, args.seed), masks), margins
    )
    rows.append({"scores": "random", "damping": None, **lds.summarize(random)})
    if margins.shape[1] >= 2:
        rows.append({"scores": "seed agreement", "damping": None, **lds.summarize(lds.seed_agreement(margins))})
    return rows


def per_query_of(row: dict) -> np.ndarray:
    """A row's LDS per query as an array, NaN where it was left out (None in the JSON)."""
    return np.array([np.nan if value is None else value for value in row["per_query"]])


def table(rows: list[dict]) -> str:
    paired = any("vs_identity" in row for row in rows)
    extra = " minus identity (paired, 95%) |" if paired else ""
    lines = [
        f"| scores | damping | LDS | 95% interval | queries used (left out) |{extra}",
        "| --- | --- | --- | --- | --- |" + (" --- |" if paired else ""),
    ]
    for row in rows:
        low, high = row["interval_95"]
        damping = row["damping"] if row["damping"] is not None else "-"
        line = (
            f"| {row['scores']} | {damping} | {row['mean']:.3f} | [{low:.3f}, {high:.3f}] | "
            f"{row['queries_used']} ({row['queries_left_out']}) |"
        )
        if paired and "vs_identity" in row:
            versus = row["vs_identity"]
            line += f" {versus['mean']:+.3f} [{versus['interval_95'][0]:+.3f}, {versus['interval_95'][1]:+.3f}] |"
        elif paired:
            line += " |"
        lines.append(line)
    return "\n".join(lines)


def labels_of(rows: list[dict]) -> list[str]:
    """Rows as the figures name them: "EK-FAC, damping 1e-08", "random", "seed agreement"."""
    return [
        f"{STRATEGY_LABELS[row['scores']]}, damping {row['damping']}" if row["damping"] is not None else row["scores"]
        for row in rows
    ]


def draw(path: str | Path, rows: list[dict], masks, margins, scores: dict) -> None:
    paired = [
        (label, row["vs_identity"]) for label, row in zip(labels_of(rows), rows, strict=True) if "vs_identity" in row
    ]
    fig, axes = subplots(1, 3 if paired else 2, figsize=(17 if paired else 12, 4.5), squeeze=False)
    left, right = axes[0][0], axes[0][-1]
    if paired:  # the strongest evidence: each strategy minus identity on the same queries and retrainings
        middle = axes[0][1]
        means = np.array([versus["mean"] for _, versus in paired])
        low, high = (np.array([versus["interval_95"][i] for _, versus in paired]) for i in (0, 1))
        middle.barh(range(len(paired)), means, xerr=[means - low, high - means], color="tab:green", capsize=3)
        middle.set_yticks(range(len(paired)), [label for label, _ in paired], fontsize=8)
        middle.invert_yaxis()
        middle.axvline(0, color="black", linewidth=0.8)
        middle.set_xlabel("LDS minus identity's, paired over queries (95% bootstrap interval)")
        middle.set_title("each strategy against identity at the same damping")
    # Horizontal bars, first row on top: the labels (strategy, damping) stay readable however many rows there are.
    labels = labels_of(rows)
    means = np.array([row["mean"] for row in rows])
    errors = np.array([[row["mean"] - row["interval_95"][0], row["interval_95"][1] - row["mean"]] for row in rows]).T
    colors = ["tab:blue" if row["damping"] is not None else "tab:gray" for row in rows]
    left.barh(range(len(rows)), means, xerr=errors, color=colors, capsize=3)
    left.set_yticks(range(len(rows)), labels, fontsize=8)
    left.invert_yaxis()
    left.axvline(0, color="black", linewidth=0.8)
    left.set_xlabel("LDS (mean over queries, 95% bootstrap interval; gray: references)")
    left.set_title(f"M={masks.shape[0]} subsets of {int(masks[0].sum())}, K={margins.shape[1]}, Q={margins.shape[2]}")

    best = max((row for row in rows if row["damping"] is not None), key=lambda row: row["mean"])
    per_query = per_query_of(best)
    finite = np.flatnonzero(np.isfinite(per_query))
    query = int(finite[np.argsort(per_query[finite])[len(finite) // 2]]) if len(finite) else 0  # the median query
    predicted = lds.predicted_margins(scores[(best["scores"], best["damping"])], masks)[:, query].numpy()
    measured = margins[:, :, query].double().mean(dim=1).numpy()
    right.scatter(predicted, measured, s=14)
    name = STRATEGY_LABELS[best["scores"]]
    right.set_xlabel(f"predicted effect: sum of {name} scores over the subset")
    right.set_ylabel("measured margin (mean over seeds)")
    right.set_title(f"test image {query}: LDS {per_query[query]:.2f} (median query of {name})", fontsize=9)
    fig.suptitle(
        f"ResNet-9 retrained on halves of {masks.shape[1]:,} CIFAR-10 training images: how well each strategy's "
        f"scores predict the margins of {margins.shape[2]} test images (LDS)",
        fontsize=10,
    )
    save_figure(fig, path)


def main() -> None:
    args = parse_args()
    keep_freed_memory()
    device = start_processes(args.dist_timeout)
    group = Group(device)
    if group.world > 1 and device.type == "cpu":
        torch.set_num_threads(1)  # every process trains whole models: one thread each
    out = Path(args.output_dir)
    train = get_cifar10(args.dataset_dir, "train", num_train=args.num_train, device=device)
    train_eval = get_cifar10(args.dataset_dir, "eval_train", num_train=args.num_train, device=device)
    queries = get_cifar10(args.dataset_dir, "valid", device=device).subset(args.num_queries, "--num_queries")
    if lds.subset_size(len(train), args.alpha) < 1:
        raise PipelineError(f"--alpha {args.alpha} of {len(train)} images leaves the subsets empty")
    settings = settings_of(args, train, queries)
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
        masks_for(out, settings, args.seed)
    group.barrier()
    masks, _ = load(out / "masks.safetensors", "masks")

    began = time.monotonic()
    retrain(args, out, train, masks, queries, device, group)
    units = [(j, k) for j in range(args.num_subsets) for k in range(args.seeds_per_subset)]
    loaded = [load(unit_path(out, unit), "margins") for unit in units]
    margins = torch.stack([unit_margins for unit_margins, _ in loaded])
    margins = margins.view(args.num_subsets, args.seeds_per_subset, len(queries))
    facts = [fact for _, fact in loaded]
    seconds = [fact.get("seconds", float("nan")) for fact in facts]
    accuracy = float(np.mean([fact.get("accuracy", float("nan")) for fact in facts]))
    if is_main():
        save_tensors(out / "margins.safetensors", {"margins": margins}, {"settings": settings})
        print(
            f"retrained models: accuracy {accuracy:.3f} on the queries (mean over models), {np.mean(seconds):.1f} s "
            "per model",
            flush=True,
        )

    scores = compute_scores(args, out, train_eval, queries, device)
    if not is_main():
        return
    full_model = load_model(unit_path(out, None), device, remake=REMAKE_FULL_MODEL)
    full = evaluate_model(full_model, TensorBatches(queries, args.eval_batch_size))[1]
    print(f"full model: accuracy {full:.3f} on the queries")
    rows = lds_rows(args, masks, margins, scores)
    text = table(rows)
    print(text)
    summary = {
        **settings,
        "seed": args.seed,
        "results": rows,
        "query_accuracy": {"full_model": full, "retrained_models": accuracy},
        "seconds_per_retrained_model": float(np.mean(seconds)),
        "seconds_this_run": time.monotonic() - began,
    }
    write_atomically(out / "lds.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=1) + "\n"))
    write_atomically(out / "lds.md", lambda tmp: tmp.write_text(text + "\n"))
    figure = args.figure or out / "lds.png"
    draw(figure, rows, masks, margins, scores)
    print(f"saved {out / 'lds.json'}, {out / 'lds.md'} and {figure}")


if __name__ == "__main__":
    run_cli(main)
