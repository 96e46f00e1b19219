"""Statistics and tables printed by the notebooks (hdn.workbook.tables)."""

from __future__ import annotations

import pytest
import torch

import hdn
from hdn.workbook.tables import (
    format_table,
    loss_weights,
    share_rows,
    shift_and_scale,
    weight_change,
)


def test_shift_and_scale_are_what_ssi_normalize_divides_by():
    x = torch.rand(2, 5, 7) * 3 + 1
    mask = torch.rand(2, 5, 7) > 0.3
    t, s = shift_and_scale(x, mask)
    expected = (x - t.view(2, 1, 1)) / (s.view(2, 1, 1) + 1e-6)
    assert torch.allclose(hdn.ssi_normalize(x, mask)[mask], expected[mask], atol=1e-5)


def test_shift_is_the_lower_median_and_scale_divides_by_n_plus_one():
    t, s = shift_and_scale(torch.tensor([[[4.0, 1.0, 3.0, 2.0]]]))
    assert t.item() == 2.0 and s.item() == pytest.approx((1 + 0 + 1 + 2) / 5)


def test_shift_and_scale_of_an_image_without_valid_pixels_are_zero_and_nan_is_invalid():
    x = torch.tensor([[[float("nan"), 2.0]], [[1.0, 1.0]]])
    t, s = shift_and_scale(x, torch.tensor([[[True, True]], [[False, False]]]))
    assert t.tolist() == [2.0, 0.0] and s.tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="Invalid mask"):
        shift_and_scale(x, torch.ones(2, 1, 2))


def test_loss_weights_average_one_over_the_valid_pixels_and_changes_sum_to_zero():
    valid = torch.tensor([[[True, True, True, False]]])
    ssi = torch.tensor([[[1.0, 2.0, 3.0, 0.0]]])
    hdn_map = torch.tensor([[[3.0, 2.0, 1.0, 0.0]]])
    w = loss_weights(ssi, valid)
    assert w.sum().item() == pytest.approx(3.0)
    change = weight_change(hdn_map, ssi, valid)
    assert change.flatten().tolist() == pytest.approx([1.0, 0.0, -1.0, 0.0])
    assert loss_weights(torch.zeros(1, 1, 4), valid).abs().sum() == 0
    with pytest.raises(ValueError, match="Invalid valid"):
        loss_weights(ssi, valid.float())
    with pytest.raises(ValueError, match="Invalid baseline_map"):
        weight_change(hdn_map, ssi[..., :2], valid)


def test_share_rows_and_format_table_lay_out_one_row_per_region():
    maps = {"SSI": torch.tensor([1.0, 1.0, 2.0]), "DP": torch.tensor([2.0, 1.0, 1.0])}
    regions = {"near": torch.tensor([True, False, False]), "far": torch.tensor([False, True, True])}
    rows = share_rows(maps, regions)
    assert rows == {"near": [0.25, 0.5], "far": [0.75, 0.5]}
    text = format_table(rows, list(maps), title="share")
    assert text.splitlines() == [
        "share    SSI     DP",
        "near   0.250  0.500",
        "far    0.750  0.500",
    ]
    with pytest.raises(ValueError, match="Invalid row"):
        format_table({"near": [0.1]}, ["SSI", "DP"])
