"""Sample the memory and CPU time of every process below this one (for ``benchmarks/scale.py``)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from shared.processes import descendants


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
        """Peak RSS sampled between ``start`` and ``end``; for a span shorter than the sampling
        interval, the last sample before ``end``."""
        within = [rss for t, rss, _ in self.samples if start <= t <= end]
        before = [rss for t, rss, _ in self.samples if t < start]
        return max(within) if within else (before[-1] if before else 0)

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
