"""Sample the memory and CPU time of every process below this one (for ``benchmarks/scale.py``)."""

from __future__ import annotations

import bisect
import os
import threading
import time
from pathlib import Path

from shared.processes import descendants


class ProcessSampler(threading.Thread):
    """Samples the summed RSS and CPU seconds (in total and per process role) of every process below this one.

    The process tree is re-read every ``refresh_every`` samples (walking /proc
    costs milliseconds); a process that ended keeps the CPU seconds it last had.
    This process itself (the benchmark and its sampler) is left out. Values at a
    moment between two samples are interpolated, so a span can be measured
    between any two moments of the run (such as the times the server ended its rounds).
    """

    def __init__(self, interval_s: float = 0.25, refresh_every: int = 4) -> None:
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.refresh_every = refresh_every
        self.samples: list[tuple[float, int, float]] = []  # (time.monotonic(), RSS bytes, CPU seconds)
        self.role_samples: list[dict[str, float]] = []  # CPU seconds per process role, one per sample
        self.stopped = threading.Event()
        self.unix_offset = time.time() - time.monotonic()
        self._cpu: dict[int, float] = {}
        self._roles: dict[int, str] = {}
        self._pids: list[int] = []

    def run(self) -> None:
        count = 0
        while not self.stopped.is_set():
            if count % self.refresh_every == 0:
                self._pids = descendants(os.getpid())
                self._update_roles()
            count += 1
            rss = _rss_bytes(os.getpid())  # the harness' own memory counts, its CPU (this sampler) not
            rss += sum(_rss_bytes(pid) for pid in self._pids)
            roles = self._read_cpu_by_role()
            self.samples.append((time.monotonic(), rss, sum(roles.values())))
            self.role_samples.append(roles)
            time.sleep(self.interval_s)

    def monotonic_of(self, unix_time: float) -> float:
        """``unix_time`` (``time.time()`` of any process on this machine) on this sampler's clock."""
        return unix_time - self.unix_offset

    def cpu_at(self, moment: float) -> float:
        """CPU seconds the tree had used at ``moment`` (``time.monotonic()``), interpolated."""
        return self._interpolate(moment, [cpu for _, _, cpu in self.samples])

    def cpu_by_role_at(self, moment: float) -> dict[str, float]:
        """CPU seconds per process role at ``moment``, interpolated."""
        roles = {role for sample in self.role_samples for role in sample}
        return {role: self._interpolate(moment, [sample.get(role, 0.0) for sample in self.role_samples])
                for role in roles}

    def peak_between(self, start: float, end: float) -> int:
        """Peak RSS sampled between ``start`` and ``end``; for a span shorter than the sampling
        interval, the last sample before ``end``."""
        within = [rss for t, rss, _ in self.samples if start <= t <= end]
        before = [rss for t, rss, _ in self.samples if t < start]
        return max(within) if within else (before[-1] if before else 0)

    def _interpolate(self, moment: float, values: list[float]) -> float:
        if not values:
            return 0.0
        after = bisect.bisect_left(self.samples, moment, key=lambda sample: sample[0])
        if after in (0, len(values)):
            return values[min(after, len(values) - 1)]
        t0, t1 = self.samples[after - 1][0], self.samples[after][0]
        return values[after - 1] + (values[after] - values[after - 1]) * (moment - t0) / (t1 - t0)

    def _update_roles(self) -> None:
        for pid in self._pids:  # re-read each time: Ray renames its worker processes once they host an actor
            role = _role(pid)
            if role is not None:
                self._roles[pid] = role

    def _read_cpu_by_role(self) -> dict[str, float]:
        for pid in list(self._pids):
            cpu = _cpu_seconds(pid)
            if cpu is not None:
                self._cpu[pid] = cpu
        roles: dict[str, float] = {}
        for pid, cpu in self._cpu.items():
            role = self._roles.get(pid, ROLES[-1][1])
            roles[role] = roles.get(role, 0.0) + cpu
        return roles


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
