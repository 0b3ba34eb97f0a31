"""shared/flower_compat/actor_pipeline.py: where the next message goes, and the guard on Flower's code."""

from __future__ import annotations

import subprocess
import threading

import pytest

from shared.flower_compat import engine, gate
from shared.flower_compat.actor_pipeline import ActorSlots
from shared.flower_compat.registry import entries_of
from simulations import engine_launcher


def waiting_acquire(slots: ActorSlots) -> tuple[threading.Thread, list[int]]:
    """Start ``slots.acquire()`` in a thread and check that it waits; the thread and what it got."""
    got: list[int] = []
    thread = threading.Thread(target=lambda: got.append(slots.acquire()), daemon=True)
    thread.start()
    thread.join(0.3)
    assert thread.is_alive() and got == []
    return thread, got


def test_a_message_goes_to_an_idle_actor_first():
    slots = ActorSlots(3, depth=2, backlog=lambda: 100)
    assert sorted(slots.acquire() for _ in range(3)) == [0, 1, 2]
    assert slots.in_flight == [1, 1, 1]


def test_a_message_queues_behind_a_busy_actor_while_every_actor_has_more_work_coming():
    slots = ActorSlots(2, depth=2, backlog=lambda: 2)
    assert [slots.acquire() for _ in range(4)] == [0, 1, 0, 1]
    thread, got = waiting_acquire(slots)  # both actors hold `depth` messages: the fifth waits
    slots.release(1)
    thread.join(2)
    assert got == [1] and slots.in_flight == [2, 2]


def test_at_the_end_of_a_phase_a_message_waits_for_an_idle_actor_instead_of_queueing():
    backlog = [1]  # fewer messages left than actors: queueing one behind a busy actor could idle another
    slots = ActorSlots(2, depth=2, backlog=lambda: backlog[0])
    assert [slots.acquire(), slots.acquire()] == [0, 1]
    thread, got = waiting_acquire(slots)
    slots.release(0)
    thread.join(2)
    assert got == [0] and slots.in_flight == [1, 1]


def test_a_waiting_message_is_queued_once_more_work_arrives():
    backlog = [0]
    slots = ActorSlots(2, depth=2, backlog=lambda: backlog[0])
    slots.acquire(), slots.acquire()
    thread, got = waiting_acquire(slots)
    backlog[0] = 5  # a new phase's messages arrived (the queue does not notify: the wait re-reads it)
    thread.join(2)
    assert len(got) == 1 and sum(slots.in_flight) == 3


def test_a_message_waiting_for_an_actor_takes_one_added_to_the_pool():
    slots = ActorSlots(1, depth=1, backlog=lambda: 0)
    assert slots.acquire() == 0
    thread, got = waiting_acquire(slots)
    slots.add(1)
    thread.join(2)
    assert got == [1] and slots.in_flight == [1, 1]


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match="'depth'"):
        ActorSlots(2, depth=0, backlog=lambda: 0)


def test_the_installed_flower_is_the_code_the_pipeline_was_checked_against():
    assert gate.mismatch(entries_of("simulation-engine")) is None


def test_other_flower_code_keeps_flowers_actor_pool(monkeypatch, caplog):
    from flwr.server.superlink.fleet.vce.backend import raybackend

    checked = gate.CHECKED_SOURCES[gate.installed_flwr_version()]
    monkeypatch.setitem(checked, "flwr.simulation.ray_transport.ray_actor:BasicActorPool.submit", "0" * 64)
    original = raybackend.RayBackend
    assert engine.install() is False
    assert raybackend.RayBackend is original
    assert "runs stock Flower" in caplog.text and "BasicActorPool.submit" in caplog.text


def test_the_pipeline_is_made_and_undone_with_the_engine():
    from flwr.server.superlink.fleet.vce.backend import raybackend

    original = raybackend.RayBackend
    assert engine.install()
    try:
        assert raybackend.RayBackend.__mro__[1] is original and raybackend.RayBackend.num_workers
    finally:
        gate.restore("simulation-engine")
    assert raybackend.RayBackend is original


def test_the_launcher_loads_the_pipeline_and_still_starts_flowers_entry_point(tmp_path):
    launcher = engine_launcher.write_launcher(tmp_path / "bin")
    assert "flower_compat" in launcher.read_text()  # that it ran: tests/test_simulation_integration.py (log)
    done = subprocess.run([str(launcher), "--help"], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "--runtime-api-address" in done.stdout
