"""Benchmark: a federation of many virtual hospitals on one machine.

Measures, in one run:

1. peak memory (RSS summed over the harness and every process it starts:
   SuperLink, simulation engine, Ray workers) per round, and seconds per round;
2. framework overhead: wall time of a simulated round divided by the wall
   time of the same sites' work in a plain loop (``benchmarks/scale_plain_loop.py``:
   same sites, same steps, as many warm worker processes as the simulation had
   Ray actors), measured right after the run; and the CPU seconds both used
   (every process of the simulation vs the plain loop's workers), which other
   jobs on a shared machine disturb less than wall time.

Usage (from the repo root, after ``make setup``)::

    .venv/bin/python -m benchmarks.scale --sites 1000 --per-round 20 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.report import write_section
from benchmarks.scale_plain_loop import PlainLoop, SiteWork
from shared.cli import exit_on_sigterm, quiet_optional_codec_notice
from shared.processes import descendants
from simulations.api import SimulationSpec, run_simulation

ROUND_LINE = re.compile(r"round (\d+)/\d+")


class ProcessSampler(threading.Thread):
    """Samples the summed RSS and CPU seconds of every process below this one.

    The process tree is re-read every ``refresh_every`` samples (walking /proc
    costs milliseconds); a process that ended keeps the CPU seconds it last had.
    This process itself (the benchmark and its sampler) is left out.
    """

    def __init__(self, interval_s: float = 0.25, refresh_every: int = 4) -> None:
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.refresh_every = refresh_every
        self.samples: list[tuple[float, int, float]] = []  # (time, RSS bytes, CPU seconds)
        self.stopped = threading.Event()
        self.marks: list[tuple[float, float]] = []  # (time, CPU seconds) taken by mark()
        self.by_role: list[dict[str, float]] = []  # CPU seconds per process role, at each mark
        self._cpu: dict[int, float] = {}
        self._roles: dict[int, str] = {}
        self._pids: list[int] = []
        self._lock = threading.Lock()

    def run(self) -> None:
        count = 0
        while not self.stopped.is_set():
            if count % self.refresh_every == 0:
                self._pids = descendants(os.getpid())
                self._update_roles()
            count += 1
            rss = _rss_bytes(os.getpid())  # the harness' own memory counts, its CPU (this sampler) not
            rss += sum(_rss_bytes(pid) for pid in self._pids)
            self.samples.append((time.monotonic(), rss, self._read_cpu()))
            time.sleep(self.interval_s)

    def mark(self) -> float:
        """Record (now, CPU seconds of the tree now); return now."""
        now = time.monotonic()
        self.marks.append((now, self._read_cpu()))
        self._update_roles()
        roles: dict[str, float] = {}
        for pid, cpu in self._cpu.items():
            role = self._roles.get(pid, ROLES[-1][1])
            roles[role] = roles.get(role, 0.0) + cpu
        self.by_role.append(roles)
        return now

    def _update_roles(self) -> None:
        for pid in self._pids:  # re-read each time: Ray renames its worker processes once they host an actor
            role = _role(pid)
            if role is not None:
                self._roles[pid] = role

    def _read_cpu(self) -> float:
        with self._lock:
            for pid in list(self._pids):
                cpu = _cpu_seconds(pid)
                if cpu is not None:
                    self._cpu[pid] = cpu
            return sum(self._cpu.values())

    def peak_between(self, start: float, end: float) -> int:
        return max((rss for t, rss, _ in self.samples if start <= t <= end), default=0)

    def cpu_at(self, moment: float) -> float:
        """CPU seconds the tree had used at ``moment`` (a time :meth:`mark` returned, or the last sample before)."""
        taken = [cpu for t, cpu in self.marks if t == moment]
        return taken[0] if taken else max((cpu for t, _, cpu in self.samples if t <= moment), default=0.0)


ROLES = (("ClientAppActor", "Ray actors (the ClientApps)"),
         ("flwr-simulation", "flwr-simulation (simulation engine + ServerApp)"),
         ("flower-superlink", "SuperLink, SuperExec, flwr run"),
         ("flower-superexec", "SuperLink, SuperExec, flwr run"),
         ("flwr run", "SuperLink, SuperExec, flwr run"),
         ("", "Ray daemons and others"))


def _role(pid: int) -> str | None:
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None  # ended: keep the role it had
    return next(role for fragment, role in ROLES if fragment in command)


def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def run(args: argparse.Namespace) -> dict[str, Any]:
    marks: list[tuple[float, int]] = []
    sampler = ProcessSampler()

    def on_progress(line: str) -> None:
        match = ROUND_LINE.search(line)
        if match and "trained" in line:
            marks.append((sampler.mark(), int(match.group(1))))

    spec = SimulationSpec(sites=args.sites, sites_per_round=args.per_round, rounds=args.rounds, seed=args.seed,
                          out=args.out, min_cases=args.min_cases, max_cases=args.max_cases, timeout_s=7200,
                          cpus_per_client=args.cpus_per_client, stock_engine=args.stock_engine)
    sampler.start()
    load_before = os.getloadavg()
    started = time.monotonic()
    run_simulation(spec, echo=True, on_progress=on_progress)
    sampler.stopped.set()
    sampler.join()
    run_dir = (args.out / "latest").resolve()
    workers = max(1, int((os.cpu_count() or 1) / args.cpus_per_client))  # Ray actors the simulation had
    rounds = simulated_rounds(run_dir, marks, sampler, started=started)
    first, last = sampler.by_role[0], sampler.by_role[-1]  # at the end of round 1 and of the last round
    cpu_by_role = {role: round(last[role] - first.get(role, 0.0), 2) for role in last}
    load_after_run = os.getloadavg()
    time_plain_loop(run_dir, rounds, workers=workers)
    return {"sites": args.sites, "per_round": args.per_round, "rounds": rounds, "workers": workers,
            "cpu_by_role": cpu_by_role,
            "cores": os.cpu_count(), "min_cases": args.min_cases, "max_cases": args.max_cases,
            "peak_rss_gib": round(max(rss for _, rss, _ in sampler.samples) / 2**30, 3),
            "load": [round(x, 1) for x in (load_before[0], load_after_run[0], os.getloadavg()[0])]}


def simulated_rounds(run_dir: Path, marks: list[tuple[float, int]], sampler: ProcessSampler, *,
                     started: float) -> list[dict[str, Any]]:
    """Per round: the sites that trained and evaluated, wall seconds, CPU seconds, peak RSS."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds, previous = [], started
    for mark_time, server_round in marks:
        site_rows = [r for r in rows if r["round"] == server_round and r["site"] != "global"]
        wall = next(r["round-seconds"] for r in rows if r["round"] == server_round and r["site"] == "global")
        rounds.append({"round": server_round, "round_seconds": wall,
                       "trained": [r["site"] for r in site_rows if r.get("train-status") == "ok"],
                       "evaluated": [r["site"] for r in site_rows if r.get("evaluate-status") == "ok"],
                       "simulation_cpu_seconds": round(sampler.cpu_at(mark_time) - sampler.cpu_at(previous), 2),
                       "peak_rss_gib": round(sampler.peak_between(previous, mark_time) / 2**30, 3)})
        previous = mark_time
    return rounds


def time_plain_loop(run_dir: Path, rounds: list[dict[str, Any]], *, workers: int) -> None:
    """Add the plain loop's wall and CPU seconds to every round (``benchmarks/scale_plain_loop.py``)."""
    manifest = {s["site-id"]: s for s in json.loads((run_dir / "sites.json").read_text())["sites"]}
    summary = json.loads((run_dir / "summary.json").read_text())

    def work(kind: str, site: str) -> SiteWork:
        entry = manifest[site]
        return SiteWork(kind=kind, datalist=entry["datalist"], delta=float(entry["dp-delta"]),
                        max_epsilon=float(entry["max-epsilon"]))

    used = {s for r in rounds for s in r["trained"] + r["evaluated"]}
    spare = next((s for s in manifest if s not in used), next(iter(manifest)))
    warm_up = [work("train", spare), work("evaluate", spare)]
    with PlainLoop(run_config=summary["run_config"], model_path=run_dir / "global_model.pt", workers=workers,
                   warm_up=warm_up) as loop:
        for r in rounds:
            timing = loop.time_round(train=[work("train", s) for s in r["trained"]],
                                     evaluate=[work("evaluate", s) for s in r["evaluated"]])
            r.update(plain_loop_seconds=round(timing.wall_s, 3), plain_loop_cpu_seconds=round(timing.cpu_s, 2))


def to_markdown(result: dict[str, Any], command: str) -> str:
    header = (f"{result['sites']} virtual sites ({result['min_cases']}-{result['max_cases']} cases each), "
              f"{result['per_round']} sampled per round, default 2D model and harness settings (DP on), "
              f"{result['cores']} CPU cores, {result['workers']} Ray actors and as many plain-loop workers; "
              f"load average before the run / after it / after the plain loop: "
              f"{' / '.join(map(str, result['load']))}. Peak RSS of the whole simulation: "
              f"**{result['peak_rss_gib']} GiB**.")
    lines = [f"Command: `{command}`", "", header, "",
             ("| round | sites trained / evaluated | round s | plain loop s | round / plain loop "
              "| simulation CPU s | plain loop CPU s | CPU ratio | peak RSS GiB |"),
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [(f"| {r['round']} | {len(r['trained'])} / {len(r['evaluated'])} | {r['round_seconds']:.2f} "
               f"| {r['plain_loop_seconds']:.2f} | {_ratio(r['round_seconds'], r['plain_loop_seconds'])} "
               f"| {r['simulation_cpu_seconds']:.1f} | {r['plain_loop_cpu_seconds']:.1f} "
               f"| {_ratio(r['simulation_cpu_seconds'], r['plain_loop_cpu_seconds'])} | {r['peak_rss_gib']:.3f} |")
              for r in result["rounds"]]
    steady = [r for r in result["rounds"] if r["round"] > 1]
    if steady:
        lines += _steady_state(steady, result["cpu_by_role"])
    return "\n".join(lines) + "\n"


def _steady_state(steady: list[dict[str, Any]], cpu_by_role: dict[str, float]) -> list[str]:
    wall = sum(r["round_seconds"] for r in steady) / sum(r["plain_loop_seconds"] for r in steady)
    loop_cpu = sum(r["plain_loop_cpu_seconds"] for r in steady)
    cpu = sum(r["simulation_cpu_seconds"] for r in steady) / loop_cpu
    lines = ["", (f"Steady state (rounds after the first): simulated round / plain loop = **{wall:.2f}** "
                  f"(overhead {100 * (wall - 1):.0f}%); CPU seconds, simulation / plain loop = **{cpu:.2f}** "
                  f"(overhead {100 * (cpu - 1):.0f}%)."),
             "", "Where the simulation's CPU seconds went in those rounds, against the plain loop's:", "",
             "| process | CPU s | / plain loop CPU |", "|---|---|---|"]
    lines += [f"| {role} | {cpu_s:.1f} | {cpu_s / loop_cpu:.2f} |"
              for role, cpu_s in sorted(cpu_by_role.items(), key=lambda item: -item[1])]
    lines.append(f"| plain loop workers (same sites, same work) | {loop_cpu:.1f} | 1.00 |")
    return lines


def _ratio(numerator: float, denominator: float) -> str:
    return f"{numerator / denominator:.2f}" if denominator else "n/a"


def main() -> None:
    quiet_optional_codec_notice()
    exit_on_sigterm()  # a killed benchmark still stops the Flower/Ray processes it started
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=1000)
    parser.add_argument("--per-round", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-cases", type=int, default=2)
    parser.add_argument("--max-cases", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpus-per-client", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/scale"))
    parser.add_argument("--stock-engine", action="store_true", help="Flower's simulation engine unpatched")
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = parser.parse_args()
    result = run(args)
    command = (f".venv/bin/python -m benchmarks.scale --sites {args.sites} --per-round {args.per_round} "
               f"--rounds {args.rounds} --min-cases {args.min_cases} --max-cases {args.max_cases}")
    text = to_markdown(result, command)
    print(text)
    if not args.no_write:
        write_section("scale", "Many virtual hospitals (issue 8)", text)


if __name__ == "__main__":
    main()
