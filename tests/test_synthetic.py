"""The procedural RGB-D scenes of hdn.toy.synthetic and the committed toy split under data/."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hdn.toy import synthetic
from hdn.toy.synthetic import (
    TOY_SPLIT_OPTIONS,
    TOY_SPLIT_PATH,
    TOY_SPLIT_SHA256,
    arrays_sha256,
    draw_checked_split,
    file_sha256,
    load_split,
    make_scene,
    make_split,
    save_split,
    toy_split,
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


def test_package_checksum_and_split_options_are_those_of_the_readme():
    argv, checksum = _readme_command_and_checksum()
    assert TOY_SPLIT_SHA256 == checksum
    options = dict(zip(argv[3::2], argv[4::2]))
    assert options["--out"] == "data/toy_rgbd.npz"
    assert TOY_SPLIT_PATH == DATA
    assert {k: int(options[f"--{k}"]) for k in TOY_SPLIT_OPTIONS} == TOY_SPLIT_OPTIONS


def test_toy_split_in_a_clone_reads_the_committed_file():
    assert toy_split().keys() == {"train", "test"}
    committed = load_split(DATA)
    for split in ("train", "test"):
        for key, value in committed[split].items():
            assert np.array_equal(toy_split()[split][key], value, equal_nan=True), (split, key)


def test_toy_split_rejects_a_file_that_does_not_have_the_checksum(tmp_path):
    data = load_split(DATA)
    data["test"] = {k: v[:3] for k, v in data["test"].items()}  # a shortened copy
    save_split(tmp_path / "short.npz", data)
    with pytest.raises(RuntimeError, match="sha256"):
        toy_split(tmp_path / "short.npz")


def test_draw_checked_split_returns_the_split_whose_checksum_it_was_given(tmp_path):
    splits = {"train": make_split(3, 4, 16, 16), "test": make_split(2, 4, 16, 16, stream=1)}
    digest = save_split(tmp_path / "small.npz", splits)
    drawn = draw_checked_split(3, 2, 16, 4, sha256=digest)
    for split, arrays in splits.items():
        for key, value in arrays.items():
            assert np.array_equal(drawn[split][key], value, equal_nan=True), (split, key)
    with pytest.raises(RuntimeError, match="sha256"):
        draw_checked_split(3, 2, 16, 5, sha256=digest)  # another seed, other scenes


def test_toy_split_outside_a_clone_draws_the_split_and_checks_it(monkeypatch, tmp_path):
    calls = []

    def small(train, test, size, seed, sha256):
        calls.append((train, test, size, seed, sha256))
        return draw_checked_split(2, 1, 16, seed, sha256=small_digest)

    small_digest = save_split(
        tmp_path / "s.npz", {"train": make_split(2, 0, 16, 16), "test": make_split(1, 0, 16, 16, stream=1)}
    )
    monkeypatch.setattr(synthetic, "draw_checked_split", small)
    split = toy_split(tmp_path / "missing.npz")
    assert calls == [(256, 64, 64, 0, TOY_SPLIT_SHA256)]
    assert split["train"]["rgb"].shape == (2, 3, 16, 16)
    assert toy_split(None)["test"]["rgb"].shape == (1, 3, 16, 16)
    # drawn or read, the splits come in one order: a notebook that loops over them prints alike
    assert list(split) == list(toy_split()) == ["test", "train"]


def test_toy_split_without_a_file_draws_the_committed_split_bit_for_bit():
    drawn, committed = toy_split(None), load_split(DATA)  # passes the TOY_SPLIT_SHA256 check
    for split in ("train", "test"):
        for key, value in committed[split].items():
            assert np.array_equal(drawn[split][key], value, equal_nan=True), (split, key)
