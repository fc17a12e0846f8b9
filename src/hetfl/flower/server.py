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
``min-success-fraction``   ``faults.min_success_fraction``: share of a round's clients that must reply
``round-timeout``          ``engine.flower_round_timeout_s``: seconds before a silent client counts as
                           lost (0 = rely on Flower's node-unavailable replies)
``query-timeout``          ``engine.flower_query_timeout_s``: seconds to wait for nodes to connect and
                           answer the query (default 600)
=========================  ==========================================================================

The last three are shorthands for ``--set`` overrides of the config's keys (given here, they win).
"""

from __future__ import annotations

import logging

from flwr.app import Context as FlowerContext
from flwr.serverapp import Grid, ServerApp

from hetfl.flower.engine import use_grid
from hetfl.resolve import load_config
from hetfl.runner import run

log = logging.getLogger("hetfl.flower")

app = ServerApp()

#: run config keys that are shorthands for config keys
RUN_CONFIG_KEYS = {"min-success-fraction": "faults.min_success_fraction",
                   "round-timeout": "engine.flower_round_timeout_s", "query-timeout": "engine.flower_query_timeout_s"}


@app.main()
def main(grid: Grid, context: FlowerContext) -> None:

    rc = dict(context.run_config)
    if not rc.get("config"):
        raise ValueError("the hetfl ServerApp needs run config 'config' (path of a hetfl TOML config)")
    overrides = [s.strip() for s in str(rc.get("set", "")).split(";") if s.strip()]
    for key, field in RUN_CONFIG_KEYS.items():
        if key in rc:
            overrides.append(f"{field}={float(rc[key])!r}")
    cfg = load_config(str(rc["config"]), overrides).with_engine(name="flower")
    expected = int(rc.get("expected-nodes", 0)) or None
    with use_grid(grid, expected_nodes=expected):
        summary = run(cfg, str(rc["out-dir"]) if rc.get("out-dir") else None, quiet=True)
    log.warning("hetfl run finished: %s rounds=%s test_accuracy=%s", summary["run_dir"],
                summary["rounds_completed"], summary.get("test_accuracy"))
