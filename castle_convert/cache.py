"""Where castle-convert keeps what it makes on first use (built-in teachers, the natural-image set):
``CASTLE_CACHE``, default ``~/.cache/castle_convert``. Imports nothing of castle_convert."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("CASTLE_CACHE", Path.home() / ".cache" / "castle_convert"))
