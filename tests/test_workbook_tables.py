"""hdn.workbook.tables: the notebooks' printed tables and tolerance checks."""

from __future__ import annotations

import pytest
import torch

from hdn.workbook.tables import agree_within, format_table


def test_format_table_aligns_columns_and_formats_floats_per_column():
    text = format_table({"SSI": [0.15474, 3, "x"], "HDN-DR": [0.48321, 12, "yy"]},
                        ["loss", "levels", "tag"], fmt=[".4f", "d", ""], title="loss")
    lines = text.split("\n")
    assert lines[0].split() == ["loss", "loss", "levels", "tag"]
    assert lines[1].split() == ["SSI", "0.1547", "3", "x"]
    assert lines[2].split() == ["HDN-DR", "0.4832", "12", "yy"]
    assert len({len(line) for line in lines}) == 1  # right-aligned columns


def test_format_table_formats_single_element_tensors_as_numbers():
    assert format_table({"a": [torch.tensor(0.12345)]}, ["v"], fmt=".2f").split()[-1] == "0.12"


def test_format_table_rejects_rows_of_the_wrong_length_and_bad_formats():
    with pytest.raises(ValueError, match="Invalid row 'a'"):
        format_table({"a": [1.0]}, ["x", "y"])
    with pytest.raises(ValueError, match="Invalid fmt"):
        format_table({"a": [1.0, 2.0]}, ["x", "y"], fmt=[".1f"])
    with pytest.raises(ValueError, match="Invalid columns"):
        format_table({"a": [1.0]}, "x")


def test_agree_within_is_relative_and_symmetric():
    assert agree_within(torch.tensor(0.31745), 0.31738, rtol=1e-3)
    assert agree_within(0.31738, torch.tensor(0.31745), rtol=1e-3)
    assert not agree_within(0.31745, 0.31738, rtol=1e-5)
    assert agree_within(0.0, 0.0, rtol=0.0)
    with pytest.raises(ValueError, match="Invalid rtol"):
        agree_within(1.0, 1.0, rtol=-1.0)


def test_format_table_sizes_each_column_to_its_widest_entry_unless_told():
    lines = format_table({"r": [1.0, 123456.0]}, ["a", "b"], fmt=".1f").split("\n")
    assert lines[0] == "     a         b"
    assert lines[1] == "r  1.0  123456.0"
    fixed = format_table({"r": [1.0, 2.0]}, ["a", "b"], fmt=".1f", width=6).split("\n")
    assert fixed[1] == "r   1.0   2.0"
