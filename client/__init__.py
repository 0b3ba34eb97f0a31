"""The fedseg hospital node: local training, evaluation and site tools.

Nothing here imports ``server``; shared code lives in ``shared``.
"""
