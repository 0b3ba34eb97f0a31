"""The contract between the fedseg ClientApp and ServerApp: what a reply carries and how it is read.

Both sides import these names instead of spelling the strings out.
"""

from __future__ import annotations

#: A refusal's reason starts with the name of the error that made the site refuse
#: (``"PrivacyBudgetExceeded: privacy budget: ..."``); this one means the site's
#: privacy budget (node config ``max-epsilon``) does not allow the round, and,
#: since a site's ledger only grows, will not allow any later round of the run either.
BUDGET_REFUSAL = "PrivacyBudgetExceeded"


def is_budget_refusal(reason: str) -> bool:
    """True when a refusal ``reason`` is the site's privacy budget (also behind a secure-aggregation
    stage prefix such as ``"share-keys: PrivacyBudgetExceeded: ..."``)."""
    return reason.startswith(f"{BUDGET_REFUSAL}:") or f": {BUDGET_REFUSAL}:" in reason
