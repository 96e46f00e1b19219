"""hdn.workbook.toy_report: the helpers of notebook 05 (blur, calibration, tables, DR bins)."""

from __future__ import annotations

import pytest
import torch

from hdn.workbook.toy_report import (
    box_blur,
    calibration_predictions,
    format_level_table,
    format_rows,
    level_table,
    nearest_bin_stats,
)


def test_box_blur_averages_valid_neighbours_only_and_keeps_invalid_pixels_zero():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[..., 0, 0] = False
    out = box_blur(x, mask, 3)
    assert out[0, 0, 0, 0] == 0
    assert out[0, 0, 1, 1] == pytest.approx((x[0, 0, :3, :3].sum() - 0.0) / 8)  # 8 valid
    assert out[0, 0, 3, 3] == pytest.approx(x[0, 0, 2:, 2:].mean())  # corner: 4 valid
    assert torch.equal(box_blur(x, mask, 1), torch.where(mask, x, 0.0))
    constant = torch.full_like(x, 2.5)
    assert torch.allclose(box_blur(constant, mask, 3)[mask], torch.tensor(2.5))


@pytest.mark.parametrize("size", [0, 2, 3.0, True])
def test_box_blur_rejects_a_size_that_is_not_an_odd_int(size):
    x = torch.ones(1, 1, 4, 4)
    with pytest.raises(ValueError, match="Invalid size"):
        box_blur(x, x > 0, size)


def test_box_blur_rejects_maps_that_are_not_b1hw():
    with pytest.raises(ValueError, match="Invalid shapes"):
        box_blur(torch.ones(4, 4), torch.ones(4, 4, dtype=torch.bool), 3)


def test_calibration_predictions_are_exact_noisy_blurred_log_and_flat():
    d = 1 + torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    d[0, 0, 0, 0] = float("nan")
    valid = torch.isfinite(d)
    refs = calibration_predictions(d, valid)
    assert list(refs) == ["ground truth", "GT x (1 + 1 % noise)", "GT, 3x3 blur", "GT, 5x5 blur",
                          "GT, 9x9 blur", "log depth", "flat (x + 1e-6 noise)"]  # fmt: skip
    d0 = torch.nan_to_num(d)
    assert torch.equal(refs["ground truth"], d0)
    rel = (refs["GT x (1 + 1 % noise)"] / d0 - 1)[valid]
    assert 0.005 < float(rel.std()) < 0.015
    assert torch.equal(refs["GT, 5x5 blur"], box_blur(d0, valid, 5))
    assert torch.allclose(refs["log depth"][valid], torch.log(d[valid]))
    assert float(refs["flat (x + 1e-6 noise)"].abs().max()) < 1e-5
    again = calibration_predictions(d, valid)
    assert all(torch.equal(refs[k], again[k]) for k in refs)  # seeded


def test_format_rows_aligns_columns_with_the_given_decimals():
    text = format_rows({"ssi": {"a": 2.0301, "b": 0.5}, "hdn-dr": {"a": 10.0, "b": 0.25}},
                       {"a": 3, "b": 1}, name="loss")  # fmt: skip
    lines = text.splitlines()
    assert lines == ["loss         a    b", "ssi      2.030  0.5", "hdn-dr  10.000  0.2"]
    with pytest.raises(ValueError, match="Invalid columns"):
        format_rows({"ssi": {}}, {})


def test_level_table_measures_every_kind_and_level_and_formats_them():
    g = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)) + 1
    valid = torch.ones_like(g, dtype=torch.bool)
    preds = {"exact": 2 * g + 1, "noisy": g + 0.3 * torch.rand(g.shape, generator=torch.Generator())}
    table = level_table(preds, g, valid, levels=2)
    assert list(table) == ["exact", "noisy"] and list(table["exact"]) == ["dr", "dp", "ds"]
    assert all(len(v) == 2 for v in table["noisy"].values())
    assert max(max(v) for v in table["exact"].values()) < 1e-4
    assert min(min(v) for v in table["noisy"].values()) > 0.01
    text = format_level_table(table)
    header = text.splitlines()[0].split()
    assert header == ["model", "DR", "l=0", "l=1", "DP", "l=0", "l=1", "DS", "l=0", "l=1"]
    assert text.splitlines()[1].split()[1:] == ["0.000"] * 6


def test_nearest_bin_stats_counts_images_whose_nearest_finest_dr_bin_is_near_only():
    far = torch.linspace(20.0, 60.0, 12)
    near = torch.tensor([1.0, 1.1, 1.2, 1.3])
    clean = torch.cat([near, far]).view(1, 1, 4, 4)
    mixed = torch.cat([near, torch.tensor([6.0]), far[1:]]).view(1, 1, 4, 4)  # 6 m in bin 0
    d = torch.cat([clean, mixed])
    stats = nearest_bin_stats(3 * d + 2, d, d > 0, levels=3, near_depth=5.0)
    assert (stats["images"], stats["only_near"], stats["all_near_inside"]) == (2, 1, 2)
    assert stats["scale_ratio_median"] > 10  # the bin normalises much tighter than the image
    with pytest.raises(ValueError, match="Invalid shapes"):
        nearest_bin_stats(d[:, 0], d[:, 0], d[:, 0] > 0)
