"""Code both the fedseg server and the hospital client use.

This package imports neither ``client`` nor ``server``.
"""
