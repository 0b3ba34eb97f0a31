"""Write files so that readers only ever see the old or the new content, never half.

A temporary file beside the target is written, flushed, fsync'ed, then renamed
over the target (``os.replace`` is atomic on POSIX and Windows). Data that can
be rebuilt (caches) may skip the fsyncs (``durable=False``): the rename is still
atomic, but after a power loss the file may be missing or empty.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def atomic_write(path: Path | str, write: Callable[[IO[bytes]], None], *, mode: int = 0o600,
                 durable: bool = True) -> Path:
    """Call ``write(file)`` on a temporary file, then move it to ``path`` atomically.

    The file has permissions ``mode`` from its creation on (default 0600, owner
    only), so a private key is never readable by others, not even briefly.
    With ``durable`` (default) the file and its directory are fsync'ed, so the
    new content survives a power loss once this returns; without, the write
    costs no disk flush (each fsync is milliseconds, more on a busy disk).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            write(handle)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    if durable:
        _fsync_dir(target.parent)
    return target


def atomic_write_json(path: Path | str, data: Any) -> Path:
    """Write ``data`` as indented JSON, atomically."""
    payload = (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
    return atomic_write(path, lambda handle: handle.write(payload))


def append_line(path: Path | str, line: str) -> None:
    """Append one line and flush it to disk (for JSON-lines logs)."""
    append_lines(path, [line])


def append_lines(path: Path | str, lines: list[str]) -> None:
    """Append ``lines`` in one write and flush them to disk with one fsync."""
    payload = "".join(line.rstrip("\n") + "\n" for line in lines)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
