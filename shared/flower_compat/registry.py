"""Every Flower internal fedseg replaces at run time: what, where, why, and what it was checked against.

One entry per replacement (:class:`~.gate.Replacement`); :func:`~.gate.install`
makes a process kind's entries all together or none. Measured figures:
BENCHMARKS.md (sections named in each reason). Upgrading Flower: README,
"Upgrading Flower" (``tests/test_flower_compat.py`` checks this table
against the installed Flower).
"""

from __future__ import annotations

from .gate import PROCESSES, Replacement

VCE = "flwr.server.superlink.fleet.vce.vce_api"
LINKSTATE = "flwr.server.superlink.linkstate.in_memory_linkstate:InMemoryLinkState"
GRID = "flwr.superlink.grid:InMemoryGrid"
RAY = "flwr.server.superlink.fleet.vce.backend.raybackend"
POOL = "flwr.simulation.ray_transport.ray_actor:BasicActorPool"
INFLATABLE = "flwr.supercore.inflatable.inflatable_utils"
SUPERNODE_LOOP = "flwr.supernode.start_client_internal"
SUPEREXEC = "flwr.supercore.superexec.run_superexec"

_SWEEP = ("Flower's engine asks the link state every 0.1 s for a message for EVERY node, each ask scanning every "
          "stored message: ~45 ms CPU per sweep at 1000 nodes, and up to 0.1 s before a worker sees a message; "
          "flwr-simulation's CPU share fell 0.22x -> 0.07x of the plain loop (BENCHMARKS.md, 'The engine patch')")
_IDLE_POLL_UPSTREAM = ("none makes the 3 s a setting; only the SuperExec poll became one (flwrlabs/flower#8041); "
                       "a Grid pull-interval property (flwrlabs/flower#5743) was closed unmerged")

REGISTRY: tuple[Replacement, ...] = (
    # -- simulation engine (flwr-simulation, started through simulations/engine_launcher.py) --
    Replacement("record-stored-messages", "simulation-engine", f"{LINKSTATE}.store_message_ins", "wrap",
                (f"{LINKSTATE}.store_message_ins",), "engine.recording_store(reply=False)",
                "remembers each stored message's node so the engine hands it over at once. " + _SWEEP),
    Replacement("count-stored-replies", "simulation-engine", f"{LINKSTATE}.store_message_res", "wrap",
                (f"{LINKSTATE}.store_message_res",), "engine.recording_store(reply=True)",
                "counts stored replies, for InMemoryGrid.wait_for_replies"),
    Replacement("record-partitions", "simulation-engine", f"{VCE}:_register_nodes", "wrap",
                (f"{VCE}:_register_nodes",), "engine.recording_partitions",
                "remembers which partition each virtual node serves, for InMemoryGrid.sampling_order"),
    Replacement("deliver-on-store", "simulation-engine", f"{VCE}:add_messages_to_queue", "replace",
                (f"{VCE}:add_messages_to_queue", f"{LINKSTATE}.get_message_ins"), "engine.add_messages_on_arrival",
                "asks only for the node a message was just stored for (a full sweep every 3 s as a safety net). "
                + _SWEEP),
    Replacement("grid-wait-for-replies", "simulation-engine", f"{GRID}.wait_for_replies", "add",
                (f"{GRID}.__init__",), "engine.wait_for_replies",
                "server.polling_grid.PollingGrid returns as soon as a reply is stored instead of sleeping its "
                "0.05 s poll (BENCHMARKS.md, 'The engine patch')"),
    Replacement("grid-sampling-order", "simulation-engine", f"{GRID}.sampling_order", "add",
                (f"{VCE}:_register_nodes",), "engine.sampling_order",
                "Flower draws new random node ids every run, so seeded sampling over sorted ids picked other "
                "sites each run; by partition a seed (and a resumed run) samples the same sites"),
    Replacement("pipelined-ray-backend", "simulation-engine", f"{RAY}:RayBackend", "wrap",
                (f"{RAY}:RayBackend.build", f"{RAY}:RayBackend.process_message", f"{POOL}.__init__",
                 f"{POOL}.submit", f"{POOL}.add_actor_back_to_pool", f"{POOL}.fetch_result_and_return_actor_to_pool",
                 f"{POOL}.terminate_all_actors", f"{VCE}:run_api", f"{VCE}:worker"),
                "actor_pipeline.pipelined_classes()[1] (a subclass of Flower's)",
                "up to 2 messages in flight per Ray actor: the 3.4-3.9 ms hand-over gap between messages (~5% of a "
                "round with small sites) fell to 1.3-2.3 ms (BENCHMARKS.md, 'Two messages in flight per Ray actor')"),
    Replacement("register-engine-queue", "simulation-engine", f"{VCE}:add_messages_to_queue", "wrap",
                (f"{VCE}:run_api", f"{VCE}:worker"), "actor_pipeline.registering_queue",
                "lets the pipelined actor pool see the engine's backlog (queue a 2nd message only while one per "
                "actor still waits)"),
    # -- SuperNode (deploy/supernode.py) --
    Replacement("supernode-poll-clock", "supernode", f"{SUPERNODE_LOOP}:time", "replace", (SUPERNODE_LOOP,),
                "nodes.PollClock",
                "the node sleeps a hard-coded 3 s whenever a pull finds no message (twice a round) and checks for "
                "the ClientApp's reply every 0.5 s: stock 7.5 s a round with a warm executor, 2.2 s shortened "
                "(DESIGN.md, BENCHMARKS.md deploy latency)", _IDLE_POLL_UPSTREAM),
    Replacement("supernode-first-object-retry", "supernode", f"{INFLATABLE}:pull_objects", "default",
                (f"{INFLATABLE}:pull_objects",), "initial_backoff 0.1 s (Flower: 1 s, then doubling)",
                "the node can pull a message before the server has pushed all its objects; a missing object is "
                "retried after 1 s, 2 s, ..."),
    # -- warm ClientApp executor (deploy/clientapp_executor.py) --
    Replacement("clientapp-first-object-retry", "clientapp-executor", f"{INFLATABLE}:pull_and_inflate_object_from_tree",
                "default", (f"{INFLATABLE}:pull_and_inflate_object_from_tree",),
                "initial_backoff 0.05 s (Flower: 1 s, then doubling)",
                "Flower starts the ClientApp before its node has the message's objects; the ClientApp then backs "
                "off 1 s, 2 s, ..."),
    Replacement("forking-executor", "clientapp-executor", f"{SUPEREXEC}:get_executor", "replace",
                (f"{SUPEREXEC}:get_executor", f"{SUPEREXEC}:run_superexec"),
                "deploy/clientapp_executor.ForkingClientAppExecutor",
                "a fresh flwr-clientapp per message imports torch + MONAI again (seconds, twice a round); the warm "
                "executor forks a preloaded process instead (deploy/README.md, round latency)"),
    # -- ServerApp in a deployment (flwr-serverapp; in a simulation the engine's entries cover its process) --
    Replacement("serverapp-first-object-retry", "serverapp", f"{INFLATABLE}:pull_objects", "default",
                (f"{INFLATABLE}:pull_objects",), "initial_backoff 0.05 s (Flower: 1 s, then doubling)",
                "HttpGrid pulls a reply's objects, which a node pushes after the reply itself: a server polling "
                "every 0.1 s often finds a reply before its objects and then waited 1 s"),
)


def entries_of(process: str) -> tuple[Replacement, ...]:
    """The registry's entries made in ``process`` (one of :data:`~.gate.PROCESSES`), in the order they are made."""
    if process not in PROCESSES:
        raise ValueError(f"'process' must be one of {PROCESSES}, got {process!r}")
    return tuple(entry for entry in REGISTRY if entry.process == process)
