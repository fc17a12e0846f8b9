"""A study run in stages: every cell of a stage file is the full study's own cell (same directory name, same
config), so a stage's sweep directory is part of the full study's and `hetfl sweep` skips it there."""

from __future__ import annotations

from pathlib import Path

import pytest

from hetfl.sweep import load_study

CONFIGS = Path(__file__).parents[1] / "configs"


@pytest.mark.parametrize(("stage", "full"), [("study_decentral2_slices", "study_decentral2_fmnist"),
                                           ("study_decentral2_families", "study_decentral2_fmnist")])
def test_stage_cells_are_the_full_studys_cells(stage, full):
    part, whole = load_study(CONFIGS / f"{stage}.toml"), load_study(CONFIGS / f"{full}.toml")
    mine = {c.name: part.config(c) for c in part.cells()}
    theirs = {c.name: whole.config(c) for c in whole.cells()}
    assert mine and set(mine) < set(theirs)
    assert all(mine[k] == theirs[k] for k in mine)
