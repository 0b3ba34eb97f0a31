"""The ``flwr-simulation`` the harness starts: Flower's own, with fedseg's engine replacements made first.

Flower's SuperExec starts the simulation engine as the ``flwr-simulation``
found on ``PATH``. :func:`write_launcher` writes one that makes the simulation
engine's replacements (:func:`shared.flower_compat.engine.install`: all or
none, through the one gate) and then runs Flower's ``flwr_simulation``;
:func:`prepend_path` puts it first on ``PATH``.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

from shared.flower_compat import PRIVATE_NAME

LAUNCHER = '''#!{python}
"""flwr-simulation with fedseg's engine replacements (written by simulations.engine_launcher)."""
import importlib
import importlib.util
import sys

# shared/flower_compat, loaded by path under a private name: the run's app code (shared, server, client)
# must come from the FAB Flower installs, so the repository is not put on sys.path.
spec = importlib.util.spec_from_file_location({name!r}, {package!r}, submodule_search_locations=[{folder!r}])
sys.modules[spec.name] = module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
# report=False: a refusal is logged by the ServerApp (same process), whose output reaches the run's log
importlib.import_module({name!r} + ".engine").install(report=False)

from flwr.simulation.app import flwr_simulation

sys.exit(flwr_simulation())
'''


def write_launcher(bin_dir: Path) -> Path:
    """Write an executable ``flwr-simulation`` into ``bin_dir`` that makes the engine's replacements first.

    Flower's SuperExec starts the simulation engine as the ``flwr-simulation``
    found on ``PATH``; put ``bin_dir`` first there. The launcher loads
    ``shared/flower_compat`` by path, so nothing is added to the engine's ``sys.path``.
    """
    bin_dir.mkdir(parents=True, exist_ok=True)
    launcher = bin_dir / "flwr-simulation"
    here = Path(__file__).resolve()
    folder = here.parent.parent / "shared" / "flower_compat"
    launcher.write_text(LAUNCHER.format(python=sys.executable, name=PRIVATE_NAME, package=str(folder / "__init__.py"),
                                        folder=str(folder)))
    launcher.chmod(launcher.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return launcher


def prepend_path(env: dict[str, str], bin_dir: Path) -> None:
    """Put ``bin_dir`` first on ``env['PATH']``."""
    env["PATH"] = str(bin_dir) + os.pathsep + env.get("PATH", "")
