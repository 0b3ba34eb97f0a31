"""Flower 1.41's simulation engine, handing each message over when it is stored.

Flower 1.41's simulation engine (``flwr/server/superlink/fleet/vce/vce_api.py``,
``add_messages_to_queue``) finds work by a sweep: every 0.1 s it asks the link
state for a message for *every* registered node, and each ask
(``InMemoryLinkState.get_message_ins``) scans every stored message. With 1000
virtual sites and 20 messages in flight a sweep costs ~45 ms of CPU, so the
engine burns a quarter of a core next to the ClientApps for as long as a phase
runs, and each message waits up to 0.1 s before any worker sees it. Neither
the interval nor the scan is a setting.

:func:`apply` swaps two functions, in the ``flwr-simulation`` process only
(the harness starts it through :mod:`simulations.engine_launcher`):

- ``InMemoryLinkState.store_message_ins`` also records the destination node
  of each message it stores (:class:`Arrivals`);
- ``add_messages_to_queue`` asks the link state only for the nodes that got a
  message, as soon as one is stored, through Flower's own ``get_message_ins``
  (so delivery marking, expiry and federation checks stay Flower's). Every
  :data:`SAFETY_SWEEP_S` seconds it also asks for each node that a stored
  message not yet delivered is for, so a message stored by any other path is
  delivered late rather than never;
- ``InMemoryLinkState.store_message_res`` also counts the replies it stores,
  and the in-process ``InMemoryGrid`` gains ``wait_for_replies(timeout)``,
  which returns as soon as a reply was stored since its last call (or after
  ``timeout``). :class:`server.polling_grid.PollingGrid` waits with it instead
  of sleeping a fixed interval between pulls when the Grid offers it;
- ``_register_nodes`` also records which partition each virtual node serves,
  and ``InMemoryGrid`` gains ``sampling_order(node_ids)``, which lists nodes by
  partition. Flower draws new random node ids every run, so sampling over
  sorted ids picked other sites each run with the same seed; over partitions
  a seed samples the same sites every run (and a resumed run the same ones as
  the uninterrupted run).

All are guarded: on any Flower other than the version whose code was checked
(a hash of each replaced function's source), nothing is changed and the
engine runs stock, with a warning. :mod:`simulations.engine_launcher` starts
``flwr-simulation`` with these patches and :mod:`simulations.actor_pipeline`
(two messages in flight per Ray actor), guarded by the same check
(:func:`code_mismatch`).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import inspect
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from queue import Queue
from typing import Any

LOG = logging.getLogger("fedseg.simulations")

PATCHED_FLWR_VERSION = "1.41.0"
# sha256 of inspect.getsource() of each function replaced or wrapped, as checked on flwr 1.41.0.
EXPECTED_SOURCES = {
    "vce_api.add_messages_to_queue": "953f4bd41a931a7779a4a670ab17b633f6e20b08a0128535328674466419777a",
    "InMemoryLinkState.store_message_ins": "a2b78afac51dc4a23d236ccf8d02958c8d0532aac179cd9ad9b1a0d939eecbea",
    "InMemoryLinkState.get_message_ins": "6547c8dcbc62e12f5b2aa5c69f4de8c7c7072c10d6c0876512cf37197d941056",
    "InMemoryLinkState.store_message_res": "52a4f7ccc70e890843671cc17e603239f50b88de2a0c5d30810a19021c9d594d",
    "vce_api._register_nodes": "88a1cb6749e876ed204b9b250b6846dae53e8a20a5df1f79cff060eacab9b998",
}
ANNOUNCEMENT = "[fedseg] simulation engine: messages handed over as they are stored (simulations/engine_patches.py)"
SAFETY_SWEEP_S = 3.0
IDLE_WAIT_S = 0.1  # Flower's sweep interval: how often the stop flag is looked at when idle


class Arrivals:
    """Destination nodes of stored messages, in arrival order, with a wake-up for the engine."""

    def __init__(self) -> None:
        self._nodes: deque[int] = deque()
        self._ready = threading.Condition()

    def add(self, node_id: int) -> None:
        """Record that a message for ``node_id`` was stored."""
        with self._ready:
            self._nodes.append(node_id)
            self._ready.notify_all()

    def take(self, *, timeout: float) -> list[int]:
        """Every node recorded since the last call, waiting up to ``timeout`` s for one."""
        with self._ready:
            if not self._nodes:
                self._ready.wait(timeout)
            nodes = list(self._nodes)
            self._nodes.clear()
        return nodes


class ReplySignal:
    """Counts stored replies; lets one consumer wait for the next one."""

    def __init__(self) -> None:
        self.stored = 0
        self._changed = threading.Condition()

    def add(self) -> None:
        """Record that a reply was stored."""
        with self._changed:
            self.stored += 1
            self._changed.notify_all()

    def wait_beyond(self, seen: int, *, timeout: float) -> int:
        """Wait until more than ``seen`` replies were stored (at most ``timeout`` s); return the count."""
        with self._changed:
            self._changed.wait_for(lambda: self.stored > seen, timeout)
            return self.stored


class StateSignals:
    """The signals kept for one link state."""

    def __init__(self) -> None:
        self.arrivals = Arrivals()
        self.replies = ReplySignal()


_SIGNALS: weakref.WeakKeyDictionary[Any, StateSignals] = weakref.WeakKeyDictionary()
_SIGNALS_LOCK = threading.Lock()


def signals_of(state: Any) -> StateSignals:
    """The :class:`StateSignals` of one link state (made on first use)."""
    with _SIGNALS_LOCK:
        if state not in _SIGNALS:
            _SIGNALS[state] = StateSignals()
        return _SIGNALS[state]


def recording_store(original: Callable[..., str | None], *, reply: bool) -> Callable[..., str | None]:
    """Wrap ``store_message_ins`` (``reply=False``) or ``store_message_res`` to signal each stored message."""

    @functools.wraps(original)  # keeps __wrapped__: apply() and the source check find Flower's function
    def store(self: Any, message: Any) -> str | None:
        message_id = original(self, message)
        if message_id is not None:
            signals = signals_of(self)
            if reply:
                signals.replies.add()
            else:
                signals.arrivals.add(message.metadata.dst_node_id)
        return message_id

    return store


def wait_for_replies(self: Any, timeout: float) -> None:
    """``InMemoryGrid.wait_for_replies``: return once a reply was stored since the last call, or after ``timeout`` s."""
    seen = self.__dict__.get("_fedseg_replies_seen", 0)
    self.__dict__["_fedseg_replies_seen"] = signals_of(self.state).replies.wait_beyond(seen, timeout=timeout)


class NodePartitions:
    """Which partition each virtual node of this process's simulation serves (set once, when registered)."""

    def __init__(self) -> None:
        self.by_node: dict[int, int] = {}
        self.registered = threading.Event()

    def record(self, mapping: dict[int, int]) -> None:
        self.by_node = dict(mapping)
        self.registered.set()


NODE_PARTITIONS = NodePartitions()
REGISTRATION_WAIT_S = 10.0


def recording_partitions(original: Callable[..., dict[int, int]]) -> Callable[..., dict[int, int]]:
    """Wrap ``vce_api._register_nodes`` to record its node id -> partition id mapping."""

    @functools.wraps(original)
    def register(*args: Any, **kwargs: Any) -> dict[int, int]:
        mapping = original(*args, **kwargs)
        NODE_PARTITIONS.record(mapping)
        return mapping

    return register


def sampling_order(self: Any, node_ids: Iterable[int]) -> list[int]:
    """``InMemoryGrid.sampling_order``: ``node_ids`` by the partition each serves (then unknown ids, sorted)."""
    NODE_PARTITIONS.registered.wait(REGISTRATION_WAIT_S)  # nodes appear in the state just before the mapping
    partitions = NODE_PARTITIONS.by_node
    return sorted(node_ids, key=lambda node: (node not in partitions, partitions.get(node, node)))


def add_messages_on_arrival(state: Any, queue: Queue, nodes_mapping: Any, f_stop: threading.Event) -> None:
    """Stand-in for Flower's ``add_messages_to_queue``: queue each message once it is stored."""
    print(ANNOUNCEMENT, flush=True)  # flwr-simulation mirrors its output into the run's log (flower.log)
    arrivals = signals_of(state).arrivals
    next_sweep = time.monotonic() + SAFETY_SWEEP_S
    while not f_stop.is_set():
        _queue_next_messages(state, queue, [n for n in arrivals.take(timeout=IDLE_WAIT_S) if n in nodes_mapping])
        if time.monotonic() >= next_sweep:
            _queue_next_messages(state, queue, [n for n in undelivered_destinations(state) if n in nodes_mapping])
            next_sweep = time.monotonic() + SAFETY_SWEEP_S


def undelivered_destinations(state: Any) -> list[int]:
    """The destination of every stored, not yet delivered message, in one pass over the link state's messages.

    The safety sweep asks only these nodes, once per message (an ask hands over one):
    Flower's sweep asks every node, and each ask scans every stored message (~45 ms a
    sweep at 1000 nodes). Reads the fields ``get_message_ins`` reads (its source is
    among the checked ones).
    """
    with state.lock:
        return [message.metadata.dst_node_id for message in state.message_ins_store.values()
                if message.metadata.delivered_at == ""]


def _queue_next_messages(state: Any, queue: Queue, node_ids: Iterable[int]) -> None:
    """Queue each node's next undelivered message, as Flower's sweep does (one per node per ask)."""
    for node_id in node_ids:
        for message in state.get_message_ins(node_id=node_id, limit=1):
            queue.put(message)


def source_hash(function: Callable[..., Any]) -> str:
    """sha256 of a function's source (the code a patch was checked against)."""
    return hashlib.sha256(inspect.getsource(function).encode()).hexdigest()


def _targets() -> dict[str, Callable[..., Any]]:
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

    store_ins, store_res = InMemoryLinkState.store_message_ins, InMemoryLinkState.store_message_res
    register = vce_api._register_nodes
    return {"vce_api.add_messages_to_queue": vce_api.add_messages_to_queue,
            "vce_api._register_nodes": getattr(register, "__wrapped__", register),
            "InMemoryLinkState.store_message_ins": getattr(store_ins, "__wrapped__", store_ins),
            "InMemoryLinkState.get_message_ins": InMemoryLinkState.get_message_ins,
            "InMemoryLinkState.store_message_res": getattr(store_res, "__wrapped__", store_res)}


def code_mismatch(expected: dict[str, str], targets: dict[str, Callable[..., Any]]) -> str | None:
    """Why Flower's ``targets`` are not the code whose source hashes are ``expected`` (None if they are)."""
    version = importlib.metadata.version("flwr")
    if version != PATCHED_FLWR_VERSION:
        return f"flwr {version} is installed; fedseg checked flwr {PATCHED_FLWR_VERSION}"
    changed = [name for name, function in targets.items() if source_hash(function) != expected[name]]
    if changed:
        return f"Flower's {', '.join(changed)} is not the code fedseg checked"
    return None


def mismatch() -> str | None:
    """Why the engine must not be patched here, or None if it is the code checked."""
    return code_mismatch(EXPECTED_SOURCES, _targets())


def apply() -> bool:
    """Patch the engine in this process; False (and a warning) if this Flower is not the one checked."""
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
    from flwr.superlink.grid import InMemoryGrid

    reason = mismatch()
    for name, ours in (("wait_for_replies", wait_for_replies), ("sampling_order", sampling_order)):
        if reason is None and getattr(InMemoryGrid, name, ours) is not ours:
            reason = f"Flower's InMemoryGrid already has a {name}"
    if reason is not None:
        LOG.warning("simulation engine left stock (messages found by Flower's 0.1 s sweep): %s", reason)
        return False
    if not hasattr(InMemoryLinkState.store_message_ins, "__wrapped__"):
        InMemoryLinkState.store_message_ins = recording_store(InMemoryLinkState.store_message_ins, reply=False)
        InMemoryLinkState.store_message_res = recording_store(InMemoryLinkState.store_message_res, reply=True)
    if not hasattr(vce_api._register_nodes, "__wrapped__"):
        vce_api._register_nodes = recording_partitions(vce_api._register_nodes)
    vce_api.add_messages_to_queue = add_messages_on_arrival
    InMemoryGrid.wait_for_replies = wait_for_replies
    InMemoryGrid.sampling_order = sampling_order
    return True
