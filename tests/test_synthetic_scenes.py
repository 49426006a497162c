"""The knobs of the synthetic scene and of `edge-stn synth-video` (issue 4 §7): object count,
digit height, rotation, shear, contrast, noise, blur, H.264 through Debian's ffmpeg, and truth
that matches the rendered pixels."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_stn import cli
from edge_stn.data.scenes import (
    INK_THRESHOLD,
    DigitPlacement,
    SceneRenderer,
    compose,
    digit_matrix,
)
from edge_stn.video.synth_video import write_synthetic_video
from edge_stn.video.synthetic import (
    OBJECTS_PER_SEGMENT,
    MotionSettings,
    MovingDigits,
    SyntheticCamera,
    load_digit_asset,
    scene_phase,
)

FIELDS = "codec_name,width,height,nb_frames"
QUIET = {"noise": 0.0, "blur": 0.0, "clutter": 0, "background": (20, 20)}


def segments(gen: MovingDigits, n: int) -> list[int]:
    """The first frame of each of the first ``n`` segments."""
    return [gen.segment_start(k) for k in range(n)]


def test_default_scene_draws_one_to_four_digits_40_to_120_px_tall() -> None:
    gen = MovingDigits(seed=11)
    counts, heights, angles = set(), [], []
    for index in segments(gen, 40):
        objs = gen.scene(index).objects
        counts.add(len(objs))
        for o in objs:
            heights.append(20.0 * o.scale)  # MNIST ink is 20 px of 28: the drawn height
            angles.append(o.angle)
    assert counts == {1, 2, 3, 4}
    assert 40 <= min(heights) < 55 and 105 < max(heights) <= 120
    assert max(np.abs(angles)) <= 45 and max(np.abs(angles)) > 30


def test_a_digit_is_drawn_as_tall_as_its_height_and_at_its_contrast() -> None:
    pool = load_digit_asset()
    r = SceneRenderer(pool, noise=0.0, background=(20, 20))
    for index, scale, ink in ((0, 2.0, 60.0), (15, 6.0, 200.0)):
        scene = r.render(300, 300, [DigitPlacement(index, 0.0, scale, 150, 150, ink=ink)], rng())
        (obj,) = scene.objects
        y0, y1 = obj.box[1], obj.box[3]
        # The digit's own 28x28 ink box, scaled: upright, no shear, the height is 20 s +/- 2 px.
        ys = np.flatnonzero((pool.images[index] > INK_THRESHOLD).any(axis=1))
        assert abs((y1 - y0) - (ys[-1] - ys[0] + 1) * scale) <= 2 * scale
        assert abs(float(scene.image.max()) - 20 - ink) <= 1.0


def test_contrast_noise_and_blur_follow_the_settings() -> None:
    flat = MotionSettings(count=0, **QUIET)
    img = MovingDigits(200, 150, seed=1, settings=flat).scene(0).image
    assert np.all(img == 20)
    noisy = MotionSettings(count=0, noise=6.0, blur=0.0, clutter=0, background=(60, 60))
    img = MovingDigits(200, 150, seed=1, settings=noisy).scene(0).image.astype(np.float64)
    assert 5.7 < img.std() < 6.3 and abs(img.mean() - 60) < 0.3
    sharp = MovingDigits(320, 240, seed=2, settings=MotionSettings(count=2, **QUIET))
    blurred = MovingDigits(
        320, 240, seed=2, settings=MotionSettings(count=2, **{**QUIET, "blur": 1.5})
    )
    a, b = sharp.scene(3).image.astype(np.float64), blurred.scene(3).image.astype(np.float64)
    assert sharp.scene(3).objects == blurred.scene(3).objects  # the same digits and poses
    lap = [np.abs(cv2.Laplacian(x, cv2.CV_64F)).sum() for x in (a, b)]
    assert lap[1] < 0.8 * lap[0]  # blur removes fine detail
    for o in sharp.scene(3).objects:
        assert 50 <= o.ink <= 220


def test_shear_and_aspect_move_the_ink_as_the_placement_says() -> None:
    p = DigitPlacement(3, 0.0, 3.0, 100, 100, shear=0.3, aspect=1.2, ink=255)
    m = digit_matrix(p)
    centre = m @ np.array([13.5, 13.5, 1.0])
    np.testing.assert_allclose(centre, [100, 100])
    # x += shear * y (digit frame), then x scaled by s * sqrt(aspect), y by s / sqrt(aspect).
    np.testing.assert_allclose(m[:, :2], [[3 * 1.2**0.5, 0.3 * 3 / 1.2**0.5], [0, 3 / 1.2**0.5]])


@pytest.mark.parametrize(
    ("width", "height", "seed"), [(320, 240, 4), (1280, 720, 2), (333, 211, 3)]
)
def test_cached_backdrop_renders_what_a_frame_drawn_from_scratch_shows(
    width: int, height: int, seed: int
) -> None:
    """The camera draws a segment's ramp and clutter once (blurred once) and per frame only the
    digits, blurring just the parts around them; without noise its frames are, pixel for pixel,
    background + clutter + digits composed and blurred whole from scratch, in every segment and
    after going back to an earlier one. (Before rounding, OpenCV's blur of a patch and of the
    whole frame may differ in the last bit of a float: never by a grey level in these frames.)"""
    gen = MovingDigits(
        width, height, seed=seed, settings=MotionSettings(noise=0.0, blur=(0.5, 1.5))
    )
    for index in (0, 5, gen.segment_frames + 3, 2 * gen.segment_frames, 7, 61, 90, 119):
        segment, _ = gen.segment_at(index)
        background = gen.renderer.background_image(width, height, gen._rng(3, segment))
        ink = np.zeros((height, width), np.float32)
        rng = gen._rng(2, segment)
        for _ in range(gen.settings.clutter):
            gen.renderer.draw_clutter(ink, rng, zoom=(1.5, 5.0), level=(50.0, 220.0))
        for p in gen.placements(index):
            gen.renderer.draw_digit(ink, p)
        blur = gen._segment(segment).blur
        assert blur > 0
        expected = compose(background, ink, np.random.default_rng(0), blur=blur, noise=0.0)
        np.testing.assert_array_equal(gen.scene(index).image, expected)


def test_settings_reject_impossible_ranges() -> None:
    for bad in ({"count": (3, 1)}, {"height": (0, 10)}, {"contrast": (90, 20)}, {"blur": -1}):
        with pytest.raises(ValueError):
            MotionSettings(**bad)  # type: ignore[arg-type]


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="Debian's ffmpeg is not installed")
def test_synth_video_writes_h264_with_the_knobs_in_its_truth(tmp_path: Path) -> None:
    out, truth = tmp_path / "s.mp4", tmp_path / "s.json"
    args = ["--frames", "20", "--seed", "4", "--objects", "2", "--contrast", "120-140"]
    assert cli.main(["synth-video", "--out", str(out), "--truth", str(truth), *args]) == 0
    probe = subprocess.run(
        ["ffprobe", "-v", "error", "-of", "json", "-show_entries", f"stream={FIELDS}", str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    (stream,) = json.loads(probe.stdout)["streams"]
    assert (stream["codec_name"], stream["width"], stream["height"]) == ("h264", 640, 480)
    assert int(stream["nb_frames"]) == 20
    doc = json.loads(truth.read_text())
    assert doc["codec"] == "h264" and doc["generator"]["count"] == [2, 2]
    objs = [o for f in doc["frames"] for o in f["objects"]]
    assert len(objs) == 40 and all(120 <= o["contrast"] <= 140 for o in objs)
    assert {"angle", "scale", "shear", "aspect", "box"} <= set(objs[0])
    cap = cv2.VideoCapture(str(out))
    ok, first = cap.read()
    cap.release()
    gen = MovingDigits(seed=4, settings=MotionSettings(count=2, contrast=(120, 140)))
    gray = cv2.cvtColor(first, cv2.COLOR_BGR2GRAY).astype(np.float64)
    assert ok and np.abs(gray - gen.scene(0).image).mean() < 3.0  # lossy, but that frame


def test_synth_video_rejects_bad_knobs(capsys: pytest.CaptureFixture[str]) -> None:
    for bad in (["--contrast", "9-3"], ["--objects", "a"], ["--angle", "200"]):
        assert cli.main(["synth-video", "--out", "x.mp4", "--truth", "t.json", *bad]) == 2
        assert bad[0] in capsys.readouterr().err


def rng() -> np.random.Generator:
    return np.random.default_rng(0)


# ---------------------------------------------------------------- scene phase


def ids(gen: MovingDigits, index: int) -> list[int]:
    return [o.object_id for o in gen.scene(index).objects]


def scene_changes(gen: MovingDigits, frames: int) -> list[int]:
    """The frames whose digits are all new (no object id of the frame before), read from the
    rendered truth, not from the generator's arithmetic."""
    return [i for i in range(1, frames) if set(ids(gen, i)).isdisjoint(ids(gen, i - 1))]


def test_seed_zero_has_no_phase_and_changes_scene_at_whole_segments() -> None:
    """Seed 0 keeps the scene it had before phases: new digits at multiples of the segment."""
    for n in (1, 2, 80, 120, 150, 1000):
        assert scene_phase(0, n) == 0
    gen = MovingDigits(160, 120, fps=10, seed=0)
    assert gen.phase_frames == 0 and gen.describe()["phase_frames"] == 0
    n = gen.segment_frames
    assert scene_changes(gen, 3 * n + 1) == [n, 2 * n, 3 * n]
    assert {i // OBJECTS_PER_SEGMENT for i in ids(gen, n - 1)} == {0}
    assert {i // OBJECTS_PER_SEGMENT for i in ids(gen, n)} == {1}


def test_seeds_change_scene_on_different_frames() -> None:
    """Cameras of seeds 0-7 (`edge-stn bench live` gives camera i seed i) never start a new
    segment on the same frame, and seeds 0-3 are at least 1/8 of a segment apart."""
    gens = [MovingDigits(96, 64, fps=15, seed=seed) for seed in range(8)]
    n = gens[0].segment_frames
    changes = [scene_changes(g, 2 * n + 1) for g in gens]
    for a in range(8):
        assert len(changes[a]) in (2, 3)  # every segment change of two segments is seen
        for b in range(a):
            assert set(changes[a]).isdisjoint(changes[b]), (a, b, changes[a], changes[b])
    first4 = sorted(f for c in changes[:4] for f in c)
    assert min(np.diff(first4)) >= n / 8
    assert len({g.phase_frames for g in gens}) == 8
    for n in (2, 80, 120, 150):  # seeds 0 .. n-1 all have their own phase
        assert sorted(scene_phase(seed, n) for seed in range(n)) == list(range(n))


def test_a_phase_shifts_the_scene_timeline_and_nothing_else() -> None:
    """Frame i of a phased generator is frame i + phase of the same seed without phase: the
    same segment's digits on the same paths, pixel for pixel (noise off: its offset is drawn
    per frame index)."""
    quiet = MotionSettings(count=3, noise=0.0)
    phased = MovingDigits(160, 120, fps=10, seed=5, settings=quiet)
    plain = MovingDigits(160, 120, fps=10, seed=5, settings=quiet, phase_frames=0)
    p, n = phased.phase_frames, phased.segment_frames
    assert 0 < p < n and p == scene_phase(5, n)
    assert MovingDigits(160, 120, fps=10, seed=5, phase_frames=p + 3 * n).phase_frames == p
    for i in (0, 1, n - p - 1, n - p, n - p + 1, n, 2 * n + 7):
        a, b = phased.scene(i), plain.scene(i + p)
        assert a.objects == b.objects and a.clutter_boxes == b.clutter_boxes
        np.testing.assert_array_equal(a.image, b.image)


def test_a_phased_scene_keeps_its_digits_moving_smoothly_within_a_segment() -> None:
    """Within a segment of a phased generator the same ids, boxes that move a few pixels from
    frame to frame (also where an unphased generator would start a segment); across its
    boundary, new ids."""
    gen = MovingDigits(320, 240, seed=5, settings=MotionSettings(count=3, noise=0.0))
    n, p = gen.segment_frames, gen.phase_frames
    boundary = n - p
    assert 0 < boundary < n  # the unphased boundary n lies inside the second segment
    prev = {o.object_id: o.box for o in gen.scene(0).objects}
    assert len(prev) == 3
    for i in range(1, n + 20):
        cur = {o.object_id: o.box for o in gen.scene(i).objects}
        if i == boundary:
            assert set(cur).isdisjoint(prev) and len(cur) == 3
        else:
            assert set(cur) == set(prev), i
            jump = max(abs(a - b) for k in cur for a, b in zip(cur[k], prev[k], strict=True))
            assert jump <= 15, (i, jump)  # <= 5.3 px/frame of motion plus a slow turn
        prev = cur


def test_truth_files_and_live_cameras_carry_the_phase(tmp_path: Path) -> None:
    v = write_synthetic_video(
        tmp_path / "s.mp4", tmp_path / "s.json", frames=40, width=96, height=64, fps=10, seed=1
    )
    doc = json.loads(v.truth.read_text())
    gen = MovingDigits(96, 64, fps=10, seed=1)
    assert doc["generator"]["phase_frames"] == gen.phase_frames > 0
    frame_ids = [[o["object_id"] for o in f["objects"]] for f in doc["frames"]]
    changes = [i for i in range(1, 40) if set(frame_ids[i]).isdisjoint(frame_ids[i - 1])]
    assert changes == [gen.segment_start(1)] == [gen.segment_frames - gen.phase_frames]
    assert SyntheticCamera(seed=3).generator.phase_frames == scene_phase(3, 120)
    assert SyntheticCamera(seed=3, phase_frames=0).generator.phase_frames == 0
