"""Flower 1.41's Ray actors, each handed its next message while it still runs one.

Flower's simulation engine gives each Ray actor one message at a time: a
worker thread submits the message, waits for the reply, stores it, and only
then submits the next. Each hand-over costs a Ray round trip (~3.5 ms on two
busy cores, BENCHMARKS.md scale section) during which the actor sits idle;
with small sites (~80 ms of work per message) that is ~5% of a round.

:func:`apply` (in the ``flwr-simulation`` process only, through the launcher
of :mod:`simulations.engine_launcher`) replaces Flower's ``RayBackend`` with a
subclass whose actor pool (:class:`PipelinedActorPool`) lets each actor hold
up to :data:`DEPTH` messages: Ray queues the second on the actor, which
starts it the moment the first ends. A message goes to the actor with the
fewest messages in flight; it is queued behind a busy actor only while the
engine's queue still holds at least one message per actor, so at the end of
a phase no message waits behind a busy actor while another actor is idle.

Guarded like the engine patch: on any Flower other than the version whose
code was checked (a hash of each function relied on), nothing is changed.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from queue import Queue
from typing import Any

LOG = logging.getLogger("fedseg.simulations")

DEPTH = 2  # messages in flight per actor
# sha256 of inspect.getsource() of each Flower function this relies on, as checked on flwr 1.41.0
# (engine_patches.PATCHED_FLWR_VERSION; checked by engine_patches.code_mismatch).
EXPECTED_SOURCES = {
    "RayBackend.build": "6a0c387457a6dbc1b35091762c24afdd2c3453fe09eeceeb7e966136f832ddc0",
    "RayBackend.process_message": "32a5db14180222d31bb6d622529f0cccab652d4f6c35fd137560240da84010b7",
    "BasicActorPool.__init__": "b9c2ef0d7bfedaeb42788fe17a71efc11a46c0fb369f030d34d99b5bb4a1acef",
    "BasicActorPool.submit": "672402921baad47352ebe3133ebd90248314959ce3836f08b6c8723111ec17c9",
    "BasicActorPool.add_actor_back_to_pool": "e88f89e6e878f4ce106cf1ef59b4aec3f50882ce408d6df0ab7e1953cf375d96",
    "BasicActorPool.fetch_result_and_return_actor_to_pool": "4e9babbe276dedd796dea84d4b55d84d638300152602c4624ff7e9796a07a24a",
    "BasicActorPool.terminate_all_actors": "57b5aa6c2232e405894f6f9d430e04ee46860f6f2716d50f69124b5e7dbbb3ce",
    "vce_api.run_api": "f85c0cd6e902752f455c00ab9c7212c1cd94a8c681fa9bf294ba967463390898",
    "vce_api.worker": "60f308688ba34fb5bc942ac68c1d97be61b2010e8d4c3983833f646c5c038157",
}
ANNOUNCEMENT = f"[fedseg] simulation engine: up to {DEPTH} messages in flight per Ray actor (simulations/actor_pipeline.py)"


class EngineQueue:
    """The engine's queue of messages waiting for a worker (registered by the engine patch's delivery loop)."""

    def __init__(self) -> None:
        self._queue: Queue | None = None

    def register(self, queue: Queue) -> None:
        self._queue = queue

    def backlog(self) -> int:
        """Messages waiting in the engine's queue (0 if none is registered)."""
        return 0 if self._queue is None else self._queue.qsize()


ENGINE_QUEUE = EngineQueue()
Checker = Callable[[dict[str, str], dict[str, Callable[..., Any]]], "str | None"]


class ActorSlots:
    """Which actor gets the next message: messages in flight per actor, and when one may be queued.

    Parameters
    ----------
    num_actors : int
        Actors in the pool.
    depth : int
        Most messages in flight on one actor.
    backlog : callable
        Messages still waiting behind the one being placed.
    """

    def __init__(self, num_actors: int, *, depth: int, backlog: Callable[[], int]) -> None:
        if depth < 1:
            raise ValueError(f"'depth' must be >= 1, got {depth!r}")
        self.in_flight = [0] * num_actors
        self.depth = depth
        self.backlog = backlog
        self._changed = threading.Condition()

    def acquire(self) -> int:
        """Wait until an actor may take one more message; return its index.

        An idle actor always may. A busy one (all are busy) may only while at
        least one message per actor still waits, so the last messages of a
        phase go to actors as they become idle.
        """
        with self._changed:
            while True:
                index = min(range(len(self.in_flight)), key=self.in_flight.__getitem__)
                load = self.in_flight[index]
                if load == 0 or (load < self.depth and self.backlog() >= len(self.in_flight)):
                    self.in_flight[index] += 1
                    return index
                self._changed.wait(0.05)  # also re-reads the backlog, which grows without notifying

    def add(self, num_actors: int) -> None:
        """Actors were added to the pool (indices after the current ones)."""
        with self._changed:
            self.in_flight += [0] * num_actors
            self._changed.notify_all()

    def release(self, index: int) -> None:
        """A message on actor ``index`` ended (replied or failed)."""
        with self._changed:
            self.in_flight[index] -= 1
            self._changed.notify_all()


def registering_queue(original: Callable[..., None]) -> Callable[..., None]:
    """Wrap the engine's delivery loop (``add_messages_to_queue``) to register the queue it fills."""

    @functools.wraps(original)
    def deliver(state: Any, queue: Queue, *args: Any, **kwargs: Any) -> None:
        print(ANNOUNCEMENT, flush=True)  # here, not in apply(): flwr-simulation mirrors a run's output into its log
        ENGINE_QUEUE.register(queue)
        original(state, queue, *args, **kwargs)

    return deliver


@functools.cache
def pipelined_classes() -> tuple[type, type]:
    """(``PipelinedActorPool``, ``PipelinedRayBackend``): subclasses of Flower's, made on first use (imports Ray)."""
    import ray
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend
    from flwr.simulation.ray_transport.ray_actor import BasicActorPool, ClientAppActor

    class PipelinedActorPool(BasicActorPool):
        """Flower's ``BasicActorPool`` placing messages by :class:`ActorSlots` (up to ``depth`` per actor)."""

        def __init__(self, *args: Any, depth: int = DEPTH, backlog: Callable[[], int] = ENGINE_QUEUE.backlog,
                     **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.depth, self.backlog = depth, backlog
            self.actors: list[Any] = []
            self.slots = ActorSlots(0, depth=depth, backlog=backlog)

        def add_actors_to_pool(self, num_actors: int) -> None:
            self.actors += [self.create_actor_fn() for _ in range(num_actors)]
            self.num_actors = len(self.actors)
            self.pool = list(self.actors)  # what Flower's terminate_all_actors() stops
            self.slots.add(num_actors)

        def is_actor_available(self) -> bool:
            return any(load < self.depth for load in self.slots.in_flight)

        def submit(self, actor_fn: Any, job: tuple[Any, Any, str, Any]) -> Any:
            index = self.slots.acquire()
            app_fn, message, cid, context = job
            try:
                future = actor_fn(self.actors[index], app_fn, message, cid, context)
            except BaseException:
                self.slots.release(index)
                raise
            self._future_to_actor[future] = index
            return future

        def add_actor_back_to_pool(self, future: Any) -> None:
            index = self._future_to_actor.pop(future, None)
            if index is not None:
                self.slots.release(index)

        def fetch_result_and_return_actor_to_pool(self, future: Any) -> tuple[Any, Any]:
            _, message, context = ray.get(future)  # raising: Flower's process_message gives the actor back
            self.add_actor_back_to_pool(future)
            return message, context

    class PipelinedRayBackend(RayBackend):
        """Flower's ``RayBackend`` with a :class:`PipelinedActorPool` and a worker thread per message in flight."""

        @property
        def num_workers(self) -> int:
            return self.pool.num_actors * self.pool.depth if self.pool else 0

        def build(self, app_fn: Callable[[], Any]) -> None:
            self.pool = PipelinedActorPool(actor_type=ClientAppActor, client_resources=self.client_resources,
                                           actor_kwargs=self.actor_kwargs)
            self.pool.add_actors_to_pool(self.pool.actors_capacity)
            self.app_fn = app_fn

    return PipelinedActorPool, PipelinedRayBackend


def _targets() -> dict[str, Callable[..., Any]]:
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.fleet.vce.backend import raybackend
    from flwr.simulation.ray_transport.ray_actor import BasicActorPool

    backend = raybackend.RayBackend
    backend = backend.__mro__[1] if getattr(backend, "_fedseg_pipelined", False) else backend
    return {"RayBackend.build": backend.build, "RayBackend.process_message": backend.process_message,
            "BasicActorPool.__init__": BasicActorPool.__init__, "BasicActorPool.submit": BasicActorPool.submit,
            "BasicActorPool.add_actor_back_to_pool": BasicActorPool.add_actor_back_to_pool,
            "BasicActorPool.fetch_result_and_return_actor_to_pool":
                BasicActorPool.fetch_result_and_return_actor_to_pool,
            "BasicActorPool.terminate_all_actors": BasicActorPool.terminate_all_actors,
            "vce_api.run_api": vce_api.run_api, "vce_api.worker": vce_api.worker}


def mismatch(*, checker: Checker | None = None) -> str | None:
    """Why Flower's actor pool must not be replaced here, or None if it is the code checked.

    ``checker`` is :func:`simulations.engine_patches.code_mismatch` (the launcher
    passes the copy it loaded; by default it is imported).
    """
    if checker is None:
        from simulations.engine_patches import code_mismatch as checker
    return checker(EXPECTED_SOURCES, _targets())


def apply(*, checker: Checker | None = None) -> bool:
    """Replace Flower's Ray backend in this process; False (and a warning) if this Flower is not the one checked.

    ``checker``: as for :func:`mismatch`.
    """
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.fleet.vce.backend import raybackend

    reason = mismatch(checker=checker)
    if reason is not None:
        LOG.warning("Ray actors left with one message at a time: %s", reason)
        return False
    if not getattr(raybackend.RayBackend, "_fedseg_pipelined", False):
        backend = pipelined_classes()[1]
        backend._fedseg_pipelined = True
        raybackend.RayBackend = backend
        vce_api.add_messages_to_queue = registering_queue(vce_api.add_messages_to_queue)
    return True
