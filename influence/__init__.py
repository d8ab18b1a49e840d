"""Influence functions (training-data attribution) with EK-FAC, K-FAC, diagonal and identity curvature.

Everything a program built on the engine needs is importable from here (`from influence import Analyzer, ...`);
the submodules flops, products, stages, interrupt and distributed are importable as modules too. docs/engine.md
lists the API.
"""

from influence import distributed, flops, interrupt, products, stages
from influence.analyzer import DEFAULT_SAVE_INTERVAL, Analyzer, batch_seed, seeded_rngs
from influence.arguments import DEFAULT_DAMPING, FactorArguments, ScoreArguments
from influence.distributed import (
    Group,
    balanced_owners,
    control_group,
    forget_groups,
    publish_failure,
    remember_store,
    this_rank,
    world_size,
)
from influence.errors import InfluenceError, first_line
from influence.interrupt import Interrupted, handling
from influence.passes import Saver
from influence.profiler import synchronize
from influence.storage import (
    FACTOR_ARGUMENTS,
    PAIRWISE_SCORES,
    SCORE_ARGUMENTS,
    SELF_SCORES,
    Store,
    first_difference,
    load_partial,
    load_tensors,
    partial_path,
    read_json,
    read_safetensors,
    safetensors_size,
    save_partial,
    save_tensors,
    write_atomically,
)
from influence.strategies import (
    ALL_STRATEGIES,
    DEFAULT_STRATEGY,
    DIAGONAL,
    EKFAC,
    IDENTITY,
    KFAC,
    STRATEGIES,
    STRATEGY_LABELS,
    Strategy,
    get_strategy,
)
from influence.task import Task

__all__ = [
    # fitting and scoring
    "Analyzer",
    "FactorArguments",
    "ScoreArguments",
    "DEFAULT_DAMPING",
    "DEFAULT_SAVE_INTERVAL",
    "Task",
    "InfluenceError",
    "first_line",
    "batch_seed",
    "seeded_rngs",
    # strategies
    "STRATEGIES",
    "DEFAULT_STRATEGY",
    "STRATEGY_LABELS",
    "ALL_STRATEGIES",
    "Strategy",
    "get_strategy",
    "IDENTITY",
    "DIAGONAL",
    "KFAC",
    "EKFAC",
    # several processes
    "Group",
    "this_rank",
    "world_size",
    "balanced_owners",
    "control_group",
    "publish_failure",
    "remember_store",
    "forget_groups",
    "distributed",
    # stopping on SIGTERM and SIGINT, saving to resume
    "handling",
    "Saver",
    "Interrupted",
    "interrupt",
    # timing and FLOP counts
    "synchronize",
    "flops",
    "products",
    "stages",
    # results on disk
    "FACTOR_ARGUMENTS",
    "SCORE_ARGUMENTS",
    "PAIRWISE_SCORES",
    "SELF_SCORES",
    "Store",
    "load_tensors",
    "read_safetensors",
    "save_tensors",
    "read_json",
    "write_atomically",
    "safetensors_size",
    "first_difference",
    "partial_path",
    "save_partial",
    "load_partial",
]
