"""Flower 1.41's simulation engine, handing each message over when it is stored.

Flower 1.41's simulation engine (``flwr/server/superlink/fleet/vce/vce_api.py``,
``add_messages_to_queue``) finds work by a sweep: every 0.1 s it asks the link
state for a message for *every* registered node, and each ask
(``InMemoryLinkState.get_message_ins``) scans every stored message. With 1000
virtual sites and 20 messages in flight a sweep costs ~45 ms of CPU, so the
engine burns a quarter of a core next to the ClientApps for as long as a phase
runs, and each message waits up to 0.1 s before any worker sees it. Neither
the interval nor the scan is a setting.

:func:`install` swaps these, in the ``flwr-simulation`` process only
(the harness starts it through :mod:`simulations.engine_launcher`;
entries in :mod:`.registry`):

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

:func:`install` makes them, with :mod:`.actor_pipeline`'s (two messages in
flight per Ray actor), through the one gate (:mod:`.gate`): on any Flower but
the code checked, nothing is changed and the engine runs stock.
:mod:`simulations.engine_launcher` starts ``flwr-simulation`` with them.
"""

from __future__ import annotations

import functools
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from queue import Queue
from typing import Any

ANNOUNCEMENT = "[fedseg] simulation engine: messages handed over as they are stored (shared/flower_compat/engine.py)"
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

    @functools.wraps(original)
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


def install(*, report: bool = True) -> bool:
    """Make the simulation engine's replacements (this module's and :mod:`.actor_pipeline`'s), or none.

    Through the gate (:func:`.gate.install`): on any Flower but the code checked,
    the engine runs stock and the reason is kept (``report``: logged now; the
    launcher leaves it to the ServerApp, whose output reaches the run's log).
    """
    from . import actor_pipeline, gate

    return gate.install("simulation-engine", {
        "record-stored-messages": functools.partial(recording_store, reply=False),
        "count-stored-replies": functools.partial(recording_store, reply=True),
        "record-partitions": recording_partitions,
        "deliver-on-store": add_messages_on_arrival,
        "grid-wait-for-replies": wait_for_replies,
        "grid-sampling-order": sampling_order,
        "pipelined-ray-backend": lambda _flowers: actor_pipeline.pipelined_classes()[1],
        "register-engine-queue": actor_pipeline.registering_queue,
    }, report=report)
