"""What can be set, read from the code: the config sections' dataclasses and every registry entry's parameters.

Two readers: ``hetfl list ENTRY`` (:func:`describe_entry`: one entry's parameters, types and defaults) and
docs/config.md (:func:`config_reference`, regenerated with ``python -m hetfl.reference > docs/config.md``;
``tests/test_reference.py`` fails when the file is not what the code gives, e.g. after a field was added).
A key's description is the bullet of its class docstring (``* ``key``: ...``), else the comment on or
above its line in the source; nothing is written by hand twice.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import textwrap
import typing
from collections.abc import Iterable
from typing import Any

from hetfl.config import RunConfig, _type_name, declared_params
from hetfl.errors import ConfigError

#: registry kind -> (where its entries are named in a config, parameter names that are not the entry's own)
WHERE = {
    "datasets": ("[data] name", ("data_dir", "seed", "verify")),
    "partitioners": ("[data.partition] name", ()),
    "models": ("[model] name", ("width",)),
    "algorithms": ("[algorithm] name", ()),
    "engines": ("engine (top level)", ("algorithm", "federation", "ctx", "device", "cfg")),
    "topologies": ("[graph] name", ()),
    "index policies": ('[algorithm] index_policy = "NAME" or "NAME(key=value; ...)"', ()),
    "width schedules": ('[algorithm] width_schedule = "NAME" or "NAME(key=value; ...)"', ()),
}

#: Sections whose keys are fixed fields (the registry-backed ones add the chosen entry's own parameters).
SECTIONS = ("", "data", "model", "algorithm", "train", "eval", "fleet", "faults", "engine", "graph", "privacy",
            "asynchronous", "log")
_ENTRY_SECTIONS = {"data": "datasets", "data.partition": "partitioners", "model": "models", "algorithm": "algorithms"}


#: Descriptions of the fixed keys whose class says nothing about them (everything else is read from the code).
NOTES = {
    "name": "the run's name (run directories are named from the resolved config when it is empty)",
    "rounds": "communication rounds",
    "seed": "seeds data partition, sampling, initialisation and every client's training",
    "device": '"cpu", "cuda" or "cuda:N"',
    "engine": "simulator (in process or worker processes), flower, or torchrun (decentralized algorithms)",
    "checkpoint_every": "rounds between checkpoints (0 = only at the end)",
    "data.name": "a dataset (below)",
    "data.data_dir": "where to read the dataset's files from (unset: hetfl's cache, then a download)",
    "data.num_clients": "clients (0 = one per natural group)",
    "data.local_test_fraction": "share of every client's data held out as its local test split",
    "data.validation_fraction": "share of the training split held out as the server's validation split "
                                "(val_accuracy; tune on it, not on the test set)",
    "model.name": "a model (below)",
    "model.width": "width of the global model in (0, 1]",
    "algorithm.name": "an algorithm (below)",
    "train.epochs": "local epochs per round (when steps = 0)",
    "train.steps": "exactly this many minibatches per round instead of epochs (0 = use epochs)",
    "train.batch_size": "local minibatch size",
    "train.lr": "local SGD learning rate",
    "train.lr_decay": "the learning rate is multiplied by this every round",
    "train.momentum": "local SGD momentum",
    "train.weight_decay": "local SGD weight decay",
    "train.grad_clip": "clip every local gradient to this L2 norm (0 = off)",
    "eval.every": "evaluate every this many rounds (and after the last)",
    "eval.start": "no evaluation before this round (0 = from the first eval.every; the last round always is)",
    "eval.batch_size": "evaluation batch size",
    "eval.local": "also evaluate on every client's local test split (data.local_test_fraction > 0)",
    "eval.local_clients": "evaluate only this many clients locally (0 = all)",
    "eval.bn_samples": "client samples for recomputing BatchNorm statistics (static BN)",
    "eval.bn": 'BatchNorm statistics at evaluation: "method" (each method\'s own), "recalibrate" (all '
               're-computed), "running" (all averaged)',
    "fleet.source": "uniform (everyone full width), tiers (fleet.mix), phones (320 measured Android phones)",
    "fleet.mix": 'tiers in HeteroFL notation: "a-b-c-d-e" (widths 1 .. 1/16), "a2-e8" (proportions)',
    "fleet.assignment": "fixed (a client keeps its tier) or dynamic (re-drawn every round)",
    "fleet.budget_quantile": "phones: the memory/compute quantile a model must fit",
    "fleet.bandwidth_mbps": "link speed of a device (simulated transfer time)",
    "graph.degree": "regular graphs: neighbours per node",
    "graph.p": "erdos_renyi: edge probability",
    "graph.rows": "torus/grid: rows (0 = the most square factorisation)",
    "graph.k": "capability graphs: stronger neighbours per node",
    "graph.timeout_s": "torchrun engine: the bound on every wait (process-group start, each send/receive)",
    "privacy.max_noise_multiplier": "target_epsilon: the largest noise multiplier searched",
    "privacy.target_quantile": "adaptive_clip: the quantile of update norms the clip follows",
    "privacy.clip_lr": "adaptive_clip: the clip's geometric learning rate",
    "privacy.count_noise": "adaptive_clip: std of the noise on the clipped count (default: the expected cohort / 20)",
}


def _registries() -> dict[str, Any]:
    from hetfl.catalog import REGISTRIES

    return REGISTRIES


def field_notes(cls: type) -> dict[str, str]:
    """``{field: description}`` of a class: its docstring's ``* ``name``: ...`` bullets, else the comment on the
    field's line or the comment lines right above it (for every class in the MRO)."""
    notes: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object:
            continue
        try:
            lines = textwrap.dedent(inspect.getsource(klass)).splitlines()
        except (OSError, TypeError):
            continue
        above: list[str] = []
        for line in lines[1:]:
            stripped = line.strip()
            if stripped.startswith("#"):
                above.append(stripped.lstrip("#").strip())
                continue
            m = re.match(r"^\s{4}(\w+)\s*:[^=]*?(?:=.*?)?(?:#\s*(.*))?$", line)
            if m and not stripped.startswith(("def ", "@", "return")):
                text = m.group(2) or " ".join(above)
                if text:
                    notes[m.group(1)] = text.strip()
            above = []
        doc = inspect.getdoc(klass) or ""
        for m in re.finditer(r"^\* ((?:``\w+``(?:, | and | or )?)+)[^:\n]*: (.*(?:\n  .*)*)", doc, re.M):
            text = " ".join(m.group(2).split())
            for name in re.findall(r"``(\w+)``", m.group(1)):
                notes[name] = text
    return {k: re.sub(r":\w+:`", "`", v.replace("``", "`")) for k, v in notes.items()}


def _default(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[" + ", ".join(_default(v) for v in value) + "]"
    return repr(value)


def section_keys(section: str) -> list[tuple[str, str, str, str]]:
    """``(key, type, default, description)`` of a fixed section's fields (``""``: the top level)."""
    cls = _section_class(section)
    hints = typing.get_type_hints(cls)
    notes = field_notes(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.name in ("params", "partition") or (not section and f.name in SECTIONS):
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        note = notes.get(f.name) or NOTES.get(f"{section}.{f.name}" if section else f.name, "")
        out.append((f.name, _type_name(hints.get(f.name, Any)), _default(default), note))
    return out


def _section_class(section: str) -> type:
    if not section:
        return RunConfig
    hints = typing.get_type_hints(RunConfig)
    if section not in hints:
        raise KeyError(section)
    return hints[section]


def entry_keys(kind: str, obj: Any) -> list[tuple[str, str, str, str]]:
    """``(key, type, default, description)`` of a registry entry's own parameters."""
    skip = WHERE.get(kind, ("", ()))[1]
    notes = field_notes(obj) if inspect.isclass(obj) else {}
    try:
        params = declared_params(obj, skip)
    except (TypeError, ValueError, NameError):
        return []
    return [(name, _type_name(tp), _default(default), notes.get(name, ""))
            for name, (tp, default) in params.items()]


def find_entry(name: str) -> list[tuple[str, Any]]:
    """Every ``(registry kind, entry)`` registered under ``name``."""
    return [(kind, reg.get(name)) for kind, reg in _registries().items() if name in reg]


def describe_entry(name: str) -> str:
    """What ``hetfl list NAME`` prints: where the entry is named, what it is, its parameters and defaults."""
    import difflib

    from hetfl.registry import describe

    found = find_entry(name)
    if not found:
        names = sorted({n for reg in _registries().values() for n in reg})
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"; did you mean {' or '.join(close)}?" if close else "; `hetfl list` names every entry"
        raise ConfigError(f"no dataset, partitioner, model, algorithm, engine, topology, index policy or width "
                          f"schedule is named {name!r}{hint}")
    blocks = []
    for kind, obj in found:
        where = WHERE.get(kind, (kind, ()))[0]
        lines = [f"{name} ({kind[:-1] if not kind.endswith('ies') else kind[:-3] + 'y'}; {where})"]
        doc = describe(obj)
        if doc:
            lines.append(f"  {doc}")
        keys = entry_keys(kind, obj)
        if keys:
            lines.append("  parameters (type = default):")
            width = max(len(k) for k, *_ in keys)
            for key, tp, default, note in keys:
                lines.append(f"    {key:<{width}}  {tp} = {default}" + (f"  # {note}" if note else ""))
        else:
            lines.append("  no parameters of its own")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _table(rows: Iterable[tuple[str, str, str, str]]) -> list[str]:
    out = ["| key | type | default | what |", "|---|---|---|---|"]
    for key, tp, default, note in rows:
        out.append(f"| `{key}` | {tp} | `{default}` | {note.replace('|', chr(92) + '|')} |")
    return out


def config_reference() -> str:
    """docs/config.md: every key of every section, then every registry entry's own parameters."""
    from hetfl.registry import describe

    lines = ["# Config reference", "",
             "Generated from the code by `python -m hetfl.reference > docs/config.md` (the config sections' "
             "dataclasses and every registry entry's parameters); `tests/test_reference.py` fails when this file "
             "is not what the code gives. Any key is set in the TOML file or with `--set section.key=value`. "
             "Registry-backed sections (`[data]`, `[data.partition]`, `[model]`, `[algorithm]`) take their fixed "
             "keys below plus the chosen entry's own parameters (further down; also `hetfl list NAME`). "
             "A run's `config.toml` writes every key out and marks those that do nothing in that run "
             "`# inert: why`.", ""]
    for section in SECTIONS:
        try:
            keys = section_keys(section)
        except KeyError:
            continue
        title = "Top level" if not section else f"`[{section}]`"
        lines += [f"## {title}", ""]
        doc = inspect.getdoc(_section_class(section)) or ""
        head = " ".join(doc.split("\n\n")[0].split()).replace("``", "`")
        if head and not head.startswith(("RunConfig(", "DataConfig(", "ModelConfig(", "AlgorithmConfig(",
                                         "EvalConfig(", "FleetConfig(")):
            lines += [head, ""]
        if section == "data":
            keys = keys + [("partition", "table", '{name = "iid"}', "`[data.partition]`: the partitioner (below)")]
        lines += _table(keys) + [""]
        if section in _ENTRY_SECTIONS or section == "data":
            kind = _ENTRY_SECTIONS[section]
            lines += [f"Plus the own parameters of the chosen {kind[:-1]} (see [{kind}](#{kind})).", ""]
    lines += ["## `[data.partition]`", "", "`name` (default `\"iid\"`) plus the chosen partitioner's own "
              "parameters (see [partitioners](#partitioners)).", ""]
    for kind, reg in _registries().items():
        anchor = kind.replace(" ", "-")
        lines += [f"## {kind.capitalize()}" + ("" if anchor == kind else f' <a id="{anchor}"></a>'), "",
                  f"Named by {WHERE.get(kind, (kind,))[0].replace('|', '/')}.", ""]
        plain = [(name, describe(obj)) for name, obj in reg.items() if not entry_keys(kind, obj)]
        if plain:
            lines += ["Without parameters of their own:" if len(plain) > 1 else "Without parameters of its own:", ""]
            lines += [f"- `{name}`: {doc}" if doc else f"- `{name}`" for name, doc in plain] + [""]
        for name, obj in reg.items():
            keys = entry_keys(kind, obj)
            if keys:
                doc = describe(obj)
                lines += [f"### `{name}`", ""] + ([doc, ""] if doc else []) + _table(keys) + [""]
    return "\n".join(line.rstrip() for line in lines).rstrip() + "\n"


def all_keys() -> list[str]:
    """Every fixed key as ``section.key`` (top level: ``key``): what docs/config.md must list."""
    return [f"{s}.{k}" if s else k for s in SECTIONS if _has(s) for k, *_ in section_keys(s)]


def _has(section: str) -> bool:
    try:
        _section_class(section)
    except KeyError:
        return False
    return True


if __name__ == "__main__":  # pragma: no cover
    print(config_reference(), end="")
