"""The procedural RGB-D scenes of hdn.toy.synthetic and the committed toy split under data/."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hdn.toy.synthetic import (
    arrays_sha256,
    file_sha256,
    load_split,
    make_scene,
    make_split,
    save_split,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "toy_rgbd.npz"
README = ROOT / "data" / "README.md"


def _readme_section() -> str:
    text = README.read_text()
    match = re.search(
        r"^## Toy RGB-D split\n(.*?)(?=^## |\Z)", text, flags=re.DOTALL | re.MULTILINE
    )
    assert match, "data/README.md has no '## Toy RGB-D split' section"
    return match.group(1)


def _readme_command_and_checksum() -> tuple[list[str], str]:
    section = _readme_section()
    command = re.search(r"^(python -m hdn\.toy\.synthetic .+)$", section, flags=re.MULTILINE)
    checksum = re.search(r"\b([0-9a-f]{64})\b", section)
    assert command and checksum, "the README section must state the command and the sha256"
    return shlex.split(command.group(1)), checksum.group(1)


def test_make_scene_is_bit_for_bit_deterministic_and_seed_dependent():
    a, b, c = make_scene(7), make_scene(7), make_scene(8)
    for name in ("rgb", "depth", "valid", "gt"):
        assert np.array_equal(getattr(a, name), getattr(b, name), equal_nan=True)
    assert (a.scale, a.shift) == (b.scale, b.shift)
    assert not np.array_equal(a.rgb, c.rgb)


def test_scene_arrays_have_documented_shapes_dtypes_and_ranges():
    scene = make_scene(3, height=48, width=64)
    assert scene.rgb.shape == (3, 48, 64) and scene.rgb.dtype == np.float32
    assert scene.depth.shape == scene.valid.shape == scene.gt.shape == (48, 64)
    assert scene.depth.dtype == scene.gt.dtype == np.float32 and scene.valid.dtype == bool
    assert 0 <= scene.rgb.min() and scene.rgb.max() <= 1
    assert np.array_equal(scene.rgb * 255, np.rint(scene.rgb * 255))  # quantised to 1/255
    assert np.isfinite(scene.depth[scene.valid]).all()
    assert np.isnan(scene.depth[~scene.valid]).all() and np.isnan(scene.gt[~scene.valid]).all()
    assert scene.depth[scene.valid].min() >= 0.5 and scene.depth[scene.valid].max() <= 60.0 + 1e-4
    assert scene.scale > 0
    expected_gt = np.float32(scene.scale) * scene.depth + np.float32(scene.shift)
    assert np.array_equal(scene.gt[scene.valid], expected_gt[scene.valid])
    assert (scene.gt[scene.valid] > 0).all()


def test_scenes_have_near_relief_far_background_and_invalid_pixels():
    split = make_split(24, seed=11, height=64, width=64)
    depth, valid = split["depth"], split["valid"]
    assert 0.02 < 1 - valid.mean() < 0.6  # sky and holes
    for d, v in zip(depth, valid):
        near, far = d[v & (d < 4)], d[v & (d >= 15)]
        assert near.size > 0.03 * d.size and far.size > 0.1 * d.size
        assert 0.01 < np.std(near) < 1.5  # cm..dm relief and object offsets, not metres
    assert (
        np.ptp(split["scale"]) > 1 and np.ptp(split["shift"]) > 1
    )  # unknown per-scene affine maps


def test_haze_makes_far_pixels_less_saturated():
    split = make_split(16, seed=2, height=32, width=32)
    rgb, depth, valid = split["rgb"], split["depth"], split["valid"]
    saturation = (rgb.max(1) - rgb.min(1)) / np.maximum(rgb.max(1), 1e-6)
    near = valid & (depth < 4)
    far = valid & (depth > 30)
    assert saturation[near].mean() > 1.5 * saturation[far].mean()


def test_save_load_round_trip_is_exact_and_needs_no_pickle(tmp_path):
    splits = {"train": make_split(5, 1, 16, 24), "test": make_split(3, 1, 16, 24, stream=1)}
    digest = save_split(tmp_path / "a.npz", splits)
    assert digest == file_sha256(tmp_path / "a.npz")
    with np.load(tmp_path / "a.npz", allow_pickle=False) as npz:
        assert all(npz[name].dtype != object for name in npz.files)
    loaded = load_split(tmp_path / "a.npz")
    assert set(loaded) == {"train", "test"}
    for split, arrays in splits.items():
        for key, value in arrays.items():
            assert loaded[split][key].dtype == value.dtype
            assert np.array_equal(loaded[split][key], value, equal_nan=True), (split, key)
    save_split(tmp_path / "b.npz", splits)  # fixed zip timestamps: same arrays, same bytes
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()


def test_save_split_rejects_arrays_it_cannot_store_exactly(tmp_path):
    split = make_split(2, 0, 16, 16)
    split["rgb"] = split["rgb"] * 0.999
    with pytest.raises(ValueError, match="quantised"):
        save_split(tmp_path / "x.npz", {"train": split})


def test_arrays_sha256_depends_on_names_dtypes_and_values():
    a = {"x": np.arange(4, dtype=np.int32)}
    assert arrays_sha256(a) == arrays_sha256({"x": np.arange(4, dtype=np.int32)})
    assert arrays_sha256(a) != arrays_sha256({"y": np.arange(4, dtype=np.int32)})
    assert arrays_sha256(a) != arrays_sha256({"x": np.arange(4, dtype=np.int64)})
    assert arrays_sha256(a) != arrays_sha256({"x": np.arange(1, 5, dtype=np.int32)})


@pytest.mark.parametrize(
    "bad", [{"seed": -1}, {"seed": 1.5}, {"seed": 0, "height": 4}, {"seed": [], "width": 8}]
)
def test_make_scene_rejects_bad_arguments(bad):
    with pytest.raises(ValueError):
        make_scene(**bad)


def test_committed_split_matches_the_checksum_in_the_readme():
    _, checksum = _readme_command_and_checksum()
    assert file_sha256(DATA) == checksum
    data = load_split(DATA)
    assert data["train"]["rgb"].shape == (256, 3, 64, 64) and data["test"]["rgb"].shape == (
        64,
        3,
        64,
        64,
    )
    assert DATA.stat().st_size < 8e6


def test_committed_scenes_are_those_make_scene_draws():
    data = load_split(DATA)
    for split, index in (("train", 0), ("train", 255), ("test", 17)):
        seed = tuple(int(s) for s in data[split]["scene_seed"][index])
        scene = make_scene(seed, 64, 64)
        for key in ("rgb", "depth", "valid", "gt"):
            assert np.array_equal(getattr(scene, key), data[split][key][index], equal_nan=True), (
                split,
                key,
            )


def test_readme_command_regenerates_the_committed_split_bit_for_bit(tmp_path):
    argv, checksum = _readme_command_and_checksum()
    assert argv[:3] == ["python", "-m", "hdn.toy.synthetic"]
    out = argv.index("--out") + 1
    argv[out] = str(tmp_path / "regenerated.npz")
    result = subprocess.run(
        [sys.executable, *argv[1:]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert checksum in result.stdout
    assert file_sha256(tmp_path / "regenerated.npz") == checksum
