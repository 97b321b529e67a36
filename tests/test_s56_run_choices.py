"""Stop 56 (lead): errors of `run --stages` and of the rank environment name what was wrong."""
from __future__ import annotations

import pytest

from guidealign.config import load_config
from guidealign.pipeline import choose
from guidealign.shards.ranks import resolve_rank


def test_a_misspelt_stage_name_suggests_the_stage_meant():
    cfg = load_config(None)
    with pytest.raises(ValueError, match=r"unknown stage\(s\) \['respnd'\] \(did you mean respond\?\)"):
        choose(cfg, ["detect", "respnd"])


def test_a_stage_name_like_no_stage_gets_no_suggestion():
    with pytest.raises(ValueError) as e:
        choose(load_config(None), ["zzzz"])
    assert "did you mean" not in str(e.value)


@pytest.mark.parametrize("env", [{"RANK": "x", "WORLD_SIZE": "2"}, {"RANK": "0", "WORLD_SIZE": "two"}])
def test_a_rank_variable_that_is_no_number_is_named_in_the_error(env):
    bad = next(k for k, v in env.items() if not v.isdigit())
    with pytest.raises(ValueError, match=rf"environment variable {bad}=.* is not a whole number"):
        resolve_rank(None, None, env=env)
