"""The compute a simulated round stands for, done in a plain loop (no Flower, no Ray, no fedseg client).

For the framework-overhead figure of ``benchmarks/scale.py``: the same sites a
round trained and evaluated, the same work per site, on the same number of
worker processes as the simulation has Ray actors (one torch thread each, warm),
with the same barriers: between a round's training and evaluation phase, or,
with ``overlap-evaluation``, one per round after a round's evaluation and the
next round's training, sent together.

Per site, the plain loop does what a site's handlers do minus everything
fedseg and Flower add around it:

- train: preprocess the site's training cases from their files (MONAI
  pipeline; a site seen for the first time does the same, plus a cache write),
  build the model and load the global weights, run local training with the
  round's settings (with DP on: Opacus DP-SGD, Poisson sampling, the same
  steps; the privacy ledger is not charged), take the weights out;
- evaluate: preprocess the validation cases, build the model, evaluate
  (Dice, HD95, loss).

Not included (the framework's share): messages and their (de)serialisation,
Ray, the server's sampling/checks/spooling/aggregation/checkpoints, the egress
guard and audit log, the privacy ledger, the case cache, reading the sites
manifest, memory release after each message.
"""

from __future__ import annotations

import multiprocessing
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self


@dataclass(frozen=True)
class SiteWork:
    """One site's part of a round: ``kind`` is ``"train"`` or ``"evaluate"``."""

    kind: str
    datalist: str
    delta: float
    max_epsilon: float


@dataclass(frozen=True)
class LoopTiming:
    """Wall seconds of the plain loop over one round's work and the CPU seconds its workers used."""

    wall_s: float
    cpu_s: float


_WORKER: dict[str, Any] = {}


def _init_worker(run_config: dict[str, Any], model_path: str, warm_up: list[SiteWork], barrier: Any) -> None:
    import torch

    from client.inference.model_files import plan_of_model
    from shared.cli import quiet_optional_codec_notice
    from shared.config import RunConfig
    from shared.model_file import read_model_file

    quiet_optional_codec_notice()
    torch.set_num_threads(1)  # as a simulated client: Ray gives an actor with num_cpus=1 one thread
    _WORKER.update(config=RunConfig.from_mapping(run_config), model_path=Path(model_path), barrier=barrier)
    try:
        _WORKER["plan"] = plan_of_model(read_model_file(model_path), Path(model_path))
        for work in warm_up:  # imports and first-call costs, as in a warm Ray actor
            do_site_work(work)
    except Exception as exc:  # noqa: BLE001 - raised by _rendezvous: a pool re-spawns workers whose initializer fails
        _WORKER["error"] = exc


def _rendezvous(_: int) -> None:
    if "error" in _WORKER:
        raise RuntimeError(f"plain-loop worker could not warm up: {_WORKER['error']!r}") from _WORKER["error"]
    _WORKER["barrier"].wait()  # returns once every worker holds one of these tasks: all are warm


def do_site_work(work: SiteWork) -> float:
    """Do one site's work in this worker; return the CPU seconds it took."""
    import torch

    from client.data.site_data import load_training_cases, load_validation_cases
    from client.training.local import evaluate_local
    from shared.model_file import load_model
    from shared.weights import model_to_arrays

    config, plan, device = _WORKER["config"], _WORKER["plan"], torch.device("cpu")
    started = time.process_time()
    model, _ = load_model(_WORKER["model_path"])
    if work.kind == "train":
        cases, augment = load_training_cases(Path(work.datalist), plan)
        _train(model, cases, augment, config=config, plan=plan, delta=work.delta, max_epsilon=work.max_epsilon,
               device=device)
        model_to_arrays(model)
    else:
        evaluate_local(model, load_validation_cases(Path(work.datalist), plan), plan=plan, device=device)
    return time.process_time() - started


def _train(model: Any, cases: list, augment: Any, *, config: Any, plan: Any, delta: float, max_epsilon: float,
           device: Any) -> None:
    import torch

    from client.data.loading import training_loader
    from client.training.dp_sgd import plan_round, private_generator, train_local_dp
    from client.training.local import make_loss, train_local

    loss_fn = make_loss(model_config=plan.model_config())
    if config.dp:
        mechanism = plan_round(config=config, plan=plan, num_cases=len(cases), delta=delta, max_epsilon=max_epsilon)
        loader = training_loader(cases, augment, batch_size=plan.batch_size, generator=private_generator())
        train_local_dp(model, loader, config=config, plan=mechanism, device=device, loss_fn=loss_fn)
    else:
        loader = training_loader(cases, augment, batch_size=plan.batch_size, steps=plan.local_steps,
                                 generator=torch.Generator().manual_seed(0))
        train_local(model, loader, config=config, device=device, num_examples=len(cases), loss_fn=loss_fn)


class PlainLoop:
    """A pool of ``workers`` warm processes that time rounds of site work.

    Parameters
    ----------
    run_config : dict
        The run's config (kebab-case keys), as in ``summary.json``.
    model_path : Path
        A model file of the run (its architecture and weights are loaded per site).
    workers : int
        Worker processes: the number of Ray actors the simulation ran.
    warm_up : list of SiteWork
        Work each worker does once before any timing.
    """

    def __init__(self, *, run_config: dict[str, Any], model_path: Path, workers: int,
                 warm_up: list[SiteWork]) -> None:
        context = multiprocessing.get_context("spawn")  # no fork of a process that holds torch threads
        barrier = context.Barrier(workers)
        self.pool = context.Pool(workers, initializer=_init_worker,
                                 initargs=(run_config, str(model_path), warm_up, barrier))
        try:
            self.pool.map(_rendezvous, range(workers), chunksize=1)
        except BaseException:
            self.pool.terminate()
            raise

    def time_step(self, *, train: list[SiteWork], evaluate: list[SiteWork], together: bool = False) -> LoopTiming:
        """Train then evaluate; return wall and CPU seconds.

        Without ``together`` all training finishes before any evaluation starts
        (a round's two phases); with it, both go out at once, training first (a
        round's evaluation overlapped with the next round's training).
        """
        started = time.perf_counter()
        if together:
            cpu = sum(self.pool.map(do_site_work, train + evaluate, chunksize=1))
        else:
            cpu = sum(self.pool.map(do_site_work, train, chunksize=1))
            cpu += sum(self.pool.map(do_site_work, evaluate, chunksize=1))
        return LoopTiming(wall_s=time.perf_counter() - started, cpu_s=cpu)

    def close(self) -> None:
        """Stop the worker processes."""
        self.pool.close()
        self.pool.join()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
