"""The fedseg simulation harness: synthetic hospitals and simulated federations."""
