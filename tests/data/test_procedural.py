"""Procedural dataset (`longlive data synth`): captions from parameters, rendering, determinism, loaders, CLI."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from longlive.cli.main import main
from longlive.config.schema import DEFAULT_SCENE_CUT_PREFIX as P
from longlive.data.procedural import (
    BACKGROUNDS,
    COLOURS,
    MANIFEST,
    MOTIONS,
    SIZES,
    TRAVEL,
    SceneObject,
    SceneParams,
    allowed_colours,
    read_scene,
    render_shot,
    sample_scene,
    sample_shot_list,
    scenes_differ,
    write_procedural_dataset,
)
from longlive.data.prompts import load_prompts
from longlive.data.video_dataset import MultiVideoConcatDataset

SMALL = dict(samples=3, frames=33, height=32, width=32, eval_prompts=3, eval_chunks=5)


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def mask_of(frame: np.ndarray, colour: str) -> np.ndarray:
    return np.all(frame == np.array(COLOURS[colour], dtype=np.uint8), axis=-1)


def centroid(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean())


# ------------------------------------------------------------------------------------------------
# Scene model and captions
# ------------------------------------------------------------------------------------------------
def test_caption_is_a_function_of_the_params_and_names_every_param():
    scene = SceneParams("black", (SceneObject("circle", "red", "large", "right", 0.3, 0.5),))
    assert scene.caption() == "A large red circle in the middle left moves to the right on a black background."
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = sample_scene(rng)
        text = scene.caption()
        assert text == SceneParams.from_dict(json.loads(json.dumps(scene.to_dict()))).caption()
        assert f"on a {scene.background} background." in text
        for obj in scene.objects:
            phrase = {"left": "moves to the left", "right": "moves to the right", "up": "moves up",
                      "down": "moves down", "still": "stays still"}[obj.motion]
            assert f"{obj.size} {obj.colour} {obj.shape} in the {obj.position_words()} {phrase}" in text
        assert all(o.colour in allowed_colours(scene.background) for o in scene.objects)
        assert len({o.colour for o in scene.objects}) == len(scene.objects)
    two = SceneParams("gray", (SceneObject("square", "blue", "small", "up", 0.2, 0.8),
                               SceneObject("triangle", "yellow", "large", "still", 0.8, 0.2)))
    assert two.caption() == ("A small blue square in the bottom left moves up and a large yellow triangle in the "
                             "top right stays still on a gray background.")


def test_invalid_params_are_rejected():
    with pytest.raises(ValueError, match="unknown shape 'hexagon'"):
        SceneObject("hexagon", "red", "large", "left", 0.5, 0.5)
    with pytest.raises(ValueError, match="not separable"):
        SceneParams("white", (SceneObject("circle", "white", "large", "left", 0.5, 0.5),))
    with pytest.raises(ValueError, match="1 or 2 objects"):
        SceneParams("black", ())
    assert "white" not in allowed_colours("white") and "white" in allowed_colours("black")


# ------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("motion", list(MOTIONS))
@pytest.mark.parametrize("shape", ["circle", "square", "triangle"])
def test_object_starts_at_its_position_and_moves_in_its_direction(motion, shape):
    h, w, t = 48, 64, 17
    dx, dy = MOTIONS[motion]
    x = 0.5 - dx * TRAVEL / 2
    y = 0.5 - dy * TRAVEL / 2
    scene = SceneParams("black", (SceneObject(shape, "green", "small", motion, x, y),))
    video = render_shot(scene, t, h, w)
    assert video.shape == (t, h, w, 3) and video.dtype == np.uint8
    first, last = mask_of(video[0], "green"), mask_of(video[-1], "green")
    assert first.sum() > 20 and first.sum() == last.sum()  # fully visible all shot
    assert first[int(y * h), int(x * w)]  # the colour is at the start position in frame 0
    # only the object colour and the background occur
    background = np.all(video == np.array(BACKGROUNDS["black"], dtype=np.uint8), axis=-1)
    assert np.all(background | mask_of(video, "green").reshape(background.shape))
    (x0, y0), (x1, y1) = centroid(first), centroid(last)
    assert x1 - x0 == pytest.approx(dx * TRAVEL * w, abs=1.5)
    assert y1 - y0 == pytest.approx(dy * TRAVEL * h, abs=1.5)
    if motion != "still":
        assert abs(x1 - x0) + abs(y1 - y0) >= 0.3 * min(h, w)  # clearly moves over the shot


def test_two_objects_later_on_top_and_sampled_scenes_stay_inside():
    scene = SceneParams("white", (SceneObject("square", "red", "large", "still", 0.5, 0.5),
                                  SceneObject("circle", "blue", "small", "still", 0.5, 0.5)))
    frame = render_shot(scene, 1, 32, 32)[0]
    assert mask_of(frame, "blue")[16, 16] and mask_of(frame, "red")[16, 11]  # square half 6.4 px, circle radius 4 px
    assert np.all(frame[0, 0] == 255)  # background corner
    rng = np.random.default_rng(1)
    two_objects = 0
    for _ in range(50):
        s = sample_scene(rng)
        video = render_shot(s, 9, 32, 48)
        for obj in s.objects:
            half = SIZES[obj.size] * 32 / 2
            for t in np.linspace(0, 1, 9):  # the shape's bounding box never leaves the frame
                cx, cy = obj.centre(float(t))
                assert half - 1e-6 <= cx * 48 <= 48 - half + 1e-6 and half - 1e-6 <= cy * 32 <= 32 - half + 1e-6
            alone = mask_of(render_shot(SceneParams(s.background, (obj,)), 9, 32, 48), obj.colour)
            assert np.array_equal(mask_of(video, obj.colour), alone)  # objects never occlude each other
            assert alone.reshape(9, -1).sum(1).min() > 0
        assert video.shape == (9, 32, 48, 3)
        two_objects += len(s.objects) == 2
    assert two_objects >= 10


# ------------------------------------------------------------------------------------------------
# Dataset
# ------------------------------------------------------------------------------------------------
def test_same_seed_identical_files_different_seed_different(tmp_path):
    write_procedural_dataset(tmp_path / "a", seed=3, **SMALL)
    write_procedural_dataset(tmp_path / "b", seed=3, **SMALL)
    write_procedural_dataset(tmp_path / "c", seed=4, **SMALL)
    a, b, c = (digest(tmp_path / n) for n in "abc")
    assert a == b and any(k.endswith(".mp4") for k in a)
    assert a != c
    assert [s.to_dict() for s in sample_shot_list(3, 0)] == [s.to_dict() for s in sample_shot_list(3, 0)]
    assert [sample_shot_list(3, i) for i in range(5)] != [sample_shot_list(4, i) for i in range(5)]


def test_shots_change_at_every_cut_and_caption_files_hold_the_scene(tmp_path):
    counts = set()
    for i in range(40):
        shots = sample_shot_list(0, i)
        counts.add(len(shots))
        assert 1 <= len(shots) <= 3
        assert all(scenes_differ(a, b) for a, b in zip(shots[:-1], shots[1:]))
    assert counts == {1, 2, 3}
    write_procedural_dataset(tmp_path, seed=0, **SMALL)
    for s in range(SMALL["samples"]):
        shots = sample_shot_list(0, s)
        files = sorted((tmp_path / "caption" / f"sample_{s:03d}").glob("*.json"))
        assert len(files) == len(shots) == len(list((tmp_path / "video" / f"sample_{s:03d}").glob("*.mp4")))
        for k, scene in enumerate(shots):
            record = json.loads((tmp_path / "caption" / f"sample_{s:03d}" / f"{k}.json").read_text())
            assert record["caption"] == scene.caption() and read_scene(files[k]) == scene


def test_written_dataset_reads_through_multi_video_concat_dataset(tmp_path):
    write_procedural_dataset(tmp_path, seed=0, **SMALL)
    ds = MultiVideoConcatDataset(tmp_path, latent_frames=8, frames_per_chunk=2, frame_size=(32, 32), train=False,
                                 max_chunks_per_shot=2, allow_padding=True)  # one-shot samples give 2 chunks + padding
    assert len(ds) == SMALL["samples"]
    seen_cut = False
    for i in range(len(ds)):
        item = ds[i]
        assert item["name"] == f"sample_{i:03d}" and item["skipped"] == []
        shots = sample_shot_list(0, i)
        captions = [s.caption() for s in shots]
        assert item["frames"].shape == (3, 29, 32, 32)
        assert item["prompts"][0] == captions[0]
        for prompt in item["prompts"]:
            assert prompt.removeprefix(P) in captions
        seen_cut |= any(p.startswith(P) for p in item["prompts"])
        # frame 0 decodes to the rendered frame 0 (up to codec error)
        decoded = ((item["frames"][:, 0].float().permute(1, 2, 0).numpy() + 1) * 127.5)
        rendered = render_shot(shots[0], 1, 32, 32)[0].astype(np.float32)
        assert np.abs(decoded - rendered).mean() < 12
    assert seen_cut


def test_eval_prompt_folders_load_through_the_prompt_loader(tmp_path):
    write_procedural_dataset(tmp_path, seed=0, **SMALL)
    samples = load_prompts(tmp_path / "prompts", num_chunks=SMALL["eval_chunks"])
    assert [s.name for s in samples] == ["eval_000", "eval_001", "eval_002"]
    for sample in samples:
        folder = tmp_path / "prompts" / sample.name
        durations = [int(v) for v in (folder / "shot_durations.txt").read_text().split()]
        shots = [read_scene(folder / f"{k}.json") for k in range(len(durations))]
        assert sum(durations) == sample.num_chunks == SMALL["eval_chunks"]
        assert sample.shot_starts == list(np.cumsum([0] + durations[:-1]))
        assert all(scenes_differ(a, b) for a, b in zip(shots[:-1], shots[1:]))
        expected = [P + s.caption() if k == 0 and j > 0 else s.caption()
                    for j, (s, n) in enumerate(zip(shots, durations)) for k in range(n)]
        assert sample.prompts == expected


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def test_cli_synth_end_to_end_and_rewrite(tmp_path, capsys):
    out = tmp_path / "ds"
    argv = ["data", "synth", "--out", str(out), "--samples", "2", "--seed", "5", "--frames", "9",
            "--height", "32", "--width", "48", "--eval-prompts", "2"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["samples"] == 2 and summary["eval_prompts"] == 2 and summary["out"] == str(out)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["seed"] == 5 and manifest["width"] == 48 and manifest["fps"] == 24.0
    first = digest(out)
    assert summary["videos"] == sum(k.endswith(".mp4") for k in first)
    assert len(load_prompts(out / "prompts", num_chunks=6)) == 2  # default --eval-chunks 6
    (out / "video" / "sample_000" / "9.mp4").write_bytes(b"stale")
    assert main(argv) == 0  # a folder made by synth is rewritten from scratch
    assert digest(out) == first


def test_cli_bad_arguments_give_clear_errors(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not empty and was not made by `longlive data synth`"):
        main(["data", "synth", "--out", str(foreign)])
    assert (foreign / "notes.txt").read_text() == "mine"
    with pytest.raises(SystemExit, match="--height and --width must be even"):
        main(["data", "synth", "--out", str(tmp_path / "x"), "--height", "33"])
    with pytest.raises(SystemExit, match="--samples and --eval-prompts must be >= 0"):
        main(["data", "synth", "--out", str(tmp_path / "x"), "--samples", "-1"])
    with pytest.raises(SystemExit, match="--frames must be >= 1"):
        main(["data", "synth", "--out", str(tmp_path / "x"), "--frames", "0"])
    with pytest.raises(SystemExit, match="no config overrides"):
        main(["data", "synth", "--out", str(tmp_path / "x"), "data.fps=3"])
    with pytest.raises(SystemExit, match="--config is required"):
        main(["data", "encode", "--out", str(tmp_path / "latents")])
