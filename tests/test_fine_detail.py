"""The fine-detail experiment of notebook 06: relief metric, relief scenes, statistics, CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from hdn.metrics import relief_error, relief_maps
from hdn.toy.experiments import fine_detail as fd
from hdn.toy.relief import make_relief_batch, make_relief_scene


@pytest.fixture(scope="module")
def batch():
    return make_relief_batch([(7, i) for i in range(12)], size=32)


def test_relief_error_is_zero_for_affine_predictions_and_one_for_flat(batch):
    d, near = batch["depth"].double(), batch["near"]
    assert float(relief_error(-0.5 * d + 3.0, d, near)) < 1e-6  # negative scale too: s is fitted
    assert float(relief_error(torch.ones_like(d), d, near)) == pytest.approx(1.0)
    assert float(relief_error(batch["smooth"].double(), d, near)) == pytest.approx(1.0, abs=1e-6)


def test_relief_error_ignores_scale_and_shift_of_the_labels(batch):
    d, near = batch["depth"].double(), batch["near"]
    p = batch["depth"].double() + 0.01 * torch.randn(
        d.shape, generator=torch.Generator().manual_seed(1)
    )
    a = relief_error(p, d, near, reduction="none")
    b = relief_error(p, 4.0 * d - 2.0, near, reduction="none")
    assert torch.allclose(a, b, atol=1e-9)


def test_relief_error_ranks_the_calibration_ladder(batch):
    errors = {
        k: float(relief_error(v, batch["depth"], batch["near"]))
        for k, v in fd.calibration_ladder(batch).items()
    }
    assert errors["exact"] < 1e-6
    assert (
        errors["exact"]
        < errors["log depth"]
        < errors["box blur 3"]
        < errors["box blur 5"]
        < errors["box blur 9"]
    )
    assert errors["log depth"] < 0.1 and errors["box blur 5"] < 1.0
    assert errors["relief removed"] == pytest.approx(1.0) and errors["flat"] == pytest.approx(1.0)


def test_plane_alignment_ignores_a_wrong_tilt_and_affine_alignment_does_not():
    # The relief exact, the object's tilt wrong (opposite and larger): only the relief should count.
    y, x = torch.meshgrid(torch.arange(20.0).double(), torch.arange(20.0).double(), indexing="ij")
    relief = 0.05 * torch.sin(1.3 * x) * torch.cos(1.1 * y)
    g = 2.0 + 0.01 * x + relief
    pred = 2.0 - 0.05 * x + relief
    near = torch.ones(1, 20, 20, dtype=torch.bool)
    assert float(relief_error(pred[None], g[None], near, align="plane")) < 1e-6
    affine = float(relief_error(pred[None], g[None], near))
    assert affine > 1.0  # the fitted scale is negative: the relief counts as flipped
    # Without a tilt error the two alignments agree.
    assert float(relief_error(g[None] * 3 - 1, g[None], near, align="plane")) < 1e-6


def test_relief_error_averages_objects_within_an_image():
    y, x = torch.meshgrid(torch.arange(16.0), torch.arange(32.0), indexing="ij")
    g = 2.0 + 0.05 * torch.sin(1.3 * x) * torch.cos(1.1 * y)
    near = torch.zeros(16, 32, dtype=torch.bool)
    near[:, :14] = True
    near[:, 18:] = True  # two objects, 4 px apart
    pred = torch.where(x < 16, g, torch.full_like(g, 2.0))  # left exact, right flat
    assert float(relief_error(pred[None], g[None], near[None])) == pytest.approx(0.5, abs=1e-6)


def test_relief_error_gives_nan_for_images_without_objects():
    g = torch.rand(2, 1, 16, 16) + 1
    near = torch.zeros(2, 1, 16, 16, dtype=torch.bool)
    near[0, 0, 2:14, 2:14] = True
    per_image = relief_error(g, g, near, reduction="none")
    assert per_image.shape == (2,) and per_image[0] < 1e-6 and math.isnan(float(per_image[1]))
    assert math.isnan(float(relief_error(g, g, torch.zeros_like(near))))


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"sigma": 0}, "sigma"),
        ({"erode": -1}, "erode"),
        ({"min_pixels": 1}, "min_pixels"),
        ({"reduction": "sum"}, "reduction"),
        ({"align": "scale"}, "align"),
    ],
)
def test_relief_error_rejects_bad_options(kwargs, word):
    g = torch.rand(1, 1, 8, 8)
    with pytest.raises(ValueError, match=word):
        relief_error(g, g, g > 0, **kwargs)


def test_relief_error_rejects_a_non_bool_near_map_and_wrong_shapes():
    g = torch.rand(1, 1, 8, 8)
    with pytest.raises(ValueError, match="near"):
        relief_error(g, g, torch.ones(1, 1, 8, 8))
    with pytest.raises(ValueError, match="target"):
        relief_error(g, torch.rand(1, 1, 8, 9), g > 0)


def test_relief_scene_tilt_sets_the_slope_of_the_objects_planes():
    flat = make_relief_scene((5, 2), 32, tilt=0.0)
    for k in range(int(flat.labels.max()) + 1):
        plane = flat.smooth[flat.labels == k]
        assert np.ptp(plane) < 1e-6 * plane.mean()  # tilt 0: each object's plane is level
    steep = make_relief_scene((5, 2), 32, tilt=0.02)
    usual = make_relief_scene((5, 2), 32)
    assert np.array_equal(usual.depth, make_relief_scene((5, 2), 32, tilt=0.01).depth)
    obj = usual.labels == 0
    slope = np.ptp(steep.smooth[obj] - flat.smooth[obj])
    assert slope == pytest.approx(2 * np.ptp(usual.smooth[obj] - flat.smooth[obj]), rel=1e-4)
    for bad in (-0.01, 0.1, True, "0.01"):
        with pytest.raises(ValueError, match="tilt"):
            make_relief_scene(0, 32, tilt=bad)


def test_relief_scenes_are_deterministic_by_seed():
    a, b, c = (
        make_relief_scene((3, 1), 32),
        make_relief_scene((3, 1), 32),
        make_relief_scene((3, 2), 32),
    )
    for name in ("rgb", "depth", "smooth", "near", "labels", "gt"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.depth, c.depth)


def test_relief_scene_objects_are_separate_near_components_with_relief():
    for i in range(20):
        s = make_relief_scene((5, i), 32)
        k = int(s.labels.max()) + 1
        assert 1 <= k <= 2 and np.array_equal(s.near, s.labels >= 0)
        assert (s.depth[s.near] < 4).all() and (s.depth[~s.near] > 15).all()
        assert np.abs(s.depth - s.smooth)[s.near].max() > 0.02
        if k == 2:  # the two objects never touch: a gap of at least one column
            cols = [set(np.nonzero((s.labels == j).any(axis=0))[0]) for j in range(2)]
            assert max(cols[0]) + 1 < min(cols[1])


def test_relief_scene_can_have_disparity_labels():
    s = make_relief_scene(0, 32, disparity_fraction=1.0)
    assert s.disparity
    corr = np.corrcoef(s.gt.ravel(), 1.0 / s.depth.ravel())[0, 1]
    assert abs(corr) > 0.999


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"size": 8}, "size"),
        ({"disparity_fraction": 2.0}, "disparity_fraction"),
        ({"seed": -1}, "seed"),
    ],
)
def test_relief_scene_rejects_bad_input(kwargs, word):
    args = {"seed": 0, **kwargs}
    with pytest.raises(ValueError, match=word):
        make_relief_scene(**args)


def test_paired_t_interval_matches_a_hand_computation():
    d = [0.1, 0.3, 0.2, 0.4, 0.0]
    mean, low, high = fd.paired_t_interval(d)
    half = 2.776 * np.std(d, ddof=1) / math.sqrt(5)
    assert (mean, low, high) == pytest.approx((0.2, 0.2 - half, 0.2 + half))
    with pytest.raises(ValueError, match="differences"):
        fd.paired_t_interval([1.0])


def test_bootstrap_interval_is_deterministic_and_brackets_the_mean():
    d = np.random.default_rng(0).normal(0.1, 0.05, 200).tolist() + [math.nan]
    a, b = fd.bootstrap_interval(d, seed=3), fd.bootstrap_interval(d, seed=3)
    assert a == b and a[1] < a[0] < a[2] and a[1] > 0


def test_verdict_follows_the_pre_registered_rule():
    assert fd.verdict(-0.2, -0.01) == "keeps finer near detail"
    assert fd.verdict(-0.2, 0.01) == "no difference shown"
    assert fd.verdict(0.01, 0.2) == "loses near detail"


def test_interior_labels_erode_each_object_separately():
    lab = torch.full((1, 1, 6, 12), -1)
    lab[..., :, :6] = 0
    lab[..., :, 6:] = 1  # touching objects: the seam is removed from both
    inner = fd.interior_labels(lab, 1)
    assert set(inner[inner >= 0].unique().tolist()) == {0, 1}
    assert (
        (inner[..., :, 5:7] == -1).all()
        and (inner[..., 1:-1, 4] == 0).all()
        and (inner[..., 0, :] == -1).all()
    )


def test_every_arm_loss_is_zero_for_an_affine_prediction_and_positive_otherwise():
    b = make_relief_batch([(1, i) for i in range(2)], size=32)
    for arm in fd.ARMS:
        loss = fd.make_arm_loss(arm)
        assert float(loss(2 * b["gt"] + 1, b["gt"], b["labels"])) < 1e-4
        assert float(loss(b["smooth"], b["gt"], b["labels"])) > 0


def test_cli_smoke_run_writes_rows_and_resumes(tmp_path):
    out = tmp_path / "rows.jsonl"
    argv = ["--arms", "ssi", "object", "--seeds", "0", "--steps", "2", "--pool", "8",
            "--test-scenes", "4", "--disparity-arms", "ssi", "--out", str(out)]  # fmt: skip
    rows = fd.main(argv)
    # The disparity add-on runs after the main arms; attempt 2's defaults fill the rest.
    assert [(r["config"]["arm"], r["config"]["disparity_fraction"]) for r in rows] == [
        ("ssi", 0.0), ("object", 0.0), ("ssi", 1.0)
    ]
    assert rows[0]["config"]["tilt"] == 0.002 and rows[0]["config"]["batch_size"] == 12
    assert '"disparity_fraction"' not in rows[0]["key"] and '"disparity_fraction"' in rows[2]["key"]
    stored = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(stored) == 3 and stored[0]["config"]["steps"] == 2
    assert len(stored[0]["relief_plane_per_scene"]) == 4
    for key in (
        "metrics",
        "relief_per_scene",
        "grad_share",
        "wall_time_s",
        "torch",
        "git_commit",
        "git_dirty",
        "started_utc",
        "host",
    ):
        assert key in stored[0]
    assert isinstance(stored[0]["git_dirty"], bool) and stored[0]["started_utc"] <= stored[0]["finished_utc"]
    assert len(stored[0]["relief_per_scene"]) == 4
    assert [g["step"] for g in stored[0]["grad_share"]] == [1, 2]
    assert fd.main(argv) == []  # resumable: nothing left to run
    assert len(out.read_text().splitlines()) == 3


def test_cli_rejects_a_bad_shard(tmp_path):
    with pytest.raises(ValueError, match="shard"):
        fd.main(["--shard", "2/2", "--out", str(tmp_path / "x.jsonl")])


def _rows():
    out = []
    for arm, offset in (("ssi", 0.0), ("hdn-dr", -0.1)):
        for seed in range(3):
            per_scene = [0.5 + offset + 0.01 * seed, 0.7 + offset, math.nan]
            out.append({"config": {"arm": arm, "seed": seed}, "relief_per_scene": per_scene,
                        "metrics": {"relief_error": float(np.nanmean(per_scene))}})  # fmt: skip
    return out


def test_paired_differences_pair_by_seed():
    d = fd.paired_differences(_rows()[:-1], "hdn-dr")  # seed 2 of hdn-dr missing
    assert list(d) == [0, 1] and all(v == pytest.approx(-0.1) for v in d.values())


def test_scene_differences_average_over_seeds_and_keep_nan_scenes():
    d = fd.scene_differences(_rows(), "hdn-dr")
    assert d[:2] == pytest.approx([-0.1, -0.1]) and math.isnan(d[2])
    with pytest.raises(ValueError, match="arm"):
        fd.scene_differences(_rows(), "hdn-ds")


@pytest.mark.parametrize(
    "kwargs, word",
    [({"arm": "mse"}, "arm"), ({"steps": -1}, "steps"), ({"size": 36}, "size"),
     ({"lr": 0.0}, "lr"), ({"tilt": 0.2}, "tilt"), ({"tilt": True}, "tilt"),
     ({"disparity_fraction": 1.5}, "disparity_fraction"),
     ({"disparity_fraction": True}, "disparity_fraction")],
)  # fmt: skip
def test_run_config_rejects_bad_values(kwargs, word):
    with pytest.raises(ValueError, match=word):
        fd.RunConfig(**kwargs)


def test_run_config_tilt_reaches_the_test_scenes():
    flat = fd.make_test_set(fd.RunConfig(tilt=0.0, test_scenes=4))
    usual = fd.make_test_set(fd.RunConfig(test_scenes=4))
    plain = make_relief_batch([(fd.TEST_SEED, i) for i in range(4)])
    assert torch.equal(usual["depth"], plain["depth"])
    assert not torch.equal(flat["smooth"], usual["smooth"])


def test_run_config_key_leaves_out_a_default_disparity_fraction():
    # Rows written before the option existed (attempt 1, the pilots) keep their keys.
    old = json.loads(fd.RunConfig().key())
    assert "disparity_fraction" not in old and "tilt" in old
    assert json.loads(fd.RunConfig(disparity_fraction=1.0).key())["disparity_fraction"] == 1.0
    assert fd.RunConfig(disparity_fraction=1.0).metric_space == "inverse_depth"
    assert fd.RunConfig().metric_space == "depth"


def test_committed_control_rows_are_the_ones_attempt_2_plans():
    preset = {k: v for k, v in fd.ATTEMPTS[2].items() if k not in ("out", "disparity_arms")}
    plan = fd._plan(fd.ARMS, range(5), fd.RunConfig(**preset), fd.ATTEMPTS[2]["disparity_arms"])
    keys = {c.key() for c in plan}
    rows = fd.load_rows(name="fine_detail_attempt2.jsonl")
    control = [r for r in rows if r["config"]["arm"] == "object"]
    assert sorted(r["config"]["seed"] for r in control) == [0, 1, 2, 3, 4]
    assert all(r["key"] in keys for r in rows)  # every committed row is a planned run
    # The disparity add-on comes after every main run.
    disparity = [c.disparity_fraction for c in plan]
    assert disparity == sorted(disparity) and disparity.count(1.0) == 10


def test_select_rows_and_duplicate_runs_are_refused():
    rows = _rows()
    twin = dict(rows[0], config=dict(rows[0]["config"], disparity_fraction=1.0))
    with pytest.raises(ValueError, match="select"):
        fd.paired_differences([*rows, twin], "hdn-dr")
    assert fd.select_rows([*rows, twin], disparity_fraction=0.0) == rows
    assert fd.select_rows([*rows, twin], disparity_fraction=1.0) == [twin]
    with pytest.raises(ValueError, match="options"):
        fd.select_rows(rows, colour="red")


def test_complete_seeds_keep_only_seeds_with_every_arm():
    rows = _rows()  # ssi and hdn-dr at seeds 0-2; the last row is hdn-dr at seed 2
    assert fd.complete_seeds(rows, ("ssi", "hdn-dr")) == [0, 1, 2]
    assert fd.complete_seeds(rows[:-1], ("ssi", "hdn-dr")) == [0, 1]
    assert fd.complete_seeds(rows, ("ssi", "hdn-ds")) == []


def test_relief_maps_are_what_relief_error_compares(batch):
    d, near = batch["depth"].double(), batch["near"]
    noisy = d + 0.01 * torch.randn(d.shape, generator=torch.Generator().manual_seed(3)).double()
    maps = relief_maps(noisy, d, near)
    assert maps["target"].shape == (12, 32, 32) and maps["interior"].dtype == torch.bool
    assert not maps["target"][~maps["interior"]].any() and not maps["pred"][~maps["interior"]].any()
    # Two objects, left and right: the image's error is the mean of their relative residuals.
    y, x = torch.meshgrid(torch.arange(24.0), torch.arange(24.0), indexing="ij")
    g = (3.0 + 0.05 * torch.sin(1.3 * x) * torch.cos(0.9 * y)).double()[None]
    two = torch.zeros(1, 24, 24, dtype=torch.bool)
    two[:, 2:22, 1:11] = True
    two[:, 2:22, 13:23] = True
    p = g + 0.02 * torch.cos(2.1 * x).double()[None]
    m = relief_maps(p, g, two)
    parts = []
    for half in (slice(0, 12), slice(12, 24)):
        res = (m["pred"] - m["target"])[..., half].norm()
        parts.append(float(res / m["target"][..., half].norm()))
    expected = float(relief_error(p, g, two, align="plane"))
    assert np.mean(parts) == pytest.approx(expected, rel=1e-9)
    assert float(relief_error(p, g, two)) != pytest.approx(expected, rel=1e-6)  # "affine" differs


def test_far_background_is_the_default_and_keys_stay_as_before():
    assert fd.RunConfig().background == "far" and "background" not in fd.RunConfig().key()
    assert json.loads(fd.RunConfig(background="ground").key())["background"] == "ground"
    with pytest.raises(ValueError, match="background"):
        fd.RunConfig(background="sky")
    with pytest.raises(ValueError, match="background"):
        make_relief_scene(0, background="sky")


@pytest.mark.parametrize(
    "background, gap_low, gap_high",
    [("far", 14.0, 60.0), ("mid", 4.0, 14.0), ("close", 0.0, 4.6)],
)
def test_backgrounds_set_the_depth_gap_behind_the_objects(background, gap_low, gap_high):
    for i in range(40):
        s = make_relief_scene((3, i), 32, tilt=0.002, background=background)
        gap = s.depth[~s.near].min() - s.depth[s.near].max()
        assert gap_low <= gap <= gap_high, (i, gap)


def test_ground_background_leaves_no_gap_and_keeps_the_objects():
    for i in range(40):
        far = make_relief_scene((3, i), 32, tilt=0.002)
        s = make_relief_scene((3, i), 32, tilt=0.002, background="ground")
        d, near = s.depth, s.near
        # the ground runs from in front of the objects to far behind them ...
        assert d[~near].min() < d[near].min() and d[~near].max() > 20
        # ... and beside each object's base it has the object's depth (the object stands on it)
        for k in range(int(s.labels.max()) + 1):
            rows = np.nonzero((s.labels == k).any(axis=1))[0]
            base = d[rows.max() + 1 if rows.max() + 1 < 32 else rows.max()][~near[rows.max()]]
            z = s.smooth[s.labels == k].mean()
            assert np.abs(base - z).min() < 0.35 * z, (i, k)
        # the same seed draws the same objects (as many, at the same distances)
        assert int(far.labels.max()) == int(s.labels.max())
        for k in range(int(s.labels.max()) + 1):
            z_far, z = far.smooth[far.labels == k].mean(), s.smooth[s.labels == k].mean()
            assert z == pytest.approx(z_far, rel=0.05)


@pytest.mark.parametrize("text, expected", [("0/1", (0, 1)), ("1/2", (1, 2)), ("3/11", (3, 11))])
def test_parse_shard_reads_i_of_n(text, expected):
    assert fd.parse_shard(text) == expected


@pytest.mark.parametrize("text", ["2/2", "3/2", "-1/2", "0/0", "1", "1/2/3", "a/b", "1/", ""])
def test_parse_shard_rejects_anything_but_i_of_n_with_i_below_n(text):
    with pytest.raises(ValueError, match=r"Invalid shard: we expect I/N with 0 <= I < N\. Got: "):
        fd.parse_shard(text)


def test_run_and_record_appends_the_row_and_prints_one_line(tmp_path, monkeypatch, capsys):
    metrics = {"relief_error": 0.5, "relief_error_plane": 0.25, "abs_rel": 0.125}
    monkeypatch.setattr(fd, "run", lambda config: {"key": config.key(), "metrics": metrics,
                                                   "wall_time_s": 12.4})  # fmt: skip
    out = tmp_path / "rows.jsonl"
    row = fd.run_and_record(fd.RunConfig(), out, "ssi seed 0")
    assert fd.load_rows(out) == [row] and row["metrics"] == metrics
    assert capsys.readouterr().out == "ssi seed 0: relief_error_plane 0.2500 abs_rel 0.1250 (12 s)\n"
    fd.run_and_record(fd.RunConfig(seed=1), out, "x", summary="{relief_error:.2f}")
    assert len(fd.load_rows(out)) == 2 and capsys.readouterr().out == "x: 0.50 (12 s)\n"


def test_the_last_curve_point_s_prediction_is_the_final_evaluation(monkeypatch):
    tiny = {"arm": "hdn-dr", "steps": 3, "pool": 8, "batch_size": 2, "test_scenes": 4, "base": 8}
    predictions = []
    predict = fd._predict
    monkeypatch.setattr(fd, "_predict", lambda model, test: predictions.append(1) or predict(model, test))
    row = fd.run(fd.RunConfig(curve_points=2, **tiny))
    # curve points at steps 2 and 3; step 3's prediction is also the final one: two predictions
    assert [p["step"] for p in row["curve"]] == [2, 3] and len(predictions) == 2
    assert row["metrics"]["relief_error_plane"] == row["curve"][-1]["relief_error_plane"]
    # the same as a run without a curve, which predicts once after training
    plain = fd.run(fd.RunConfig(**tiny))
    assert len(predictions) == 3
    assert row["metrics"] == plain["metrics"]
    for field in ("relief_per_scene", "relief_plane_per_scene", "grad_share"):
        assert row[field] == plain[field]
