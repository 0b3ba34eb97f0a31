"""Flower 1.41's Ray actors, each handed its next message while it still runs one.

Flower's simulation engine gives each Ray actor one message at a time: a
worker thread submits the message, waits for the reply, stores it, and only
then submits the next. Each hand-over costs a Ray round trip (~3.5 ms on two
busy cores, BENCHMARKS.md scale section) during which the actor sits idle;
with small sites (~80 ms of work per message) that is ~5% of a round.

In the ``flwr-simulation`` process only (:func:`.engine.install`, entries
``pipelined-ray-backend`` and ``register-engine-queue`` of :mod:`.registry`),
Flower's ``RayBackend`` is replaced with a subclass whose actor pool
(:class:`PipelinedActorPool`) lets each actor hold up to :data:`DEPTH` messages: Ray queues the second on the actor, which
starts it the moment the first ends. A message goes to the actor with the
fewest messages in flight; it is queued behind a busy actor only while the
engine's queue still holds at least one message per actor, so at the end of
a phase no message waits behind a busy actor while another actor is idle.

Guarded with the engine's replacements by the one gate (:mod:`.gate`): on
any Flower but the code checked, nothing is changed.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from queue import Queue
from typing import Any

DEPTH = 2  # messages in flight per actor
ANNOUNCEMENT = (f"[fedseg] simulation engine: up to {DEPTH} messages in flight per Ray actor "
                "(shared/flower_compat/actor_pipeline.py)")


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
