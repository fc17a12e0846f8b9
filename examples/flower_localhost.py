"""A real Flower deployment on this machine: one SuperLink, N SuperNodes, a hetfl run via ``flwr run``.

    python examples/flower_localhost.py                                   # digits FedAvg, 2 nodes, 3 rounds
    python examples/flower_localhost.py --nodes 4 --config configs/digits_fedavg.toml \\
        --set rounds=5 --out runs/flower-deploy

What it does (the same commands are in docs/flower.md):

1. writes a Flower app (``pyproject.toml`` whose components are ``hetfl.flower.server:app`` and
   ``hetfl.flower.client:app``) and a Flower config (``$FLWR_HOME/config.toml`` naming the local
   SuperLink) into a temporary folder;
2. starts ``flower-superlink --insecure`` on free localhost ports (every Flower executable through a
   launcher that runs its entry point on this interpreter, wherever Flower's scripts were installed; the
   launchers' folder goes first on the PATH of every process it starts, so the
   ``flower-superexec``/``flwr-serverapp``/``flwr-clientapp`` that SuperLink and SuperNodes start by name
   are this interpreter's, whatever PATH the caller had);
3. starts N ``flower-supernode --insecure --node-config "partition-id=i num-partitions=N ..."``: every
   node is one hetfl client and reports its own capability (``--max-width`` gives node i the i-th width);
4. runs ``flwr run APP local --stream`` and waits for the hetfl run directory's ``summary.json``;
5. stops every process it started (each in its own process group: SuperLink, SuperNodes and the
   ServerApp/ClientApp processes they spawned), also on error or Ctrl-C, and checks none is left.

Exit code 0 when the run completed (``summary.json`` says ``"status": "complete"``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


FLOWER_EXTRA = "pip install 'hetfl[flower]'  (in a checkout: pip install -e '.[flower]')"


def interpreter_bin_dirs() -> list[Path]:
    """Where this interpreter's console scripts live (a venv's bin/, pyenv's versions/X/bin/, ...)."""
    return list(dict.fromkeys([Path(sysconfig.get_path("scripts")), Path(sys.executable).parent]))


def flower_executable(name: str, launchers: Path | None = None) -> Path:
    """A launcher for Flower's console script ``name`` that runs it on this interpreter, wherever Flower's
    scripts were installed.

    The script is found by its entry point in the installed packages' metadata (what pip writes the script
    from), not by its file: in a venv made with ``--system-site-packages`` whose Flower comes from the base
    interpreter, the scripts are in the base's bin/, which may be on no PATH.  The launcher (a two-line shell
    script in ``launchers``, default: a folder of this process under the temporary directory) runs
    ``sys.executable`` on the entry point.  Missing: one message naming the executable and the extra."""
    from importlib.metadata import entry_points

    found = list(entry_points(group="console_scripts", name=name))
    if not found:
        where = " or ".join(str(d) for d in interpreter_bin_dirs())
        raise FileNotFoundError(f"{name} is not installed for this interpreter ({sys.executable}; no such console "
                                f"script in its packages, scripts directory {where}); it comes with Flower: "
                                f"{FLOWER_EXTRA}")
    module, _, attr = found[0].value.partition(":")
    folder = launchers or Path(tempfile.gettempdir()) / f"hetfl-flower-launchers-{os.getpid()}"
    folder.mkdir(parents=True, exist_ok=True)
    code = f"import sys; import {module} as m; sys.argv[0] = {json.dumps(name)}; sys.exit(m.{attr}())"
    exe = folder / name
    exe.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -c {shlex.quote(code)} \"$@\"\n")
    exe.chmod(0o755)
    return exe


def child_env(env: dict[str, str], launchers: Path | None = None) -> dict[str, str]:
    """``env`` with the Flower launchers (:func:`flower_executable`), then this interpreter's scripts
    directory, first on PATH.

    The SuperLink and SuperNodes start ``flower-superexec`` by name, which starts ``flwr-serverapp`` and
    ``flwr-clientapp`` by name: from any interpreter (a venv not activated, pyenv, an absolute python path, a
    venv whose Flower is the base interpreter's) they must find this interpreter's Flower, not another or none.
    """
    first = [*([str(launchers)] if launchers else []), *(str(d) for d in interpreter_bin_dirs())]
    rest = [p for p in env.get("PATH", "").split(os.pathsep) if p and p not in first]
    return {**env, "PATH": os.pathsep.join(first + rest)}


def toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Processes:
    """Every process this script starts, each the leader of its own process group."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        out = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def groups_alive(self) -> list[int]:
        alive = []
        for _, p in self.procs:
            try:
                os.killpg(p.pid, 0)
                alive.append(p.pid)
            except ProcessLookupError:
                pass
        return alive

    def stop_all(self, grace_s: float = 10.0) -> list[int]:
        """SIGTERM each group, wait, SIGKILL what is left; returns groups still alive (should be none)."""
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            for pgid in self.groups_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                for _, p in self.procs:
                    p.poll()
                if not self.groups_alive():
                    break
                time.sleep(0.2)
        for _, p in self.procs:
            p.poll()
        return self.groups_alive()


def wait_for_port(port: int, proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.args[0]} exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listens on port {port} after {timeout_s:g} s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, default=2, help="SuperNodes to start (= hetfl clients)")
    p.add_argument("--config", default=str(ROOT / "configs" / "digits_fedavg.toml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="hetfl --set overrides (data.num_clients is set to --nodes)")
    p.add_argument("--max-width", type=float, nargs="*", default=[],
                   help="node i reports max-width=W[i] in its node config (its own capability)")
    p.add_argument("--out", help="hetfl run directory (default: a temporary folder, removed)")
    p.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds")
    p.add_argument("--keep-logs", action="store_true", help="print where the logs are and keep them")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="hetfl-flower-local-"))
    out = Path(args.out).resolve() if args.out else work / "run"
    home, app, logs = work / "flwr-home", work / "app", work / "logs"
    for d in (home, app, logs):
        d.mkdir(parents=True)
    link, health = free_ports(2)  # Flower 1.42 serves the Fleet, Control and Runtime APIs on one HTTP port
    node_ports = free_ports(args.nodes)
    overrides = [*args.overrides, f"data.num_clients={args.nodes}"]

    (home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n'
        f'[superlink.local]\naddress = "127.0.0.1:{link}"\ninsecure = true\n')
    (app / "pyproject.toml").write_text(f"""\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "hetfl-local"
version = "1.0.0"
description = "hetfl on a local Flower deployment"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "hetfl"

[tool.flwr.app.components]
serverapp = "hetfl.flower.server:app"
clientapp = "hetfl.flower.client:app"

[tool.flwr.app.config]
config = {toml_str(str(Path(args.config).resolve()))}
set = {toml_str(";".join(overrides))}
out-dir = {toml_str(str(out))}
expected-nodes = {args.nodes}
min-success-fraction = 0.5
round-timeout = 120.0
query-timeout = 120.0
""")
    (app / "README.md").write_text("hetfl on a local Flower deployment (generated by examples/flower_localhost.py)\n")

    launchers = work / "bin"
    env = child_env({**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
                     "PYTHONPATH": os.pathsep.join([str(ROOT / "src"),
                                                    os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)},
                    launchers)
    try:
        # the last three are started by name by the first two (found first on PATH: launchers): written here
        exes = {name: flower_executable(name, launchers) for name in (
            "flower-superlink", "flower-supernode", "flwr", "flower-superexec", "flwr-serverapp", "flwr-clientapp")}
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    procs = Processes(logs)
    code = 1
    try:
        superlink = procs.start("superlink", [
            str(exes["flower-superlink"]), "--insecure", "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1", "--port", str(link), "--health-server-address", f"127.0.0.1:{health}",
        ], env)
        wait_for_port(link, superlink)
        for i, port in enumerate(node_ports):
            node_config = f"partition-id={i} num-partitions={args.nodes}"
            if i < len(args.max_width):
                node_config += f" max-width={args.max_width[i]}"
            procs.start(f"supernode-{i}", [
                str(exes["flower-supernode"]), "--insecure", "--superlink", f"127.0.0.1:{link}",
                "--host", "127.0.0.1", "--port", str(port), "--node-config", node_config,
            ], env)
        print(f"SuperLink on 127.0.0.1:{link}; {args.nodes} SuperNodes; "
              f"logs in {logs}", flush=True)
        run = subprocess.run([str(exes["flwr"]), "run", str(app), "local", "--stream"], env=env, cwd=work,
                             stdout=open(logs / "flwr-run.log", "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
                             timeout=args.timeout)
        summary_path = out / "summary.json"
        deadline = time.monotonic() + 60
        while not summary_path.is_file() and time.monotonic() < deadline:  # `--stream` may end before the file
            time.sleep(0.5)
        status = json.loads(summary_path.read_text())["status"] if summary_path.is_file() else "missing"
        while status == "running" and time.monotonic() < deadline:
            time.sleep(0.5)
            status = json.loads(summary_path.read_text())["status"]
        print(f"flwr run exited with {run.returncode}; hetfl run {out}: status {status}", flush=True)
        if status == "complete":
            summary = json.loads(summary_path.read_text())
            print(f"rounds={summary['rounds_completed']} test_accuracy={summary['test_accuracy']}", flush=True)
            code = 0
        else:
            for name in ("flwr-run", "superlink", "supernode-0"):
                text = (logs / f"{name}.log").read_text(errors="replace")
                print(f"---- {name}.log (tail) ----\n{text[-3000:]}", file=sys.stderr)
    except (subprocess.TimeoutExpired, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
    finally:
        left = procs.stop_all()
        print(f"stopped {len(procs.procs)} processes; process groups left: {len(left)}", flush=True)
        if left:
            code = 1
        if args.keep_logs:
            print(f"logs kept in {logs}")
        else:
            import shutil

            shutil.rmtree(work, ignore_errors=True)  # the run directory survives when --out is outside it
    return code


if __name__ == "__main__":
    sys.exit(main())
