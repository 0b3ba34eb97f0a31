"""fedseg's one boundary with Flower's internals: every run-time replacement, its guard and its reason.

fedseg's speed in simulation and deployment comes from replacing a few Flower
internals at run time, in four process kinds (:data:`.gate.PROCESSES`). All of
them, and nothing else in fedseg, live here:

- :mod:`.registry`: one entry per replacement (target, what it relies on,
  replacement, the measured reason, the upstream issue);
- :mod:`.gate`: the one version gate and guard (installed flwr version + sha256
  of every source relied on, :mod:`.checked`); a process kind gets all its
  replacements or none, with one warning naming what is off;
- :mod:`.engine` + :mod:`.actor_pipeline` (simulation engine), :mod:`.nodes`
  (SuperNode, warm ClientApp executor, deployed ServerApp): the replacements;
- :mod:`.grid`: the Grid extras as typing Protocols.

Only the standard library and Flower are imported here, with relative imports,
so the package also works loaded by file path under :data:`PRIVATE_NAME`, as
the SuperNode script, the warm executor and the simulation launcher do: they must not import fedseg's ``shared`` package, which
a ClientApp or ServerApp must get from its FAB.
"""

from __future__ import annotations

PRIVATE_NAME = "fedseg_flower_compat"  # its name when loaded by path (deploy/flower_patches.py, the launcher)
