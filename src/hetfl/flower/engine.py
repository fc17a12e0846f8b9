"""``--engine flower``: hetfl rounds through Flower's simulation engine (Ray), one simulation per run.

:class:`FlowerSimulation` starts ``flwr.simulation.run_simulation`` once, in a background thread, with
one virtual SuperNode per hetfl client (``partition-id`` = client id) and hetfl's ClientApp.  Its
ServerApp hands the Grid to this engine and then only waits; the engine drives rounds on that Grid
with :class:`~hetfl.flower.strategy.HetflStrategy` whenever the runner calls ``run_round``, so Ray
stays up across rounds.  ``close()`` ends the ServerApp, lets Flower stop its actors, and shuts Ray
down (when this engine started it), so no process outlives the run.

Inside a Flower ServerApp (a real deployment, :mod:`hetfl.flower.server`) the runner gets a
:class:`HetflStrategy` on the ServerApp's own Grid instead: see :func:`use_grid`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

from flwr.app import Context as FlowerContext
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from hetfl.algorithms.base import Algorithm, Context, ServerState
from hetfl.config import RunConfig
from hetfl.errors import HetflError
from hetfl.flower.client import make_client_app
from hetfl.flower.strategy import FlowerOptions, FlowerRoundReport, HetflStrategy

log = logging.getLogger("hetfl.flower")

FLOWER_DEFAULT_CPUS = 2  # Flower's default client_resources num_cpus

_active_grid: ContextVar[tuple[Grid, int | None, FlowerOptions | None] | None] = ContextVar(
    "hetfl_flower_grid", default=None)


@contextlib.contextmanager
def use_grid(grid: Grid, *, expected_nodes: int | None = None, options: FlowerOptions | None = None) -> Iterator[None]:
    """Within this block, ``--engine flower`` uses ``grid`` (a deployment's) instead of starting a simulation.

    ``expected_nodes``: how many SuperNodes to wait for before the query round (default: one per client).
    """
    token = _active_grid.set((grid, expected_nodes, options))
    try:
        yield
    finally:
        _active_grid.reset(token)


def _proc_table() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, start time, command line) of every live process (Linux /proc; empty elsewhere)."""
    table: dict[int, tuple[int, str, str]] = {}
    if not os.path.isdir("/proc"):
        return table
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        if fields[0] == "Z":  # a zombie has exited; its parent only has to reap it
            continue
        table[int(d)] = (int(fields[1]), fields[19], cmd)  # ppid, starttime (identifies the pid's owner)
    return table


def ray_processes(root: int) -> dict[int, str]:
    """Live descendants of ``root`` that belong to Ray (raylet, GCS, workers, actors): pid -> start time."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = {}, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        if "ray" in table[pid][2]:
            out[pid] = table[pid][1]
        todo.extend(children.get(pid, []))
    return out


def kill_actors(procs: dict[int, str]) -> None:
    """SIGKILL the Ray actor/worker processes (``ray::...``) among ``procs`` (pid -> start time)."""
    import signal

    table = _proc_table()
    for pid, start in procs.items():
        if pid in table and table[pid][1] == start and "ray::" in table[pid][2]:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def detach_stuck_executor_threads() -> None:
    """Let the interpreter exit although some thread-pool worker threads are blocked for good.

    Python joins every ThreadPoolExecutor worker (and every non-daemon thread) at exit; a worker stuck in a
    call that can no longer return (``ray.get`` after Ray is gone) would hang the process forever.  This
    removes such threads from both exit-time joins.  CPython internals, guarded: a no-op where they differ.
    """
    import concurrent.futures.thread as cft

    queues = getattr(cft, "_threads_queues", None)
    locks = getattr(threading, "_shutdown_locks", None)
    for t in list(threading.enumerate()):
        if t is threading.current_thread() or not t.is_alive() or not t.name.startswith("ThreadPoolExecutor"):
            continue
        if isinstance(queues, dict) or hasattr(queues, "pop"):
            queues.pop(t, None)
        lock = getattr(t, "_tstate_lock", None)
        if locks is not None and lock is not None:
            with contextlib.suppress(KeyError, AttributeError):
                locks.discard(lock)


def reap(procs: dict[int, str], grace_s: float = 15.0) -> None:
    """Wait for these processes (recorded before ``ray.shutdown()``) to exit; kill any left, by pid.

    A pid counts as the same process while its start time is unchanged (no confusion with a reused pid).
    """
    import signal
    import time

    def alive() -> list[int]:
        table = _proc_table()
        return [pid for pid, start in procs.items() if pid in table and table[pid][1] == start]

    deadline = time.monotonic() + grace_s
    left = alive()
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = alive()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not left:
            return
        for pid in left:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        end = time.monotonic() + 5
        while left and time.monotonic() < end:
            time.sleep(0.2)
            left = alive()
    if left:  # pragma: no cover
        log.warning("Ray processes still alive after shutdown: %s", left)


class _QuietDeprecation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "run_simulation" not in record.getMessage()


class FlowerSimulation:
    """A hetfl engine running every client as a Flower ClientApp in Flower's simulation engine."""

    name = "flower"

    def __init__(self, algorithm: Algorithm, federation: Any, ctx: Context, device: Any, cfg: RunConfig,
                 options: FlowerOptions | None = None, client_app: ClientApp | None = None,
                 startup_timeout_s: float = 300.0) -> None:
        import ray
        from flwr.simulation import run_simulation

        self.options = options or FlowerOptions()
        self._owns_ray = not ray.is_initialized()
        self._stop = threading.Event()
        self._handoff: queue.Queue[Grid] = queue.Queue()
        self._errors: list[BaseException] = []
        self._closed = False
        self.strategy: HetflStrategy | None = None

        server_app = ServerApp()

        @server_app.main()
        def _main(grid: Grid, context: FlowerContext) -> None:
            self._handoff.put(grid)
            self._stop.wait()

        backend_config: dict[str, Any] = {}
        if self.options.num_cpus is not None or self.options.num_gpus:
            backend_config["client_resources"] = {
                "num_cpus": float(self.options.num_cpus if self.options.num_cpus is not None else FLOWER_DEFAULT_CPUS),
                "num_gpus": float(self.options.num_gpus)}
        if self.options.ray_init_args:
            backend_config["init_args"] = dict(self.options.ray_init_args)
        flwr_logger = logging.getLogger("flwr")
        self._flwr_level = flwr_logger.level
        self._filter = _QuietDeprecation()
        if not self.options.verbose:
            flwr_logger.setLevel(logging.WARNING)
            flwr_logger.addFilter(self._filter)

        def target() -> None:
            try:
                run_simulation(server_app=server_app, client_app=client_app or make_client_app(),
                               num_supernodes=int(federation.num_clients), backend_config=backend_config,
                               verbose_logging=self.options.verbose)
            except BaseException as exc:  # surfaced by _take_grid / close
                self._errors.append(exc)
            finally:
                self._stop.set()

        self._thread = threading.Thread(target=target, name="hetfl-flower-simulation", daemon=True)
        self._thread.start()
        try:
            grid = self._take_grid(startup_timeout_s)
            self.strategy = HetflStrategy(algorithm, ctx, grid, cfg.to_toml(), device=str(device),
                                          options=self.options, alive=self._check_alive)
            self.strategy.query()
        except BaseException:
            self.close()
            raise

    def _take_grid(self, timeout_s: float) -> Grid:
        waited = 0.0
        while True:
            try:
                return self._handoff.get(timeout=0.2)
            except queue.Empty:
                waited += 0.2
                if self._errors or not self._thread.is_alive():
                    raise HetflError(f"Flower's simulation engine stopped before the run began: "
                                     f"{self._errors[0] if self._errors else 'no error reported'}") from (
                        self._errors[0] if self._errors else None)
                if waited >= timeout_s:
                    raise HetflError(f"Flower's simulation engine did not start within {timeout_s:g} s") from None

    def _check_alive(self) -> None:
        if self._errors or not self._thread.is_alive():
            cause = self._errors[0] if self._errors else None
            raise HetflError(f"Flower's simulation engine has stopped: {cause!r}") from cause

    @property
    def capabilities(self) -> dict[int, dict[str, Any]]:
        return self.strategy.capabilities if self.strategy else {}

    @property
    def ctx(self) -> Context:
        assert self.strategy is not None
        return self.strategy.ctx

    def run_round(self, state: ServerState, rnd: int) -> tuple[ServerState, FlowerRoundReport]:
        if self.strategy is None or self._closed:
            raise HetflError("the Flower engine is closed")
        self._check_alive()
        return self.strategy.run_round(state, rnd)

    def close(self) -> None:
        """End the ServerApp, wait for Flower to stop its actors, shut Ray down if this engine started it."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        # Flower stops once every in-flight ClientApp returns; a hung one (a lost client) would hold it, so
        # after a grace period Ray is shut down underneath it, which ends the wait.
        self._thread.join(timeout=10)
        if self._owns_ray:
            ours = ray_processes(os.getpid())  # Ray's processes are all descendants of this one
            if self._thread.is_alive():
                # a ClientApp still running (a lost client) holds a Flower worker thread in ray.get(), and
                # ray.shutdown() does not wake it: kill the actor processes first, so that call fails and
                # Flower's loop, already told to stop, can end
                kill_actors(ours)
                self._thread.join(timeout=20)
            try:
                import ray

                if ray.is_initialized():
                    ray.shutdown()
            except Exception as exc:  # pragma: no cover - best effort
                log.warning("ray.shutdown() failed: %s", exc)
            self._thread.join(timeout=60)
            reap(ours)
        else:
            self._thread.join(timeout=120)
        if self._thread.is_alive():  # pragma: no cover - last resort, never seen once the actors are killed
            log.warning("Flower's simulation thread did not stop; detaching its worker threads so that this "
                        "process can exit")
            detach_stuck_executor_threads()
        flwr_logger = logging.getLogger("flwr")
        flwr_logger.removeFilter(self._filter)
        flwr_logger.setLevel(self._flwr_level)


def make_engine(algorithm: Algorithm, federation: Any, ctx: Context, device: Any, cfg: RunConfig,
                options: FlowerOptions | None = None) -> Any:
    """The ``flower`` engine: the active deployment Grid if inside :func:`use_grid`, else a simulation;
    its options are the ``flower_*`` keys of ``[engine]`` unless given."""
    active = _active_grid.get()
    if active is not None:
        grid, expected, grid_options = active
        strategy = HetflStrategy(algorithm, ctx, grid, cfg.to_toml(), device=str(device),
                                 options=options or grid_options or FlowerOptions.of(cfg.engine),
                                 expected_nodes=expected)
        strategy.query()
        return strategy
    return FlowerSimulation(algorithm, federation, ctx, device, cfg, options=options or FlowerOptions.of(cfg.engine))
