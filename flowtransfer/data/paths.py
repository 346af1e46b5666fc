"""Where real data lives: ``$FLOWTRANSFER_DATA`` or ``../shared/data`` beside the repository checkout."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["shared_data_dir", "require_data", "ENV_VAR"]

#: environment variable that overrides the data folder
ENV_VAR = "FLOWTRANSFER_DATA"

_REPO = Path(__file__).resolve().parents[2]


def shared_data_dir() -> Path:
    """The real-data folder: ``$FLOWTRANSFER_DATA`` when set, else ``<checkout>/../shared/data``.

    The folder may not exist; use :func:`require_data` before reading from it.
    """
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else _REPO.parent / "shared" / "data"


def require_data(path: str | os.PathLike, what: str = "data") -> Path:
    """Return ``path`` as a ``Path`` if it exists, else raise ``FileNotFoundError`` saying what is missing.

    ``what`` names the data in the message (e.g. ``"the MOSI pickle"``).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(
            f"{what} not found at {p}; pass its path explicitly or set ${ENV_VAR} to the folder "
            f"holding the real data (default: {shared_data_dir()})"
        )
    return p
