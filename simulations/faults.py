"""Which simulated hospitals misbehave, and how (``--fail-sites``, ``--slow-sites``, ``--poison-sites``).

Each option takes either a number N (N sites drawn with ``--fault-seed``) or a
comma-separated list of site ids. The plan becomes a ``fault`` entry in those
sites' entries of the sites manifest, applied by :mod:`client.runtime.faults`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from shared.errors import ConfigError

POISON_KINDS = ("nan", "scale")


@dataclass(frozen=True)
class FaultPlan:
    """Fault options of one simulation; empty strings mean no site of that kind."""

    fail_sites: str = ""
    slow_sites: str = ""
    poison_sites: str = ""
    poison_kind: str = "nan"
    poison_scale: float = 1000.0
    slow_seconds: float = 30.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.poison_kind not in POISON_KINDS:
            raise ConfigError(f"'--poison-kind' must be one of {POISON_KINDS}, got {self.poison_kind!r}")
        if self.slow_seconds < 0:
            raise ConfigError(f"'--slow-seconds' must be >= 0, got {self.slow_seconds!r}")

    def assign(self, site_ids: list[str]) -> dict[str, dict[str, Any]]:
        """Site id -> manifest ``fault`` entry; a site gets at most one fault."""
        rng = random.Random(self.seed)
        taken: dict[str, dict[str, Any]] = {}
        kinds = (("--fail-sites", self.fail_sites, {"kind": "fail"}),
                 ("--slow-sites", self.slow_sites, {"kind": "slow", "slow-seconds": self.slow_seconds}),
                 ("--poison-sites", self.poison_sites,
                  {"kind": f"poison-{self.poison_kind}", "scale": self.poison_scale}))
        for option, value, fault in kinds:
            for site in _choose(option, value, site_ids, taken, rng):
                taken[site] = {**fault, "seed": rng.randrange(2**31)}
        return taken


def _choose(option: str, value: str, site_ids: list[str], taken: dict[str, Any], rng: random.Random) -> list[str]:
    value = str(value).strip()
    if not value:
        return []
    free = [s for s in site_ids if s not in taken]
    if value.isdigit():
        count = int(value)
        if count > len(free):
            raise ConfigError(f"'{option}': {count} sites asked, only {len(free)} without a fault")
        return sorted(rng.sample(free, count))
    chosen = [s.strip() for s in value.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in site_ids]
    if unknown:
        raise ConfigError(f"'{option}': unknown site id(s) {unknown}; sites are {site_ids}")
    clash = [s for s in chosen if s in taken]
    if clash:
        raise ConfigError(f"'{option}': site(s) {clash} already have another fault")
    return chosen
