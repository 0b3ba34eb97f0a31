"""The ``flwr-simulation`` the harness starts: Flower's own, with fedseg's engine patches applied first.

Flower's SuperExec starts the simulation engine as the ``flwr-simulation``
found on ``PATH``. :func:`write_launcher` writes one that applies
:mod:`simulations.engine_patches` and :mod:`simulations.actor_pipeline` (each
guarded: stock engine on any Flower but the one checked) and then runs
Flower's ``flwr_simulation``; :func:`prepend_path` puts it first on ``PATH``.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

LAUNCHER = '''#!{python}
"""flwr-simulation with fedseg's engine patches (written by simulations.engine_launcher)."""
import importlib.util
import sys


def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


patches = load("fedseg_engine_patches", {module!r})
patches.apply()
load("fedseg_actor_pipeline", {pipeline!r}).apply(checker=patches.code_mismatch)

from flwr.simulation.app import flwr_simulation

sys.exit(flwr_simulation())
'''


def write_launcher(bin_dir: Path) -> Path:
    """Write an executable ``flwr-simulation`` into ``bin_dir`` that applies the patches first.

    Flower's SuperExec starts the simulation engine as the ``flwr-simulation``
    found on ``PATH``; put ``bin_dir`` first there. The launcher loads the patch
    modules by path, so nothing is added to the engine's ``sys.path``.
    """
    bin_dir.mkdir(parents=True, exist_ok=True)
    launcher = bin_dir / "flwr-simulation"
    here = Path(__file__).resolve()
    launcher.write_text(LAUNCHER.format(python=sys.executable, module=str(here.with_name("engine_patches.py")),
                                        pipeline=str(here.with_name("actor_pipeline.py"))))
    launcher.chmod(launcher.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return launcher


def prepend_path(env: dict[str, str], bin_dir: Path) -> None:
    """Put ``bin_dir`` first on ``env['PATH']``."""
    env["PATH"] = str(bin_dir) + os.pathsep + env.get("PATH", "")
