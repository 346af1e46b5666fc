"""What a finished ``run`` leaves for a person to read: ``references.json`` and ``report.md``.

(Being written; :func:`finish_run` is the hook :func:`flowtransfer.experiment.run_experiment` calls.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["finish_run"]


def finish_run(out: Path, cfg: Any, splits: Mapping[str, Any], rows: Sequence[dict[str, Any]],
               trained: Mapping[str, Any], log: Callable[[str], None] = print) -> None:
    """Write the run's references and report into ``out`` (called once, on the main process)."""
    return None
