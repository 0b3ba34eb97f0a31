"""Site-owned settings, read from the SuperNode's node config.

A hospital's data location and state directory are node config
(``flower-supernode --node-config "site-id='...' datalist='...'"``), never run
config: the operator cannot point a site at other data or change its policy.

In a simulation, Flower's engine gives each virtual node only a
``partition-id``; the harness writes a sites manifest (one entry per
partition, the same keys a real node config has) and passes its path as run
config ``simulation-sites``. It is consulted only for nodes that have a
``partition-id`` and no ``datalist`` of their own.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.faults import SiteFault
from shared.errors import ConfigError


@dataclass(frozen=True)
class SiteConfig:
    """What one hospital node owns: its identity, its data, its state and cache directories."""

    site_id: str
    datalist: Path
    state_dir: Path
    cache_dir: Path | None = None
    fault: SiteFault | None = None  # simulations only: never read from a real node config

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> SiteConfig:
        """Build from a node config mapping; keys ``site-id``, ``datalist``, ``state-dir``, ``cache-dir``.

        ``cache-dir`` (preprocessed cases) defaults to ``<state-dir>/cache``.
        """
        datalist = node_config.get("datalist")
        if not datalist:
            raise ConfigError("node config key 'datalist' is required (path to the site's datalist JSON)")
        datalist_path = Path(str(datalist)).expanduser().resolve()
        site_id = str(node_config.get("site-id") or datalist_path.stem)
        state_dir = node_config.get("state-dir") or datalist_path.parent / ".fedseg-state"
        state_path = Path(str(state_dir)).expanduser()
        cache_dir = Path(str(node_config.get("cache-dir") or state_path / "cache")).expanduser()
        return cls(site_id=site_id, datalist=datalist_path, state_dir=state_path, cache_dir=cache_dir)


def resolve_site(node_config: Mapping[str, Any], simulation_sites: str) -> SiteConfig:
    """Return this node's :class:`SiteConfig`.

    A real node's own ``datalist`` always wins; a simulated node (one with a
    ``partition-id``) falls back to its entry in the ``simulation_sites`` manifest.
    """
    if node_config.get("datalist"):
        return SiteConfig.from_node_config(node_config)
    if "partition-id" in node_config and simulation_sites:
        entry = read_manifest_entry(Path(simulation_sites), int(node_config["partition-id"]))
        site = SiteConfig.from_node_config(entry)
        return dataclasses.replace(site, fault=SiteFault.from_manifest(entry.get("fault")))
    raise ConfigError(
        "node config key 'datalist' is required: start the SuperNode with "
        "--node-config \"datalist='/path/to/datalist.json'\""
    )


def read_manifest_entry(manifest: Path, partition_id: int) -> dict[str, Any]:
    """Return the node config of ``partition_id`` from a simulation sites manifest."""
    try:
        sites = json.loads(manifest.read_text())["sites"]
    except FileNotFoundError:
        raise ConfigError(f"run config key 'simulation-sites': {manifest} does not exist") from None
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ConfigError(f"run config key 'simulation-sites': {manifest} is not a sites manifest ({exc})") from None
    if not 0 <= partition_id < len(sites):
        raise ConfigError(
            f"run config key 'simulation-sites': {manifest} has {len(sites)} sites, "
            f"no entry for partition-id {partition_id}"
        )
    return dict(sites[partition_id])
