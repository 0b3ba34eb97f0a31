"""Site-owned settings, read from the SuperNode's node config.

A hospital's data location and state directory are node config
(``flower-supernode --node-config "site-id='...' datalist='...'"``), never run
config: the operator cannot point a site at other data or change its policy.

In a simulation, Flower's engine gives each virtual node only a
``partition-id``; the harness writes a sites manifest (one entry per
partition, the same keys a real node config has) and passes its path as run
config ``simulation-sites``. It is consulted only for nodes that have a
``partition-id`` and no ``datalist`` of their own.

The keys and their defaults are :data:`shared.protocol.NODE_CONFIG_KEYS`;
:meth:`SiteConfig.to_node_config` writes what :meth:`SiteConfig.from_node_config`
reads (the harness' manifest, the deployment scripts' ``--node-config``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.runtime.faults import SiteFault
from shared.config import DEFAULT_DP_DELTA, DEFAULT_MAX_EPSILON
from shared.errors import ConfigError
from shared.protocol import (
    NODE_CACHE_DIR,
    NODE_CONFIG_KEYS,
    NODE_DATALIST,
    NODE_DP_DELTA,
    NODE_FAULT,
    NODE_MAX_EPSILON,
    NODE_PARTITION_ID,
    NODE_REQUIRE_DP,
    NODE_REQUIRE_SECURE_AGGREGATION,
    NODE_SITE_ID,
    NODE_STATE_DIR,
)

#: The preprocessed-case cache inside a site's state folder, unless node config ``cache-dir`` puts it elsewhere.
CACHE_DIR_NAME = "cache"


@dataclass(frozen=True)
class SiteConfig:
    """What one hospital node owns: identity, data, state and cache directories, privacy policy.

    ``max_epsilon`` is the site's total (epsilon, ``dp_delta``) budget over every
    run it ever takes part in; ``require_dp`` makes the site refuse runs without DP.
    """

    site_id: str
    datalist: Path
    state_dir: Path
    cache_dir: Path | None = None
    fault: SiteFault | None = None  # simulations only: never read from a real node config
    max_epsilon: float = DEFAULT_MAX_EPSILON
    dp_delta: float = DEFAULT_DP_DELTA
    require_dp: bool = True
    require_secure_aggregation: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_epsilon) and self.max_epsilon > 0):
            raise ConfigError(f"node config key 'max-epsilon': must be a finite number > 0, got {self.max_epsilon!r}")
        if not 0 < self.dp_delta < 1:
            raise ConfigError(f"node config key 'dp-delta': must be in (0, 1), got {self.dp_delta!r}")

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> SiteConfig:
        """Build from a node config mapping.

        Keys: ``site-id``, ``datalist`` (required), ``state-dir``, ``cache-dir``
        (preprocessed cases; defaults to ``<state-dir>/cache``), ``max-epsilon``,
        ``dp-delta``, ``require-dp``, ``require-secure-aggregation``.
        """
        datalist = node_config.get(NODE_DATALIST)
        if not datalist:
            raise ConfigError(f"node config key '{NODE_DATALIST}' is required (path to the site's datalist JSON)")
        datalist_path = Path(str(datalist)).expanduser().resolve()
        site_id = str(node_config.get(NODE_SITE_ID) or datalist_path.stem)
        state_dir = node_config.get(NODE_STATE_DIR) or datalist_path.parent / ".fedseg-state"
        state_path = Path(str(state_dir)).expanduser()
        cache_dir = Path(str(node_config.get(NODE_CACHE_DIR) or state_path / CACHE_DIR_NAME)).expanduser()
        return cls(site_id=site_id, datalist=datalist_path, state_dir=state_path, cache_dir=cache_dir,
                   max_epsilon=_number(node_config, NODE_MAX_EPSILON),
                   dp_delta=_number(node_config, NODE_DP_DELTA),
                   require_dp=_flag(node_config, NODE_REQUIRE_DP),
                   require_secure_aggregation=_flag(node_config, NODE_REQUIRE_SECURE_AGGREGATION))

    def to_node_config(self) -> dict[str, str | float | bool]:
        """The node config that :meth:`from_node_config` reads back as this site (its simulation-only
        ``fault`` aside); ``cache-dir`` only where it is set."""
        values: dict[str, str | float | bool] = {
            NODE_SITE_ID: self.site_id, NODE_DATALIST: str(self.datalist), NODE_STATE_DIR: str(self.state_dir),
            NODE_MAX_EPSILON: self.max_epsilon, NODE_DP_DELTA: self.dp_delta, NODE_REQUIRE_DP: self.require_dp,
            NODE_REQUIRE_SECURE_AGGREGATION: self.require_secure_aggregation}
        if self.cache_dir is not None:
            values[NODE_CACHE_DIR] = str(self.cache_dir)
        return values


def _number(node_config: Mapping[str, Any], key: str) -> float:
    value = node_config.get(key, NODE_CONFIG_KEYS[key].default)
    try:
        if isinstance(value, bool):
            raise ValueError
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"node config key '{key}': expected a number, got {value!r}") from None


def _flag(node_config: Mapping[str, Any], key: str) -> bool:
    value = node_config.get(key, NODE_CONFIG_KEYS[key].default)
    if isinstance(value, bool):
        return value
    if str(value).strip().lower() in ("true", "1", "yes"):
        return True
    if str(value).strip().lower() in ("false", "0", "no"):
        return False
    raise ConfigError(f"node config key '{key}': expected true or false, got {value!r}")


def resolve_site(node_config: Mapping[str, Any], simulation_sites: str) -> SiteConfig:
    """Return this node's :class:`SiteConfig`.

    A real node's own ``datalist`` always wins; a simulated node (one with a
    ``partition-id``) falls back to its entry in the ``simulation_sites`` manifest.
    """
    if node_config.get(NODE_DATALIST):
        return SiteConfig.from_node_config(node_config)
    if NODE_PARTITION_ID in node_config and simulation_sites:
        entry = read_manifest_entry(Path(simulation_sites), int(node_config[NODE_PARTITION_ID]))
        site = SiteConfig.from_node_config(entry)
        return dataclasses.replace(site, fault=SiteFault.from_manifest(entry.get(NODE_FAULT)))
    raise ConfigError(
        "node config key 'datalist' is required: start the SuperNode with "
        "--node-config \"datalist='/path/to/datalist.json'\""
    )


def read_manifest_entry(manifest: Path, partition_id: int) -> dict[str, Any]:
    """Return the node config of ``partition_id`` from a simulation sites manifest."""
    sites = _manifest_sites(manifest)
    if not 0 <= partition_id < len(sites):
        raise ConfigError(
            f"run config key 'simulation-sites': {manifest} has {len(sites)} sites, "
            f"no entry for partition-id {partition_id}"
        )
    return dict(sites[partition_id])


_MANIFEST_CACHE: dict[Path, tuple[tuple[int, int], list[dict[str, Any]]]] = {}


def _manifest_sites(manifest: Path) -> list[dict[str, Any]]:
    """The manifest's site entries, parsed once per version of the file (a 1000-site manifest is ~0.3 MB)."""
    try:
        stat = manifest.stat()
        version = (stat.st_mtime_ns, stat.st_size)
        cached = _MANIFEST_CACHE.get(manifest)
        if cached is not None and cached[0] == version:
            return cached[1]
        sites = json.loads(manifest.read_text())["sites"]
    except FileNotFoundError:
        raise ConfigError(f"run config key 'simulation-sites': {manifest} does not exist") from None
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ConfigError(f"run config key 'simulation-sites': {manifest} is not a sites manifest ({exc})") from None
    if not isinstance(sites, list):
        raise ConfigError(f"run config key 'simulation-sites': {manifest} is not a sites manifest ('sites' is not a list)")
    _MANIFEST_CACHE.clear()  # one manifest per run: keep only the latest
    _MANIFEST_CACHE[manifest] = (version, sites)
    return sites
