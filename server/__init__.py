"""The fedseg coordination server: ServerApp, strategy, run folder.

Nothing here imports ``client``; shared code lives in ``shared``.
"""
