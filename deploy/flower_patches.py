"""``shared/flower_compat`` for the node's scripts (``supernode.py``, ``clientapp_executor.py``), loaded by path.

Both scripts are run by file path (in the image: ``/app/deploy/...``, with
``/app/shared`` beside them), and the warm executor must not import fedseg's
``shared`` package (a ClientApp gets it from its FAB). So the compatibility
package is loaded from its folder under a private name
(:data:`shared.flower_compat.PRIVATE_NAME`); the replacements themselves, their
guard and their reasons are there (:mod:`shared.flower_compat.registry`).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

PRIVATE_NAME = "fedseg_flower_compat"  # shared.flower_compat.PRIVATE_NAME (not importable from here)
PACKAGE_DIR = Path(__file__).resolve().parent.parent / "shared" / "flower_compat"


def compat(submodule: str) -> ModuleType:
    """``shared.flower_compat.<submodule>``, the package loaded by path under :data:`PRIVATE_NAME` (once)."""
    if PRIVATE_NAME not in sys.modules:
        spec = importlib.util.spec_from_file_location(PRIVATE_NAME, PACKAGE_DIR / "__init__.py",
                                                      submodule_search_locations=[str(PACKAGE_DIR)])
        if spec is None or spec.loader is None:
            raise ImportError(f"{PACKAGE_DIR}: fedseg's Flower compatibility package is missing")
        sys.modules[PRIVATE_NAME] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return importlib.import_module(f"{PRIVATE_NAME}.{submodule}")


def patch_supernode_loop(*, poll_interval_s: float, first_retry_s: float) -> bool:
    """The SuperNode's replacements (:func:`shared.flower_compat.nodes.install_supernode`)."""
    return compat("nodes").install_supernode(poll_interval_s=poll_interval_s, first_retry_s=first_retry_s)


def patch_clientapp_executor(*, executor: object, first_retry_s: float) -> bool:
    """The warm executor's replacements (:func:`shared.flower_compat.nodes.install_clientapp_executor`)."""
    return compat("nodes").install_clientapp_executor(executor=executor, first_retry_s=first_retry_s)
