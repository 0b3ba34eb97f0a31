"""Read a JSON file the user named, with an error that names the file and what is wrong with it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from shared.errors import FedSegError


def read_json(path: Path | str, *, error: type[FedSegError], context: str = "",
              missing: str = "does not exist") -> Any:
    """The JSON value held in ``path``.

    Parameters
    ----------
    path
        The file (``~`` is not expanded: callers expand where users may type it).
    error
        The :class:`~shared.errors.FedSegError` raised when the file is missing or not readable JSON.
    context
        What the file is for, put before the path (e.g. ``"run config key 'plan': "``).
    missing
        What the message says after the path when the file does not exist.

    Raises
    ------
    FedSegError
        ``error``: ``{context}{path} {missing}``, or ``{context}{path} is not readable JSON (why)``.
    """
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise error(f"{context}{path} {missing}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{context}{path} is not readable JSON ({exc})") from None
