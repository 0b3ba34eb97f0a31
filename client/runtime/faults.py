"""Fault injection for SIMULATED hospitals only: crash, stall or poison a site's update.

The simulation harness writes a ``fault`` entry into a virtual site's entry
of the sites manifest (``python -m simulations --fail-sites/--slow-sites/
--poison-sites``). :func:`client.runtime.site_config.resolve_site` reads it only for
simulated nodes (those configured from the manifest through their
``partition-id``); a real hospital's node config has no way to set it, so an
operator can never make a real site misbehave.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shared.errors import ConfigError

if TYPE_CHECKING:
    import torch

FAULT_KINDS = ("fail", "slow", "poison-nan", "poison-scale")


class SimulatedCrash(RuntimeError):
    """Raised on purpose by a site configured to fail (not a FedSegError: the ClientApp crashes)."""


@dataclass(frozen=True)
class SiteFault:
    """One simulated site's misbehaviour.

    Parameters
    ----------
    kind : str
        ``fail`` (the ClientApp crashes mid-round), ``slow`` (sleeps ``slow_seconds``
        before training), ``poison-nan`` (sends NaN weights), ``poison-scale``
        (sends its change to the global model multiplied by ``scale``).
    seed : int
        Seeds which weights a NaN poisoning hits.
    """

    kind: str
    seed: int = 0
    slow_seconds: float = 30.0
    scale: float = 1000.0

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ConfigError(f"sites manifest key 'fault.kind': must be one of {FAULT_KINDS}, got {self.kind!r}")

    @classmethod
    def from_manifest(cls, entry: Mapping[str, Any] | None) -> SiteFault | None:
        """Build from a manifest ``fault`` entry (kebab-case keys); None when absent."""
        if not entry:
            return None
        return cls(kind=str(entry["kind"]), seed=int(entry.get("seed", 0)),
                   slow_seconds=float(entry.get("slow-seconds", 30.0)), scale=float(entry.get("scale", 1000.0)))

    def before_training(self) -> None:
        """Crash or stall, as configured."""
        if self.kind == "fail":
            raise SimulatedCrash("simulated site failure (--fail-sites)")
        if self.kind == "slow":
            time.sleep(self.slow_seconds)

    def poison(self, trained: dict[str, torch.Tensor], received: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The update this site sends instead of ``trained`` (unchanged unless poisoning)."""
        import torch

        if self.kind == "poison-scale":
            return {k: received[k] + self.scale * (v - received[k]) for k, v in trained.items()}
        if self.kind == "poison-nan":
            generator = torch.Generator().manual_seed(self.seed)
            poisoned = {k: v.clone() for k, v in trained.items()}
            name = sorted(poisoned)[int(torch.randint(len(poisoned), (1,), generator=generator))]
            flat = poisoned[name].view(-1)
            flat[int(torch.randint(flat.numel(), (1,), generator=generator))] = float("nan")
            return poisoned
        return trained
