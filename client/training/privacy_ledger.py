"""The site's privacy ledger: every DP training round it ever ran, and the epsilon they add up to.

ClientApps are stateless between rounds, so an accountant created per round
would report the same epsilon every round. The ledger is a JSON file in the
site's state directory (node config ``state-dir``) holding every charged
round's (noise multiplier, sample rate, steps). The cumulative epsilon is
always recomputed by an Opacus accountant over the whole history, at the
site's delta.

A round is *charged before it trains*: under an exclusive lock the site
computes what the round would bring its total to, refuses if that exceeds
``max-epsilon``, and otherwise appends the entry and writes the file
atomically. Two runs on one node therefore cannot both spend the last of the
budget, a crash never leaves a half-written ledger, and a round that fails
after being charged stays counted (the safe direction).
"""

from __future__ import annotations

import fcntl
import functools
import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from shared.atomic import atomic_write_json
from shared.errors import FedSegError

LEDGER_FORMAT = "fedseg-privacy-ledger/1"
LEDGER_NAME = "privacy-ledger.json"
ACCOUNTANT = "rdp"


class PrivacyBudgetExceeded(FedSegError):
    """Training this round would take the site past its ``max-epsilon`` budget."""


class LedgerError(FedSegError):
    """The privacy ledger cannot be read or does not belong to this site's settings."""


@dataclass(frozen=True)
class LedgerEntry:
    """One charged DP training round."""

    run_id: int
    server_round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon_after: float
    time: float

    def mechanism(self) -> tuple[float, float, int]:
        """The (noise multiplier, sample rate, steps) triple an Opacus accountant takes."""
        return (self.noise_multiplier, self.sample_rate, self.steps)


@dataclass(frozen=True)
class Charge:
    """What charging a round did: the epsilon it adds and the site's new total."""

    epsilon_round: float
    epsilon: float
    entry: LedgerEntry


def cumulative_epsilon(history: Sequence[tuple[float, float, int]], *, delta: float) -> float:
    """Epsilon at ``delta`` of the composition of every (noise, sample rate, steps) in ``history``.

    The same arithmetic as Opacus' ``RDPAccountant.get_epsilon`` (per-order RDP
    of each mechanism times its steps, summed over the history in order, then
    Opacus' conversion to epsilon), with each mechanism's per-step RDP computed
    once per process: Opacus recomputes every entry on every call, ~0.1 s each
    at sample rates below 1, so a ledger of many rounds got slow to charge.
    """
    import numpy as np
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import get_privacy_spent

    if not history:
        return 0.0
    rdp = sum(steps * np.asarray(_rdp_per_step(noise, rate)) for noise, rate, steps in history)
    epsilon, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(epsilon)


@functools.lru_cache(maxsize=4096)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> tuple[float, ...]:
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp

    return tuple(compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                             orders=RDPAccountant.DEFAULT_ALPHAS))


class PrivacyLedger:
    """The ledger file of one site.

    Parameters
    ----------
    state_dir : Path
        The site's state directory (node config ``state-dir``); created if missing.
    delta : float
        The site's delta; epsilons are reported at this delta.
    """

    def __init__(self, state_dir: Path, *, delta: float) -> None:
        self.path = Path(state_dir) / LEDGER_NAME
        self.lock_path = Path(state_dir) / f".{LEDGER_NAME}.lock"
        self.delta = delta

    def entries(self) -> list[LedgerEntry]:
        """Every charged round, oldest first (empty if the site never trained with DP)."""
        if not self.path.exists():
            return []
        try:
            data = json.loads(self.path.read_text())
            if data.get("format") != LEDGER_FORMAT:
                raise ValueError(f"format is {data.get('format')!r}, expected {LEDGER_FORMAT!r}")
            return [LedgerEntry(**entry) for entry in data["entries"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LedgerError(f"privacy ledger {self.path} is unreadable ({exc}); the site will not "
                              "train until it is restored") from None

    def epsilon(self) -> float:
        """The site's cumulative epsilon over every charged round."""
        return cumulative_epsilon([e.mechanism() for e in self.entries()], delta=self.delta)

    def charge(self, *, run_id: int, server_round: int, noise_multiplier: float, sample_rate: float,
               steps: int, max_epsilon: float) -> Charge:
        """Record one round's spend if it keeps the site within ``max_epsilon``.

        Raises
        ------
        PrivacyBudgetExceeded
            If the round would bring the cumulative epsilon above ``max_epsilon``;
            nothing is recorded then.
        """
        with self._locked():
            entries = self.entries()
            history = [e.mechanism() for e in entries]
            before = cumulative_epsilon(history, delta=self.delta)
            after = cumulative_epsilon([*history, (noise_multiplier, sample_rate, steps)], delta=self.delta)
            if after > max_epsilon:
                raise PrivacyBudgetExceeded(
                    f"privacy budget: this round would bring epsilon from {before:.3f} to {after:.3f} "
                    f"(delta {self.delta:g}), above the site's max-epsilon {max_epsilon:g}; not training")
            entry = LedgerEntry(run_id=run_id, server_round=server_round, noise_multiplier=noise_multiplier,
                                sample_rate=sample_rate, steps=steps, epsilon_after=after, time=time.time())
            self._write([*entries, entry])
        return Charge(epsilon_round=cumulative_epsilon([entry.mechanism()], delta=self.delta),
                      epsilon=after, entry=entry)

    def _write(self, entries: list[LedgerEntry]) -> None:
        data: dict[str, Any] = {"format": LEDGER_FORMAT, "accountant": ACCOUNTANT, "delta": self.delta,
                                "entries": [asdict(e) for e in entries]}
        atomic_write_json(self.path, data)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
