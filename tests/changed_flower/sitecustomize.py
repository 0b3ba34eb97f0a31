"""Make every Flower source look changed to fedseg's gate, in every process started with this folder on PYTHONPATH.

Used by tests/test_flower_compat.py: a Flower upgrade that edits a function fedseg
replaces shows the gate a different source. Only ``inspect.getsource`` of objects
defined in ``flwr`` is altered (one comment appended); Flower itself never reads
its own source, so it runs as installed.
"""

import inspect

_getsource = inspect.getsource


def _changed_getsource(obj):  # same signature as inspect.getsource
    source = _getsource(obj)
    module = getattr(obj, "__module__", None) or getattr(obj, "__name__", "")
    return source + "# changed upstream\n" if str(module).split(".")[0] == "flwr" else source


inspect.getsource = _changed_getsource
