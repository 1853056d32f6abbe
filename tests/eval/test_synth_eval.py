"""Long-horizon eval prompts and the synth judge (`longlive.eval.synth`, `longlive eval`): detector on crafted
renders, validation on a tiny dataset, wrong videos caught, clear errors, CLI."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from longlive.cli.main import main
from longlive.data.procedural import (
    BACKGROUNDS,
    MANIFEST,
    MOTIONS,
    SHAPES,
    SIZES,
    TRAVEL,
    SceneObject,
    SceneParams,
    allowed_colours,
    long_eval_prompt,
    read_scene,
    render_shot,
    scenes_differ,
    write_procedural_dataset,
)
from longlive.data.prompts import load_prompts
from longlive.eval.synth import (
    MOTION_FRACTION,
    PromptShots,
    SynthEvalError,
    aggregate,
    bucket_edges,
    chunk_bounds,
    chunk_travel,
    detect_chunk,
    expected_frames,
    judge_folder,
    judge_video,
    load_prompt_shots,
    render_ground_truth,
    validate_detector,
)
from longlive.io.video import save_video

F = 97  # frames per training shot, as for the demo model
THRESHOLD = MOTION_FRACTION * chunk_travel(32, F)
OBJECT_COLOURS = ["red", "green", "blue", "yellow", "white", "magenta"]


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def centred(shape: str, colour: str, size: str, motion: str, x: float = 0.5, y: float = 0.5) -> SceneObject:
    """An object whose path over a whole training shot is centred on (x, y)."""
    dx, dy = MOTIONS[motion]
    return SceneObject(shape, colour, size, motion, round(x - dx * TRAVEL / 2, 3), round(y - dy * TRAVEL / 2, 3))


def chunk_of(scene: SceneParams, start: int = 32, length: int = 32, h: int = 64, w: int = 64) -> np.ndarray:
    return render_shot(scene, F, h, w)[start:start + length]


def degrade(video: np.ndarray, seed: int) -> np.ndarray:
    """Blurry, noisy, colour-shifted frames: a 3x3 box blur, Gaussian noise (std 8) and a global shift of +-12."""
    rng = np.random.default_rng(seed)
    x = np.pad(video.astype(np.float32), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = video.shape[1:3]
    x = sum(x[:, dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)) / 9
    x = x + rng.normal(0, 8, x.shape) + rng.uniform(-12, 12, 3)
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def write_prompt(folder: Path, scenes: list[SceneParams], durations: list[int]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k, scene in enumerate(scenes):
        (folder / f"{k}.json").write_text(json.dumps({"caption": scene.caption(), "scene": scene.to_dict()}))
    (folder / "shot_durations.txt").write_text(" ".join(map(str, durations)) + "\n")
    return folder


def write_manifest(root: Path, frames: int = F) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / MANIFEST).write_text(json.dumps({"frames": frames, "height": 64, "width": 64, "fps": 24.0}))
    return root


SHOT_A = SceneParams("black", (centred("circle", "red", "large", "right", 0.3, 0.3),
                               centred("square", "yellow", "small", "still", 0.75, 0.75)))
SHOT_B = SceneParams("white", (centred("triangle", "blue", "large", "down", 0.6, 0.4),))
SHOT_C = SceneParams("gray", (centred("square", "red", "small", "left", 0.5, 0.6),
                              centred("circle", "white", "small", "up", 0.2, 0.5)))


# ------------------------------------------------------------------------------------------------
# Long-horizon eval prompts
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_chunks,max_shot_chunks", [(30, 3), (7, 1), (12, 4), (1, 3)])
def test_long_eval_prompt_durations_in_range_sum_and_shots_change(num_chunks, max_shot_chunks):
    for index in range(10):
        shots, durations = long_eval_prompt(0, index, num_chunks, max_shot_chunks)
        assert sum(durations) == num_chunks and len(shots) == len(durations)
        assert all(1 <= d <= max_shot_chunks for d in durations)
        assert all(scenes_differ(a, b) for a, b in zip(shots[:-1], shots[1:]))
    if num_chunks == 30:  # many shots, and durations that vary
        _, durations = long_eval_prompt(0, 0, num_chunks, max_shot_chunks)
        assert len(durations) >= 10 and len(set(durations)) > 1


def test_long_eval_prompt_is_deterministic_and_seeded():
    a = long_eval_prompt(3, 1, 20, 3)
    assert [s.to_dict() for s in a[0]] == [s.to_dict() for s in long_eval_prompt(3, 1, 20, 3)[0]]
    assert a[1] == long_eval_prompt(3, 1, 20, 3)[1]
    assert a != long_eval_prompt(3, 2, 20, 3) and a != long_eval_prompt(4, 1, 20, 3)
    with pytest.raises(ValueError, match="must be >= 1"):
        long_eval_prompt(0, 0, 0, 3)


def test_long_eval_folders_load_and_leave_other_outputs_unchanged(tmp_path):
    small = dict(samples=1, frames=9, height=32, width=32, eval_prompts=2, eval_chunks=4)
    write_procedural_dataset(tmp_path / "plain", **small)
    write_procedural_dataset(tmp_path / "long", long_eval_prompts=2, long_eval_chunks=11, max_shot_chunks=2, **small)
    plain, long = digest(tmp_path / "plain"), digest(tmp_path / "long")
    assert "long_eval_prompts" not in json.loads((tmp_path / "plain" / MANIFEST).read_text())
    assert {k: v for k, v in long.items() if k in plain and k != MANIFEST} == {k: v for k, v in plain.items()
                                                                               if k != MANIFEST}
    manifest = json.loads((tmp_path / "long" / MANIFEST).read_text())
    assert (manifest["long_eval_prompts"], manifest["long_eval_chunks"], manifest["max_shot_chunks"]) == (2, 11, 2)
    samples = load_prompts(tmp_path / "long" / "prompts_long", num_chunks=11)
    assert [s.name for s in samples] == ["long_000", "long_001"]
    for i, sample in enumerate(samples):
        shots, durations = long_eval_prompt(0, i, 11, 2)
        folder = tmp_path / "long" / "prompts_long" / sample.name
        assert [read_scene(folder / f"{k}.json") for k in range(len(shots))] == shots
        assert sample.shot_starts == list(np.cumsum([0] + durations[:-1]))
    # rewriting without long prompts removes prompts_long/
    write_procedural_dataset(tmp_path / "long", **small)
    assert digest(tmp_path / "long") == plain


def test_cli_synth_long_eval_options(tmp_path, capsys):
    out = tmp_path / "ds"
    assert main(["data", "synth", "--out", str(out), "--samples", "1", "--frames", "9", "--height", "32", "--width",
                 "32", "--eval-prompts", "1", "--long-eval-prompts", "3", "--long-eval-chunks", "9",
                 "--max-shot-chunks", "2"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["long_eval_prompts"] == 3
    assert len(load_prompts(out / "prompts_long", num_chunks=9)) == 3
    with pytest.raises(SystemExit, match="--long-eval-prompts must be >= 0"):
        main(["data", "synth", "--out", str(tmp_path / "bad"), "--long-eval-prompts", "-1"])


# ------------------------------------------------------------------------------------------------
# Detector
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("motion", list(MOTIONS))
@pytest.mark.parametrize("shape", SHAPES)
def test_detector_shape_size_motion(shape, motion, size):
    """Every shape x motion x size, on a background and colour that cycle through the palette."""
    i = SHAPES.index(shape) * len(MOTIONS) + list(MOTIONS).index(motion)
    background = list(BACKGROUNDS)[i % 3]
    colour = allowed_colours(background)[i % len(allowed_colours(background))]
    scene = SceneParams(background, (centred(shape, colour, size, motion),))
    for chunk in (chunk_of(scene), degrade(chunk_of(scene), i)):
        det = detect_chunk(chunk, still_threshold=THRESHOLD)
        assert det.background == background and det.colours == [colour], det
        obj = det.get(colour)
        assert (obj.shape, obj.size, obj.motion) == (shape, size, motion), obj


@pytest.mark.parametrize("background", list(BACKGROUNDS))
def test_detector_every_colour_on_every_background(background):
    for colour in allowed_colours(background):
        scene = SceneParams(background, (centred("square", colour, "small", "right", 0.4, 0.6),))
        det = detect_chunk(chunk_of(scene, h=48, w=80), still_threshold=THRESHOLD)
        assert det.background == background and det.colours == [colour], (colour, det)
        assert (det.objects[0].shape, det.objects[0].motion) == ("square", "right")


def test_detector_two_objects_first_chunk_and_large_frames():
    det = detect_chunk(chunk_of(SHOT_A, start=0, length=29, h=128, w=224), still_threshold=THRESHOLD)
    assert det.background == "black" and sorted(det.colours) == ["red", "yellow"]
    assert (det.get("red").shape, det.get("red").size, det.get("red").motion) == ("circle", "large", "right")
    assert (det.get("yellow").shape, det.get("yellow").size, det.get("yellow").motion) == ("square", "small", "still")
    det = detect_chunk(chunk_of(SHOT_C))  # white is an object colour on gray
    assert det.background == "gray" and sorted(det.colours) == ["red", "white"]


def test_detector_still_versus_small_moves_and_specks():
    scene = SceneParams("gray", (centred("circle", "green", "large", "still"),))
    video = chunk_of(scene)
    rng = np.random.default_rng(0)
    jitter = np.stack([np.roll(f, tuple(rng.integers(-1, 2, 2)), axis=(0, 1)) for f in video])  # +-1 px shake
    assert detect_chunk(jitter, still_threshold=THRESHOLD).objects[0].motion == "still"
    creep = np.stack([np.roll(f, t // 16, axis=1) for t, f in enumerate(video)])  # 1 px per 16 frames: 0.03 < 0.045
    assert detect_chunk(creep, still_threshold=THRESHOLD).objects[0].motion == "still"
    slow = np.stack([np.roll(f, t // 4, axis=1) for t, f in enumerate(video)])  # 0.12 of the frame: clearly moves
    assert detect_chunk(slow, still_threshold=THRESHOLD).objects[0].motion == "right"
    specks = video.copy()
    specks[:, rng.integers(0, 64, 40), rng.integers(0, 64, 40)] = (240, 230, 30)  # isolated yellow pixels
    assert detect_chunk(specks).colours == ["green"]
    blank = np.full((32, 64, 64, 3), 255, dtype=np.uint8)
    assert detect_chunk(blank).background == "white" and detect_chunk(blank).objects == ()


# ------------------------------------------------------------------------------------------------
# Judge
# ------------------------------------------------------------------------------------------------
def shots_of(folder: Path) -> PromptShots:
    return load_prompt_shots(folder)


def test_chunk_timing():
    assert expected_frames(1) == 29 and expected_frames(3) == 93
    assert chunk_bounds(3) == [(0, 29), (29, 61), (61, 93)]
    assert bucket_edges(None, 7) == [(0, 3), (3, 6), (6, 9)]
    assert bucket_edges([0, 2, 5], 9) == [(0, 2), (2, 5), (5, None)]
    with pytest.raises(ValueError, match="start at 0"):
        bucket_edges([1, 3], 5)


def test_judge_ground_truth_is_all_correct_with_switches(tmp_path):
    shots = shots_of(write_prompt(tmp_path / "p", [SHOT_A, SHOT_B, SHOT_C], [2, 3, 1]))
    result = judge_video(render_ground_truth(shots, F, 64, 64), shots, F)
    s = result["summary"]
    assert s["chunks"] == 6 and all(v == 1.0 for v in s["accuracy"].values()), s["accuracy"]
    assert s["switch"] == {"accuracy": 1.0, "count": 2}
    assert [r["shot"] for r in result["chunk_results"]] == [0, 0, 1, 1, 1, 2]
    assert all(r["motion_judged"] for r in result["chunk_results"])
    assert all(abs(v) < 1e-6 for r in result["chunk_results"] for v in r["stats_diff"].values())
    json.dumps(result)  # JSON-serialisable


def test_judge_catches_wrong_scene_swapped_shots_frozen_and_stuck_videos(tmp_path):
    shots = shots_of(write_prompt(tmp_path / "p", [SHOT_A, SHOT_B, SHOT_C], [2, 2, 2]))
    # a video of other scenes (same shot durations)
    other = PromptShots("o", tmp_path, (SHOT_C, SHOT_A, SHOT_B), shots.durations)
    wrong = judge_video(render_ground_truth(other, F, 64, 64), shots, F)["summary"]
    assert wrong["accuracy"]["all_correct"] == 0.0 and wrong["switch"]["accuracy"] == 0.0
    assert wrong["stats"]["abs_diff"]["mean_r"] > 20  # background statistics differ from the ground truth
    # the shots in swapped order: A, C, B instead of A, B, C
    swapped = PromptShots("s", tmp_path, (SHOT_A, SHOT_C, SHOT_B), shots.durations)
    res = judge_video(render_ground_truth(swapped, F, 64, 64), shots, F)["summary"]
    assert res["accuracy"]["all_correct"] == pytest.approx(2 / 6, abs=1e-3) and res["switch"]["accuracy"] == 0.0
    # frozen: the right content, but no motion
    gt = render_ground_truth(shots, F, 64, 64)
    frozen = gt.copy()
    for a, b in chunk_bounds(6):
        frozen[a:b] = gt[a]
    res = judge_video(frozen, shots, F)["summary"]
    assert res["accuracy"]["motion"] < 0.3 and res["accuracy"]["shape"] == 1.0 and res["switch"]["accuracy"] == 1.0
    # stuck in the first shot: never switches
    stuck_shots = PromptShots("st", tmp_path, (SHOT_A,), (6,))
    stuck = render_ground_truth(stuck_shots, F, 64, 64)
    res = judge_video(stuck, shots, F)
    assert res["summary"]["switch"] == {"accuracy": 0.0, "count": 2}
    assert [r["all_correct"] for r in res["chunk_results"]][:2] == [True, True]
    failed = res["chunk_results"][2]["switch"]["checks"]
    assert {"what": "background black->white", "ok": False} in failed
    # drift: correct for 2 chunks, wrong afterwards, visible per bucket
    summary = aggregate([res], buckets=2)
    assert [b["accuracy"]["all_correct"] for b in summary["drift"]] == [1.0, 0.0, 0.0]


def test_judge_motion_not_judged_past_a_training_shot(tmp_path):
    scene = SceneParams("black", (SceneObject("circle", "red", "small", "right", 0.2, 0.5),))
    shots = shots_of(write_prompt(tmp_path / "p", [scene], [5]))
    res = judge_video(render_ground_truth(shots, F, 64, 64), shots, F)
    assert [r["motion_judged"] for r in res["chunk_results"]] == [True, True, True, False, False]
    assert res["summary"]["accuracy"]["all_correct"] == 1.0 and res["summary"]["counts"]["motion"] == 3


def make_folder(tmp_path: Path, frames_delta: int = 0, name: str = "eval_000") -> tuple[Path, Path, Path]:
    root = write_manifest(tmp_path / "ds")
    prompts = root / "prompts"
    shots = shots_of(write_prompt(prompts / name, [SHOT_A, SHOT_B], [1, 2]))
    videos = tmp_path / "gen"
    gt = render_ground_truth(shots, F, 64, 64)
    video = gt[: len(gt) + frames_delta] if frames_delta <= 0 else np.concatenate([gt, gt[-frames_delta:]])
    save_video(video, videos / f"0000-{name}-seed0.mp4", fps=24, fsync=False)
    (videos / f"0000-{name}-seed0.prompts.txt").write_text("0 x\n")
    return videos, prompts, root


def test_judge_folder_on_mp4s(tmp_path):
    videos, prompts, root = make_folder(tmp_path)
    result = judge_folder(videos, prompts, root)
    assert result["videos"] == 1 and result["chunks"] == 3 and result["frames_per_shot"] == F
    assert result["accuracy"]["all_correct"] == 1.0 and result["switch"]["accuracy"] == 1.0
    assert result["per_video"][0]["prompt"].endswith("eval_000")
    json.dumps(result)


@pytest.mark.parametrize("delta", [-32, 5])
def test_frame_count_mismatch_names_the_file(tmp_path, delta):
    videos, prompts, root = make_folder(tmp_path, frames_delta=delta)
    with pytest.raises(SynthEvalError, match=r"0000-eval_000-seed0\.mp4: \d+ frames, but its prompt folder .*eval_000"):
        judge_folder(videos, prompts, root)


def test_missing_prompt_folder_and_manifest_name_the_file(tmp_path):
    videos, prompts, root = make_folder(tmp_path)
    (videos / "0001-eval_007-seed3.mp4").write_bytes((videos / "0000-eval_000-seed0.mp4").read_bytes())
    with pytest.raises(SynthEvalError, match=r"0001-eval_007-seed3\.mp4: no prompt folder named 'eval_007'"):
        judge_folder(videos, prompts, root)
    with pytest.raises(SynthEvalError, match="synth.json: not found"):
        judge_folder(videos, prompts, tmp_path)


# ------------------------------------------------------------------------------------------------
# Validation and CLI
# ------------------------------------------------------------------------------------------------
VALIDATION_BOUND = 0.95  # every accuracy of the detector on ground truth; measured 1.0 on this dataset


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "ds"
    write_procedural_dataset(root, samples=3, seed=1, frames=F, height=64, width=64, eval_prompts=2, eval_chunks=4,
                             long_eval_prompts=1, long_eval_chunks=9, max_shot_chunks=3)
    return root


def test_validate_detector_on_tiny_dataset(tiny_dataset):
    result = validate_detector(tiny_dataset)
    assert set(result) >= {"training", "prompts", "prompts_mp4", "prompts_long", "prompts_long_mp4"}
    assert result["training"]["windows"] >= 6
    for part in ("training", "prompts", "prompts_mp4", "prompts_long", "prompts_long_mp4"):
        acc = result[part]["accuracy"]
        assert all(v is None or v >= VALIDATION_BOUND for v in acc.values()), (part, acc, result[part]["failures"])
        assert result[part]["counts"]["motion"] > 0
    for part in ("prompts_long", "prompts_long_mp4"):
        assert result[part]["switch"]["count"] >= 2 and result[part]["switch"]["accuracy"] >= VALIDATION_BOUND
    json.dumps(result)


def test_cli_eval_synth_and_validate(tiny_dataset, tmp_path, capsys):
    videos = tmp_path / "gen"
    for i, folder in enumerate(sorted((tiny_dataset / "prompts_long").iterdir())):
        shots = load_prompt_shots(folder)
        save_video(render_ground_truth(shots, F, 64, 64), videos / f"{i:04d}-{folder.name}-seed0.mp4", fps=24,
                   fsync=False)
    out = tmp_path / "judge.json"
    assert main(["eval", "synth", "--videos", str(videos), "--prompts", str(tiny_dataset / "prompts_long"),
                 "--dataset", str(tiny_dataset), "--buckets", "0,3,6", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "all_ok" in text and "[6,)" in text
    result = json.loads(out.read_text())
    assert result["accuracy"]["all_correct"] >= VALIDATION_BOUND
    assert [b["chunk_range"] for b in result["drift"]] == [[0, 3], [3, 6], [6, None]]
    vout = tmp_path / "validate.json"
    assert main(["eval", "validate", "--dataset", str(tiny_dataset), "--no-mp4", "--json", str(vout)]) == 0
    assert "prompts_long_mp4" not in json.loads(vout.read_text())
    with pytest.raises(SystemExit, match="longlive eval synth: .*videos folder not found"):
        main(["eval", "synth", "--videos", str(tmp_path / "none"), "--prompts", str(tiny_dataset / "prompts"),
              "--dataset", str(tiny_dataset)])
    with pytest.raises(SystemExit):
        main(["eval", "synth", "--videos", str(videos), "--prompts", "p", "--dataset", "d", "--buckets", "2,4"])
