"""A registered model cut in depth, with early exits: any other registered model seen as blocks.

The depth-heterogeneous algorithms (DepthFL, ScaleFL, InclusiveFL) name their clients' networks with
this entry so that every engine (in process, worker processes, Flower) builds them from a plain
``ModelRef`` like any other model.  The blocks, the cut and the exits are derived from the base model
by :mod:`hetfl.hetero.depth`; nothing here knows a particular architecture.  It lives in hetero (it is
built from hetero's block plan) and is registered when the depth algorithms are imported.
"""

from torch import nn

from hetfl.data.base import DataInfo
from hetfl.errors import ConfigError
from hetfl.hetero import example_input
from hetfl.hetero.depth import build_multi_exit, decode_params, parse_fractions, plan_for
from hetfl.models.registry import MODELS, build_model, check_width


@MODELS.register("multi_exit")
def multi_exit(
    info: DataInfo,
    *,
    width: float = 1.0,
    base: str = "mlp",
    base_params: str = "",
    depth: float = 1.0,
    exits: str = "",
    output: str = "last",
    blocks: str = "ceil",
) -> nn.Module:
    """Registered model ``base`` cut to a fraction ``depth`` of its blocks (counted by the depth rule ``blocks``),
    with exits after ``exits`` fractions."""
    width = check_width(width)
    if base == "multi_exit":
        raise ConfigError("model.base of 'multi_exit' cannot be multi_exit")
    plan = plan_for(base, base_params, info)
    net = build_model(base, info, width=width, **dict(decode_params(base_params)))
    return build_multi_exit(net, plan, info, example_input(info), depth=float(depth),
                            exits=parse_fractions(exits, "model.exits of 'multi_exit'"), output=output,
                            blocks=blocks)
