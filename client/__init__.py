"""The fedseg hospital node, by role: ``data`` (the data pipeline), ``inference``, ``training`` (incl. DP-SGD),
``runtime`` (what runs inside Flower's ClientApp) and ``commands`` (``python -m client COMMAND``).

Each sub-package imports only itself and those listed before it (tests/test_layout.py). Nothing here imports
``server``; shared code lives in ``shared``.
"""
