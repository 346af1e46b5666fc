"""The one training engine every method uses: trainer, evaluation, results, seeding, DDP.

Example::

    from flowtransfer.training import Trainer, TrainConfig, evaluate, result_row, write_results

    result = Trainer(method, TrainConfig(epochs=20, monitor="mae")).fit(train_ds, valid_ds)
    row = result_row("dicmor", "mosi", "mr=0.3", seed, evaluate(method, test_ds),
                     train_seconds=result.train_seconds)
    write_results([row], "out")
"""

from __future__ import annotations

from flowtransfer.training.distributed import (
    DistributedContext,
    cleanup_distributed,
    current_context,
    init_distributed,
    is_main_process,
)
from flowtransfer.training.evaluation import (
    NonFinitePredictionError,
    evaluate,
    evaluate_loss,
    predict_dataset,
)
from flowtransfer.training.results import (
    format_table,
    read_results,
    result_row,
    summarise,
    write_results,
)
from flowtransfer.training.seeding import derive_seed, make_generator, seed_everything
from flowtransfer.training.trainer import (
    STOP_REASONS,
    FitResult,
    Trainer,
    TrainConfig,
    build_optimizer,
    load_checkpoint,
)

__all__ = [
    "Trainer",
    "TrainConfig",
    "FitResult",
    "STOP_REASONS",
    "load_checkpoint",
    "build_optimizer",
    "predict_dataset",
    "evaluate",
    "evaluate_loss",
    "NonFinitePredictionError",
    "result_row",
    "write_results",
    "read_results",
    "summarise",
    "format_table",
    "seed_everything",
    "make_generator",
    "derive_seed",
    "DistributedContext",
    "init_distributed",
    "current_context",
    "is_main_process",
    "cleanup_distributed",
]
