"""The egress guard (what a reply may carry), its rules for secure-aggregation replies, and the audit log of every
reply that left the site or was blocked (read back by ``python -m client audit``)."""
