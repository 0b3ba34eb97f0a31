"""The simulation engine's replacements (shared/flower_compat/engine.py), on Flower's real in-memory link state and Grid."""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from queue import Queue

import pytest
from flwr.app import Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.proto.task_pb2 import Task  # pylint: disable=no-name-in-module
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import InMemoryLinkState, LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid

from server.polling_grid import PollingGrid
from shared.flower_compat import engine as engine_patches
from shared.flower_compat import gate
from simulations import engine_launcher

NODES = 300


@pytest.fixture
def patched_flower(monkeypatch):
    """Make the engine's replacements for one test; the gate puts Flower back afterwards."""
    monkeypatch.setattr(engine_patches, "NODE_PARTITIONS", engine_patches.NodePartitions())
    assert engine_patches.install()
    yield
    gate.restore("simulation-engine")


@pytest.fixture
def federation():
    """Flower's in-memory link state with ``NODES`` registered nodes, one run, and its Grid (as the engine sets up)."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    nodes = vce_api._register_nodes(NODES, factory)
    run = Run.create_empty(run_id=11)
    run.primary_task_id, run.federation_id = 5, NOOP_FEDERATION_ID
    state = factory.state()
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[5] = Task(task_id=5, run_id=run.run_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run.run_id, SUPERLINK_NODE_ID
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    yield state, grid, nodes
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


class CountingState:
    """The real link state, counting the engine's asks for messages."""

    def __init__(self, state: InMemoryLinkState) -> None:
        self.state, self.asks = state, 0

    def get_message_ins(self, **kwargs):
        self.asks += 1
        return self.state.get_message_ins(**kwargs)

    def __getattr__(self, name: str):
        return getattr(self.state, name)


@contextlib.contextmanager
def engine_loop(state, nodes):
    """Run the engine's message loop (whatever ``vce_api.add_messages_to_queue`` now is) in a thread."""
    queue, stop = Queue(), threading.Event()
    counting = CountingState(state)
    engine_patches.signals_of(counting).arrivals = engine_patches.signals_of(state).arrivals
    thread = threading.Thread(target=vce_api.add_messages_to_queue, args=(counting, queue, nodes, stop))
    thread.start()
    try:
        yield queue, counting
    finally:
        stop.set()
        thread.join()


def reply_to(message: Message) -> Message:
    reply = Message(RecordDict(), reply_to=message)
    reply.metadata.__dict__["_message_id"] = reply.object_id  # as Flower's engine does for a ClientApp's reply
    return reply


def test_a_message_reaches_the_engine_when_stored_without_sweeping_every_node(patched_flower, federation):
    state, grid, nodes = federation
    with engine_loop(state, nodes) as (queue, counting):
        time.sleep(0.5)  # idle: the stock engine would ask for all 300 nodes 5 times here
        node = list(nodes)[123]
        started = time.monotonic()
        grid.push_messages([grid.create_message(RecordDict(), "train", node, "g")])
        delivered = queue.get(timeout=2.0)
        assert time.monotonic() - started < 0.09  # slack for a loaded machine; asks == 1 tells it from stock
        assert delivered.metadata.dst_node_id == node
        assert counting.asks == 1


def test_a_message_stored_behind_the_patch_is_still_delivered_by_the_safety_sweep(patched_flower, federation,
                                                                                   monkeypatch):
    monkeypatch.setattr(engine_patches, "SAFETY_SWEEP_S", 0.3)
    state, grid, nodes = federation
    with engine_loop(state, nodes) as (queue, counting):
        stored = []
        for kind in ("train", "evaluate"):  # two for one node, as an overlapped round sends
            message = grid.create_message(RecordDict(), kind, list(nodes)[7], "g")
            message.metadata.__dict__["_message_id"] = message.object_id  # as InMemoryGrid.push_messages does
            InMemoryLinkState.store_message_ins.__wrapped__(state, message)  # Flower's own: unrecorded
            stored.append(message.metadata.message_id)
        first = queue.get(timeout=2.0)
        second = queue.get(timeout=0.2)  # in the same sweep, not the next one 0.3 s later
        assert sorted(m.metadata.message_id for m in (first, second)) == sorted(stored)
        time.sleep(0.7)  # two more sweeps, with nothing left to deliver
        assert counting.asks == 2  # the sweeps asked only for the node that had messages, not all 300


def test_the_grid_wakes_as_soon_as_a_reply_is_stored(patched_flower, federation):
    state, grid, nodes = federation
    with engine_loop(state, nodes) as (queue, _):
        ids = list(grid.push_messages([grid.create_message(RecordDict(), "train", list(nodes)[0], "g")]))
        timer = threading.Timer(0.2, lambda: state.store_message_res(reply_to(queue.get(timeout=2.0))))
        timer.start()
        started = time.monotonic()
        grid.wait_for_replies(5.0)
        assert 0.15 < time.monotonic() - started < 2.0
        assert [r.metadata.reply_to_message_id for r in grid.pull_messages(ids)] == ids
        timer.join()


def test_polling_grid_collects_a_reply_without_waiting_a_poll_interval(patched_flower, federation):
    state, grid, nodes = federation
    with engine_loop(state, nodes) as (queue, _):
        answer = threading.Thread(target=lambda: (time.sleep(0.2), state.store_message_res(reply_to(queue.get()))))
        answer.start()
        replies: list[Message] = []
        started = time.monotonic()
        message = grid.create_message(RecordDict(), "train", list(nodes)[1], "g")
        unanswered = PollingGrid(grid, poll_interval_s=5.0).exchange([message], timeout=30.0,
                                                                      on_reply=replies.append)
        assert unanswered == [] and len(replies) == 1
        assert time.monotonic() - started < 2.0  # a fixed 5 s poll would have waited 5 s
        answer.join()


def test_other_flower_code_is_left_stock(monkeypatch, caplog):
    checked = gate.CHECKED_SOURCES[gate.installed_flwr_version()]
    monkeypatch.setitem(checked, "flwr.server.superlink.fleet.vce.vce_api:add_messages_to_queue", "0" * 64)
    original = vce_api.add_messages_to_queue
    assert engine_patches.install() is False
    assert vce_api.add_messages_to_queue is original
    assert not hasattr(InMemoryGrid, "wait_for_replies")
    warnings = [r.getMessage() for r in caplog.records if gate.WARNING_PREFIX in r.getMessage()]
    assert len(warnings) == 1 and "simulation-engine runs stock Flower" in warnings[0]
    assert "add_messages_to_queue is not the code fedseg checked" in warnings[0]


def test_the_launcher_starts_flowers_simulation_entry_point_with_the_patch(tmp_path):
    launcher = engine_launcher.write_launcher(tmp_path / "bin")
    done = subprocess.run([str(launcher), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--runtime-api-address" in done.stdout  # Flower's own flwr-simulation argument parser


def test_virtual_nodes_are_sampled_by_partition_not_by_their_random_ids(patched_flower, federation):
    _, grid, nodes = federation
    ids = list(grid.get_node_ids())
    ordered = PollingGrid(grid).sampling_order(ids)
    assert [nodes[node] for node in ordered] == list(range(NODES))
    assert ordered != sorted(ids)  # Flower's ids are random: in id order the partitions would be shuffled
