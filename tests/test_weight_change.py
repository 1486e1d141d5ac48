"""weight_change and the generic Result save/load, with a planted rank-1 update."""

from __future__ import annotations

import pytest
import tiny
import torch

from interp import load_pair
from interp.analysis.weight_change import WeightChange, weight_change


def test_planted_rank1_update_is_found_only_where_planted(tmp_path):
    base = tiny.llama(seed=0)
    ft = tiny.llama(seed=0)
    u, v = torch.randn(16), torch.randn(32)  # v_proj is [16, 32] (2 kv heads)
    with torch.no_grad():
        ft.model.layers[1].self_attn.v_proj.weight += 0.5 * torch.outer(u, v)
    pair = load_pair(base, ft, tokenizer=None)
    result = weight_change(pair, progress=False)
    changed = result.table[result.table["delta_norm"] > 0]
    assert list(changed["matrix"]) == ["blocks.1.attn.v"]
    assert changed["stable_rank"].iloc[0] == pytest.approx(1.0, abs=1e-4)
    expected = 0.5 * torch.outer(u, v).norm() / base.model.layers[1].self_attn.v_proj.weight.norm()
    assert changed["relative_change"].iloc[0] == pytest.approx(float(expected), rel=1e-5)

    result.save(tmp_path / "wc")
    again = WeightChange.load(tmp_path / "wc")
    assert again.table.equals(result.table) and again.options == result.options
    assert "WeightChange" in again._repr_html_()
    from interp.results import Result

    assert type(Result.load(tmp_path / "wc")) is WeightChange
