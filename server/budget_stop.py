"""Stop a DP run in which no site can train any more: every site refused for its privacy budget.

A site refuses a round for its budget (node config ``max-epsilon``) when the
round would take its privacy ledger past it. The ledger only grows, and the
round's mechanism does not get cheaper, so such a site refuses every later
round of the run too. Once every connected site has refused that way, and the
round's sampled sites all did, the remaining rounds cannot train anything:
the run stops after that round and says what to raise, instead of running on
and reporting the untrained model as done.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from shared.config import RunConfig
from shared.protocol import is_budget_refusal


class BudgetStop:
    """Watch the training outcomes round by round; say when no site can train again.

    Parameters
    ----------
    config : RunConfig
        The run's configuration (what to raise depends on where the noise comes from).
    known_sites : Mapping[int, str]
        Node id -> site id, learned from replies (the strategy's, updated as replies arrive).
    """

    def __init__(self, *, config: RunConfig, known_sites: Mapping[int, str]) -> None:
        self.config = config
        self.known_sites = known_sites
        #: Sites that refused a round of this run for their budget (they will refuse every later one).
        self.out_of_budget: set[str] = set()
        #: The one line saying why the run stopped (None: it did not).
        self.line: str | None = None

    def after_training(self, server_round: int, sites: Mapping[str, Mapping[str, Any]],
                       node_ids: Iterable[int]) -> bool:
        """True when round ``server_round``'s training outcomes (``sites``: site -> row) leave no site
        of ``node_ids`` (the connected nodes) that could still train; :attr:`line` then says so."""
        asked = {site: row for site, row in sites.items() if "train-status" in row}
        for site, row in asked.items():
            if row["train-status"] == "refused" and is_budget_refusal(str(row.get("train-reason", ""))):
                self.out_of_budget.add(site)
        if not asked or not set(asked) <= self.out_of_budget:
            return False
        connected = [self.known_sites.get(node_id) for node_id in node_ids]
        if any(site is None or site not in self.out_of_budget for site in connected):
            return False  # a site not asked yet (or not known) may still have budget
        self.line = (f"stopped after round {server_round} of {self.config.num_rounds}: every site refused to "
                     f"train for its privacy budget and none can train in a later round; {self.remedy()}")
        return True

    def remedy(self) -> str:
        """What to raise (or lower) so that the sites can train, for this run's source of noise."""
        budget = ("raise the sites' budget (node config 'max-epsilon'; --max-epsilon of the harness and the "
                  "deployment runner)")
        if self.config.dp_noise_from_budget:
            return f"their privacy ledgers already hold their whole budget: {budget}"
        if self.config.dp_target_epsilon > 0:
            return f"{budget} or lower run config 'dp-target-epsilon'"
        return (f"{budget}, raise run config 'dp-noise-multiplier', or set 'dp-noise-from-budget = true' "
                "(each site's noise from its budget)")
