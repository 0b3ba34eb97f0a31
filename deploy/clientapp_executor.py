"""A warm ClientApp executor for ``flower-supernode --isolation process``.

With the default ``subprocess`` isolation, the SuperNode's SuperExec starts a
fresh ``flwr-clientapp`` process for every message, and each one imports
torch and MONAI again (seconds per message, twice per round). With
``--isolation process`` the SuperNode leaves launching ClientApps to an
executor outside it; this one imports the heavy libraries ONCE, then runs
Flower's own SuperExec loop and, for each ClientApp task, forks itself and
runs Flower's ``run_clientapp`` in the child. Each task still gets a process
of its own (state never leaks between runs or rounds), it just starts warm.

Only third-party libraries are preloaded, never fedseg's own packages: the
ClientApp code always comes from the FAB that Flower installs for the run.
Before the loop starts, everything preloaded is frozen out of the garbage
collector (``gc.freeze``), so a child's collections (``client.runtime.memory``) walk
only what that child allocated, not the whole torch/MONAI heap (~0.5 s each
otherwise). And the ClientApp retries sooner when it asks its SuperNode for
the message's content before the SuperNode has it: Flower 1.41 starts the
ClientApp task before the node has pulled the message's objects from the
SuperLink, and the ClientApp then backs off 1 s, 2 s, ... (here 0.05 s first;
``clientapp-first-object-retry`` in ``shared/flower_compat/registry.py``).

``python deploy/clientapp_executor.py --runtime-api-address 127.0.0.1:9094 --insecure --parent-pid PID``
(run as a script, so that the repository root is not on its ``sys.path``)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

try:
    from deploy import flower_patches
except ImportError:  # run as a script: deploy/ itself is on sys.path, the repository root is not
    import flower_patches

# Heavy third-party modules the fedseg ClientApp uses (torch and MONAI are most of the start-up time).
# torch._dynamo: imported on first use by every torch.optim optimizer (~0.6 s per ClientApp otherwise).
PRELOAD = ("torch", "torch._dynamo", "torch.optim", "numpy", "nibabel", "monai", "monai.networks.nets",
           "monai.transforms", "monai.losses", "monai.metrics", "monai.inferers", "monai.data", "opacus",
           "flwr.app", "flwr.clientapp", "flwr.supernode.runtime.run_clientapp")
APP_PACKAGES = ("client", "server", "shared")
# First retry when a message object is not at the SuperNode yet (a local request; Flower: 1 s).
FIRST_RETRY_S = 0.05


def preload(modules: tuple[str, ...] = PRELOAD) -> list[str]:
    """Import ``modules`` now (those that are installed); return the ones imported."""
    loaded = []
    for name in modules:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
            loaded.append(name)
    leaked = [name for name in sys.modules if name.split(".")[0] in APP_PACKAGES]
    if leaked:
        raise RuntimeError(f"the warm executor must not import app code, but imported {leaked[:3]}")
    return loaded


class ForkingClientAppExecutor:
    """A Flower SuperExec executor that forks this warm process for each ClientApp task."""

    def __init__(self, fallback: Any) -> None:
        self.fallback = fallback  # Flower's SubprocessExecutor for any other task type
        self.children: set[int] = set()

    def launch(self, spec: Any) -> Any:
        """Start the task described by ``spec`` (a Flower ``ExecutionSpec``)."""
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor.types import LaunchResult

        if spec.task_type != TaskType.CLIENT_APP:
            return self.fallback.launch(spec)
        pid = os.fork()
        if pid == 0:
            os._exit(_run_clientapp_in_child(spec))
        self.children.add(pid)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap finished children."""
        for pid in list(self.children):
            with contextlib.suppress(ChildProcessError):
                done, _ = os.waitpid(pid, os.WNOHANG)
                if not done:
                    continue
            self.children.discard(pid)

    def get_eligible_capacity(self, supported: set, **kwargs: Any) -> tuple[set, set]:
        """No capacity limit: every supported task type may launch."""
        return self.fallback.get_eligible_capacity(supported, **kwargs)

    def wait_for_capacity(self, *args: Any, **kwargs: Any) -> None:
        """Never waits (no capacity limit)."""

    def close(self) -> None:
        """Stop running ClientApps when the executor stops."""
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


def _run_clientapp_in_child(spec: Any) -> int:
    """Body of a forked child: Flower's ``flwr-clientapp`` main, then the exit code."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)  # drop the executor's handlers; run_clientapp sets its own
    try:
        from flwr.supercore.tls import validate_and_resolve_root_certificates
        from flwr.supernode.runtime.run_clientapp import run_clientapp

        run_clientapp(runtime_api_address=spec.runtime_api_address, token=spec.token, insecure=spec.insecure,
                      certificates=validate_and_resolve_root_certificates(spec.root_certificates_path,
                                                                          spec.insecure),
                      parent_pid=spec.parent_pid, runtime_dependency_install=False)
        return 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - a child must never return into the executor's loop
        import traceback

        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def run_executor(*, runtime_api_address: str, insecure: bool, root_certificates: str | None,
                 parent_pid: int | None, make_fallback: Callable[[], Any] | None = None) -> None:
    """Preload, then run Flower's SuperExec loop with the forking executor (never returns normally)."""
    from flwr.supercore.superexec import run_superexec as superexec
    from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

    preload()
    executor = ForkingClientAppExecutor((make_fallback or SubprocessExecutor)())
    # Flower's loop builds its executor through get_executor; ours is handed in in its place (stock Flower's
    # SubprocessExecutor, one cold process per task, if the gate refuses: one warning).
    flower_patches.patch_clientapp_executor(executor=executor, first_retry_s=FIRST_RETRY_S)
    gc.collect()
    gc.freeze()  # children inherit the preloaded heap; their collections skip it
    superexec.run_superexec(runtime_api_address=runtime_api_address, insecure=insecure,
                            root_certificates_path=root_certificates, parent_pid=parent_pid,
                            runtime_dependency_install=False)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python deploy/clientapp_executor.py``; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python deploy/clientapp_executor.py", description=__doc__.split("\n")[0])
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API (host:port)")
    parser.add_argument("--insecure", action="store_true", help="the Runtime API is plain HTTP (loopback only)")
    parser.add_argument("--root-certificates", help="CA of the Runtime API's TLS certificate")
    parser.add_argument("--parent-pid", type=int, help="stop when this process (the SuperNode) exits")
    args = parser.parse_args(argv)
    if args.insecure == bool(args.root_certificates):
        parser.error("give exactly one of --insecure and --root-certificates")
    run_executor(runtime_api_address=args.runtime_api_address, insecure=args.insecure,
                 root_certificates=args.root_certificates, parent_pid=args.parent_pid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
