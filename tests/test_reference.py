"""docs/config.md is the config reference the code gives, and `hetfl list ENTRY` shows an entry's parameters."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from hetfl.cli import main
from hetfl.reference import all_keys, config_reference, describe_entry

ROOT = Path(__file__).parents[1]


def test_docs_config_md_is_current():
    """Fails when a config field or a registry entry's parameter changed without regenerating the reference:
    python -m hetfl.reference > docs/config.md"""
    assert (ROOT / "docs" / "config.md").read_text() == config_reference(), \
        "docs/config.md is stale: run `python -m hetfl.reference > docs/config.md`"


def test_every_key_is_listed_under_its_section():
    text = (ROOT / "docs" / "config.md").read_text()
    sections = {}
    for block in text.split("\n## ")[1:]:
        title, _, body = block.partition("\n")
        sections[title.strip("`[] ")] = body
    for key in all_keys():
        section, _, name = key.rpartition(".")
        assert f"| `{name}` |" in sections[section or "Top level"], key
    for key in ("engine.name", "engine.workers", "engine.threads_per_worker", "engine.worker_timeout_s",
                "engine.batched", "asynchronous.mode", "data.verify",
                "train.augment", "train.memory_format", "fleet.size_correlation", "graph.name", "graph.mixing"):
        assert key in all_keys(), key  # the keys issue 39 found missing from the README's table


def test_a_new_field_makes_the_reference_differ(monkeypatch):
    from hetfl import config

    @dataclasses.dataclass(frozen=True)
    class Train(config.TrainConfig):
        new_knob: int = 3  # a field added without regenerating

    from hetfl import reference

    before = config_reference()
    section_class = reference._section_class
    monkeypatch.setattr(reference, "_section_class", lambda s: Train if s == "train" else section_class(s))
    after = config_reference()
    assert after != before and "| `new_knob` | int | `3` | a field added without regenerating |" in after


def test_hetfl_list_entry_shows_its_parameters_and_defaults(capsys):
    # hetfl list heterofl
    assert main(["list", "heterofl"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("heterofl (algorithm; [algorithm] name)")
    for line in ("clients_per_round  int = 10", 'index_policy       str = "prefix"', "static_bn          bool = true"):
        assert line in out, line
    assert main(["list", "dirichlet"]) == 0
    assert "alpha      float = 0.5" in capsys.readouterr().out
    assert main(["list", "heterfl"]) == 2
    assert "did you mean heterofl" in capsys.readouterr().err


def test_describe_entry_covers_every_registry():
    from hetfl.catalog import REGISTRIES

    for reg in REGISTRIES.values():
        for name in reg:
            assert describe_entry(name).startswith(name)
    with pytest.raises(Exception, match="named 'nope'"):
        describe_entry("nope")
