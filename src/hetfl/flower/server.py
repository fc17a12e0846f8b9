"""The ServerApp that ``flwr run`` starts on a real deployment (SuperLink + SuperNodes).

It runs a hetfl config exactly like ``hetfl run CONFIG`` (same run directory: config.toml,
partition.json, metrics.jsonl, checkpoint.pt, summary.json), with the runner's engine bound to this
ServerApp's Grid: the rounds go to the connected SuperNodes (each running :mod:`hetfl.flower.client`).

Run config keys (``[tool.flwr.app.config]`` of the Flower app, or ``flwr run --run-config``):

=========================  ==========================================================================
``config``                 path of the hetfl TOML config (absolute, or relative to the ServerApp's cwd)
``set``                    ``;``-separated ``--set`` overrides, e.g. ``"rounds=3;data.num_clients=2"``
``out-dir``                run directory to create (default: ``runs/<name>-<time>``)
``expected-nodes``         SuperNodes to wait for before the query round (0 = one per client)
``min-success-fraction``   share of a round's clients that must reply (default 0.5)
``round-timeout``          seconds before a silent client counts as lost (0 = rely on Flower's
                           node-unavailable replies)
``query-timeout``          seconds to wait for nodes to connect and answer the query (default 600)
=========================  ==========================================================================
"""

from __future__ import annotations

import logging

from flwr.app import Context as FlowerContext
from flwr.serverapp import Grid, ServerApp

from hetfl.flower.engine import use_grid
from hetfl.flower.strategy import FlowerOptions
from hetfl.resolve import load_config
from hetfl.runner import run

log = logging.getLogger("hetfl.flower")

app = ServerApp()


@app.main()
def main(grid: Grid, context: FlowerContext) -> None:

    rc = dict(context.run_config)
    if not rc.get("config"):
        raise ValueError("the hetfl ServerApp needs run config 'config' (path of a hetfl TOML config)")
    overrides = [s.strip() for s in str(rc.get("set", "")).split(";") if s.strip()]
    cfg = load_config(str(rc["config"]), overrides).replace(engine="flower")
    options = FlowerOptions(
        min_success_fraction=float(rc.get("min-success-fraction", 0.5)),
        round_timeout_s=float(rc.get("round-timeout", 0.0)),
        query_timeout_s=float(rc.get("query-timeout", 600.0)),
    )
    expected = int(rc.get("expected-nodes", 0)) or None
    with use_grid(grid, expected_nodes=expected, options=options):
        summary = run(cfg, str(rc["out-dir"]) if rc.get("out-dir") else None, quiet=True)
    log.warning("hetfl run finished: %s rounds=%s test_accuracy=%s", summary["run_dir"],
                summary["rounds_completed"], summary.get("test_accuracy"))
