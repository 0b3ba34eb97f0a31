"""The one gate in front of every replacement of a Flower internal: version + source hashes.

Before any replacement of a process kind is made, every Flower function (or
module) it relies on is looked at: the installed ``flwr`` must be a version in
:data:`CHECKED_SOURCES` and each source's sha256 the one recorded for that
version. If any is not, NONE of that process's replacements is made: the
process runs stock Flower and logs one warning naming what is off.

Self-contained (standard library and Flower only, relative imports): the
SuperNode script, the warm ClientApp executor and the simulation launcher load
this package by file path under ``fedseg_flower_compat``, so that fedseg's own
``shared`` package is never imported outside the FAB Flower installs.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import inspect
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from logging import WARNING
from typing import Any

from .checked import CHECKED_SOURCES

PATCHED_FLWR_VERSION = "1.42.0"  # the pin in requirements.txt; CHECKED_SOURCES also holds 1.41.0 (still accepted)
PROCESSES = ("simulation-engine", "supernode", "clientapp-executor", "serverapp")
WARNING_PREFIX = "[fedseg] Flower compatibility:"
DEFAULT_KWARG = "initial_backoff"  # the one keyword default fedseg changes (kind "default")


@dataclass(frozen=True)
class Replacement:
    """One Flower internal that fedseg replaces at run time.

    Attributes
    ----------
    name : str
        Short unique name (the key of the value given to :func:`install`).
    process : str
        The process kind it is made in (one of :data:`PROCESSES`).
    target : str
        ``module:attribute.path`` of what is replaced (or added).
    kind : str
        ``replace`` (the value takes its place), ``wrap`` (the value is called
        with the current one and its result takes its place), ``add`` (an
        attribute Flower lacks) or ``default`` (the keyword default
        ``initial_backoff`` of the target function becomes the value).
    relies_on : tuple of str
        ``module:attribute.path`` (or a module) of every Flower source the
        replacement was checked against; their sha256 are the guard.
    replacement : str
        What takes its place (where it is written).
    reason : str
        Why it exists, as measured (BENCHMARKS.md).
    upstream : str
        The upstream Flower issue or pull request, if any.
    """

    name: str
    process: str
    target: str
    kind: str
    relies_on: tuple[str, ...]
    replacement: str
    reason: str
    upstream: str = ""


def resolve(path: str) -> Any:
    """The object at ``module:attribute.path`` (or the module ``module``)."""
    module_name, _, attributes = path.partition(":")
    found: Any = importlib.import_module(module_name)
    for attribute in filter(None, attributes.split(".")):
        found = getattr(found, attribute)
    return found


def source_hash(path: str) -> str:
    """sha256 of the source of the Flower object at ``path`` (the code a replacement was checked against)."""
    return hashlib.sha256(inspect.getsource(resolve(path)).encode()).hexdigest()


def installed_flwr_version() -> str:
    """The installed ``flwr`` distribution's version."""
    return importlib.metadata.version("flwr")


def mismatch(entries: tuple[Replacement, ...], *, version: str | None = None) -> str | None:
    """Why ``entries`` must not be applied to the installed Flower (None if every guard passes)."""
    version = installed_flwr_version() if version is None else version
    checked = CHECKED_SOURCES.get(version)
    if checked is None:
        return f"flwr {version} is installed; fedseg checked flwr {', '.join(sorted(CHECKED_SOURCES))}"
    changed = sorted({path for entry in entries for path in entry.relies_on if source_hash(path) != checked[path]})
    if changed:
        return f"flwr {version}'s {', '.join(changed)} is not the code fedseg checked"
    present = [entry.target for entry in entries if entry.kind == "add" and _exists(entry.target)]
    if present:
        return f"flwr {version} already has {', '.join(present)}"
    return None


def split_target(path: str) -> tuple[str, str]:
    """``module:Owner.attribute`` -> (``module:Owner``, ``attribute``); ``module:attribute`` -> (``module``, ...)."""
    module_name, _, attributes = path.partition(":")
    owner, _, attribute = attributes.rpartition(".")
    return (f"{module_name}:{owner}" if owner else module_name), attribute


def _exists(path: str) -> bool:
    owner, attribute = split_target(path)
    return hasattr(resolve(owner), attribute)


class _Applied:
    """What :func:`install` changed in this process, newest last, so :func:`restore` can put it back."""

    def __init__(self) -> None:
        self.undo: dict[str, list[Callable[[], None]]] = {}


_APPLIED = _Applied()
REFUSED: dict[str, str] = {}  # process kind -> why it runs stock Flower (for the one report)


def install(process: str, values: Mapping[str, Any], *, report: bool = True) -> bool:
    """Make every replacement of ``process`` with ``values`` (by entry name), or none of them.

    Anything installed before for ``process`` is restored first (so a second
    call with other values is a fresh install). If a guard fails, nothing is
    changed; the reason is kept in :data:`REFUSED` and, with ``report``,
    logged as the process's one warning (see :func:`warn`). Returns True if
    the replacements were made.
    """
    from .registry import entries_of

    entries = entries_of(process)
    missing = sorted({entry.name for entry in entries} ^ set(values))
    if missing:
        raise KeyError(f"flower_compat.install({process!r}): values missing or unknown: {missing}")
    restore(process)
    reason = mismatch(entries)
    if reason is not None:
        REFUSED[process] = reason
        if report:
            warn(process, reason)
        return False
    REFUSED.pop(process, None)
    undo = _APPLIED.undo.setdefault(process, [])
    for entry in entries:
        undo.append(_apply(entry, values[entry.name]))
    return True


def _apply(entry: Replacement, value: Any) -> Callable[[], None]:
    owner_path, attribute = split_target(entry.target)
    owner = resolve(owner_path)
    if entry.kind == "default":
        defaults = resolve(entry.target).__kwdefaults__
        before = defaults[DEFAULT_KWARG]
        defaults[DEFAULT_KWARG] = value
        return lambda: defaults.__setitem__(DEFAULT_KWARG, before)
    if entry.kind == "add":
        setattr(owner, attribute, value)
        return lambda: delattr(owner, attribute)
    before = getattr(owner, attribute)
    setattr(owner, attribute, value(before) if entry.kind == "wrap" else value)
    return lambda: setattr(owner, attribute, before)


def restore(process: str) -> None:
    """Put back everything :func:`install` changed for ``process`` in this process (newest first)."""
    for undo in reversed(_APPLIED.undo.pop(process, [])):
        undo()


def refusal(process: str) -> str | None:
    """Why ``process``'s replacements were refused in this process (by this copy or the path-loaded one)."""
    from . import PRIVATE_NAME

    copies = (sys.modules[__name__], sys.modules.get(f"{PRIVATE_NAME}.gate"))
    return next((copy.REFUSED[process] for copy in copies if copy is not None and process in copy.REFUSED), None)


def warn(process: str, reason: str) -> None:
    """The one warning of a process running stock Flower, through Flower's logger (into the run's log)."""
    from flwr.common.logger import log

    log(WARNING, "%s %s runs stock Flower (slower; none of its replacements made): %s. "
                 "See shared/flower_compat/registry.py and README 'Upgrading Flower'.",
        WARNING_PREFIX, process, reason)
