"""Procedural video dataset: coloured shapes moving on plain backgrounds, with captions that describe them.

A shot is a `SceneParams` (background colour, 1-2 `SceneObject`s: shape, colour, size, motion, start
position); `SceneParams.caption()` is a deterministic English sentence naming every parameter, and
`render_shot` draws the shot as uint8 `[T, H, W, 3]` frames (numpy, no antialiasing). Objects move a fixed
fraction of the frame over a shot (`TRAVEL`, whatever the frame count) and start positions are sampled so
that objects stay fully inside the frame for the whole shot (the renderer clips, it never wraps).

`write_procedural_dataset` writes multi-shot samples in the `MultiVideoConcatDataset` layout
(`video/<sample>/<k>.mp4` + `caption/<sample>/<k>.json` holding {"caption", "scene", ...}) and evaluation
prompt folders `prompts/<name>/{0.json, 1.json, ..., shot_durations.txt}` loadable by
`longlive.data.prompts.load_prompts`. Everything is a function of the seed: sample i uses the generator
`default_rng([seed, 0, i])`, eval prompt i `default_rng([seed, 1, i])`, long eval prompt i
`default_rng([seed, 2, i])`, and the MP4 encoder is deterministic, so the same arguments give byte-identical files.

Long-horizon evaluation prompts (`long_eval_prompt`, written only when `long_eval_prompts > 0`) go to
`prompts_long/long_<i>/` in the same format: many shots of 1..`max_shot_chunks` chunks each (summing to
`long_eval_chunks`), every shot differing from the previous one. Keep `max_shot_chunks` at most the number of
chunks that fit in one training shot (`frames`; 3 chunks = 93/96 pixel frames for `frames` 97), so that every
evaluated shot has a ground truth at training speed.

A folder made by synth holds `synth.json` (the arguments; the long-prompt arguments are recorded only when
`long_eval_prompts > 0`, so earlier arguments still give byte-identical files). Writing into such a folder
replaces its `video/`, `caption/`, `prompts/`, `prompts_long/` and `synth.json`; a non-empty folder without
`synth.json` is refused.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

logger = logging.getLogger(__name__)

BACKGROUNDS: dict[str, tuple[int, int, int]] = {"black": (0, 0, 0), "gray": (128, 128, 128), "white": (255, 255, 255)}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30), "green": (30, 200, 30), "blue": (40, 60, 240),
    "yellow": (240, 230, 30), "white": (255, 255, 255), "magenta": (230, 40, 230),
}
SHAPES = ("circle", "square", "triangle")
SIZES: dict[str, float] = {"small": 0.25, "large": 0.4}  # side / diameter as a fraction of min(H, W)
MOTIONS: dict[str, tuple[float, float]] = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0),
                                           "down": (0.0, 1.0), "still": (0.0, 0.0)}
TRAVEL = 0.35  # distance moved over one shot, as a fraction of the frame width (left/right) or height (up/down)
MIN_COLOUR_DISTANCE = 200  # L1 distance (uint8) between an object colour and its background
MANIFEST = "synth.json"
_MOTION_PHRASES = {"left": "moves to the left", "right": "moves to the right", "up": "moves up", "down": "moves down",
                   "still": "stays still"}


def allowed_colours(background: str) -> list[str]:
    """Object colours separable from `background` (L1 distance >= MIN_COLOUR_DISTANCE), in palette order."""
    bg = np.array(BACKGROUNDS[background])
    return [name for name, rgb in COLOURS.items() if int(np.abs(np.array(rgb) - bg).sum()) >= MIN_COLOUR_DISTANCE]


@dataclass(frozen=True)
class SceneObject:
    """One shape; (x, y) is its centre at frame 0 as fractions of the frame width / height."""

    shape: str
    colour: str
    size: str
    motion: str
    x: float
    y: float

    def __post_init__(self) -> None:
        for value, options, what in ((self.shape, SHAPES, "shape"), (self.colour, COLOURS, "colour"),
                                     (self.size, SIZES, "size"), (self.motion, MOTIONS, "motion")):
            if value not in options:
                raise ValueError(f"unknown {what} {value!r}; choose from {list(options)}")
        if not (0.0 <= self.x <= 1.0 and 0.0 <= self.y <= 1.0):
            raise ValueError(f"start position ({self.x}, {self.y}) must be fractions of the frame in [0, 1]")

    def centre(self, t: float) -> tuple[float, float]:
        """Centre (x, y) in frame fractions at shot progress t in [0, 1]."""
        dx, dy = MOTIONS[self.motion]
        return self.x + dx * TRAVEL * t, self.y + dy * TRAVEL * t

    def position_words(self) -> str:
        """Coarse start position: 'top left', 'center', 'middle right', ... (thirds of the frame)."""
        row = ("top", "middle", "bottom")[min(int(self.y * 3), 2)]
        col = ("left", "center", "right")[min(int(self.x * 3), 2)]
        return "center" if (row, col) == ("middle", "center") else f"{row} {col}"

    def phrase(self, first: bool) -> str:
        article = "A" if first else "a"
        return (f"{article} {self.size} {self.colour} {self.shape} in the {self.position_words()} "
                f"{_MOTION_PHRASES[self.motion]}")


@dataclass(frozen=True)
class SceneParams:
    """One shot: a background colour and 1-2 objects (drawn in order, later ones on top)."""

    background: str
    objects: tuple[SceneObject, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; choose from {list(BACKGROUNDS)}")
        object.__setattr__(self, "objects", tuple(self.objects))
        if not 1 <= len(self.objects) <= 2:
            raise ValueError(f"a scene has 1 or 2 objects, got {len(self.objects)}")
        ok = allowed_colours(self.background)
        for obj in self.objects:
            if obj.colour not in ok:
                raise ValueError(f"{obj.colour} is not separable from a {self.background} background; choose from {ok}")

    def caption(self) -> str:
        """E.g. 'A large red circle in the top left moves to the right on a black background.'"""
        parts = [obj.phrase(i == 0) for i, obj in enumerate(self.objects)]
        return f"{' and '.join(parts)} on a {self.background} background."

    def to_dict(self) -> dict[str, Any]:
        return {"background": self.background, "objects": [asdict(o) for o in self.objects]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SceneParams":
        return cls(background=data["background"], objects=tuple(SceneObject(**o) for o in data["objects"]))


# ------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------
def _shape_mask(shape: str, cx: float, cy: float, half: float, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Boolean [H, W] mask of a shape centred at pixel (cx, cy) with half-size `half` pixels."""
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        return dx * dx + dy * dy <= half * half
    if shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    # triangle pointing up: apex at the top of the bounding box, base at the bottom
    depth = dy + half  # 0 at the apex, 2 * half at the base
    return (depth >= 0) & (depth <= 2 * half) & (np.abs(dx) <= depth / 2)


def render_shot(params: SceneParams, frames: int, height: int, width: int) -> np.ndarray:
    """uint8 `[frames, height, width, 3]`: objects move TRAVEL of the frame from frame 0 to the last frame."""
    if frames < 1 or height < 1 or width < 1:
        raise ValueError(f"frames, height and width must be >= 1, got {frames}, {height}, {width}")
    ys, xs = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
    out = np.empty((frames, height, width, 3), dtype=np.uint8)
    out[:] = np.array(BACKGROUNDS[params.background], dtype=np.uint8)
    for t in range(frames):
        progress = t / (frames - 1) if frames > 1 else 0.0
        for obj in params.objects:
            cx, cy = obj.centre(progress)
            half = SIZES[obj.size] * min(height, width) / 2
            mask = _shape_mask(obj.shape, cx * width, cy * height, half, ys, xs)
            out[t][mask] = np.array(COLOURS[obj.colour], dtype=np.uint8)
    return out


# ------------------------------------------------------------------------------------------------
# Sampling
# ------------------------------------------------------------------------------------------------
def _start_range(motion_component: float, half: float) -> tuple[float, float]:
    """Start coordinates (fractions) that keep an object of fractional half-size `half` inside for the shot."""
    lo, hi = half, 1.0 - half
    if motion_component > 0:
        hi -= TRAVEL
    elif motion_component < 0:
        lo += TRAVEL
    return lo, hi


def sample_scene(rng: np.random.Generator) -> SceneParams:
    """Random scene: background, 1-2 objects with distinct colours, starts that keep them fully visible.

    A second object is placed so that its path never overlaps the first one's (when no such place is found
    in a few tries the scene keeps one object)."""
    background = str(rng.choice(list(BACKGROUNDS)))
    colours = allowed_colours(background)
    count = int(rng.integers(1, 3))
    picked = [colours[i] for i in rng.permutation(len(colours))[:count]]
    objects: list[SceneObject] = []
    for colour in picked:
        shape, size, motion = str(rng.choice(SHAPES)), str(rng.choice(list(SIZES))), str(rng.choice(list(MOTIONS)))
        # SIZES are fractions of min(H, W), so half of it bounds the half-size along either axis.
        half = SIZES[size] / 2
        mx, my = MOTIONS[motion]
        for _ in range(_PLACEMENT_TRIES):  # a second object must never overlap the first (both stay visible)
            x = round(float(rng.uniform(*_start_range(mx, half))), 3)
            y = round(float(rng.uniform(*_start_range(my, half))), 3)
            obj = SceneObject(shape=shape, colour=colour, size=size, motion=motion, x=x, y=y)
            if all(_paths_disjoint(obj, other) for other in objects):
                objects.append(obj)
                break
    return SceneParams(background=background, objects=tuple(objects))


_PLACEMENT_TRIES = 50


def _swept_box(obj: SceneObject) -> tuple[float, float, float, float]:
    """Bounding box (x0, y0, x1, y1) in frame fractions of everything the object covers during the shot."""
    half = SIZES[obj.size] / 2
    (xa, ya), (xb, yb) = obj.centre(0.0), obj.centre(1.0)
    return min(xa, xb) - half, min(ya, yb) - half, max(xa, xb) + half, max(ya, yb) + half


def _paths_disjoint(a: SceneObject, b: SceneObject) -> bool:
    ax0, ay0, ax1, ay1 = _swept_box(a)
    bx0, by0, bx1, by1 = _swept_box(b)
    return ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0


def scenes_differ(a: SceneParams, b: SceneParams) -> bool:
    """True when background, or any object's colour, shape or motion differs (or the object count)."""
    if a.background != b.background or len(a.objects) != len(b.objects):
        return True
    return any((p.colour, p.shape, p.motion) != (q.colour, q.shape, q.motion) for p, q in zip(a.objects, b.objects))


def sample_shots(rng: np.random.Generator, num_shots: int) -> list[SceneParams]:
    """`num_shots` scenes, each differing from the previous one (`scenes_differ`)."""
    shots: list[SceneParams] = []
    while len(shots) < num_shots:
        scene = sample_scene(rng)
        if not shots or scenes_differ(shots[-1], scene):
            shots.append(scene)
    return shots


def sample_rng(seed: int, index: int) -> np.random.Generator:
    """Generator of training sample `index`."""
    return np.random.default_rng([int(seed), 0, int(index)])


def eval_rng(seed: int, index: int) -> np.random.Generator:
    """Generator of evaluation prompt `index`."""
    return np.random.default_rng([int(seed), 1, int(index)])


def long_eval_rng(seed: int, index: int) -> np.random.Generator:
    """Generator of long-horizon evaluation prompt `index` (a stream of its own)."""
    return np.random.default_rng([int(seed), 2, int(index)])


def sample_shot_list(seed: int, index: int, max_shots: int = 3) -> list[SceneParams]:
    """The shots of training sample `index` (1..max_shots of them)."""
    rng = sample_rng(seed, index)
    return sample_shots(rng, int(rng.integers(1, max_shots + 1)))


def eval_prompt(seed: int, index: int, num_chunks: int, max_shots: int = 3) -> tuple[list[SceneParams], list[int]]:
    """Shots and chunks per shot (summing to `num_chunks`) of evaluation prompt `index`."""
    rng = eval_rng(seed, index)
    num_shots = int(rng.integers(1, min(max_shots, num_chunks) + 1))
    cuts = sorted(int(c) + 1 for c in rng.permutation(num_chunks - 1)[: num_shots - 1])
    bounds = [0] + cuts + [num_chunks]
    durations = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    return sample_shots(rng, num_shots), durations


def long_eval_prompt(seed: int, index: int, num_chunks: int, max_shot_chunks: int = 3
                     ) -> tuple[list[SceneParams], list[int]]:
    """Shots and chunks per shot of long-horizon evaluation prompt `index`.

    Durations are drawn uniformly from 1..`max_shot_chunks` (the last one clipped to what is left) until
    they sum to `num_chunks`; each shot differs from the previous one (`scenes_differ`)."""
    if num_chunks < 1 or max_shot_chunks < 1:
        raise ValueError(f"num_chunks and max_shot_chunks must be >= 1, got {num_chunks}, {max_shot_chunks}")
    rng = long_eval_rng(seed, index)
    durations: list[int] = []
    left = int(num_chunks)
    while left > 0:
        d = int(rng.integers(1, min(int(max_shot_chunks), left) + 1))
        durations.append(d)
        left -= d
    return sample_shots(rng, len(durations)), durations


def _write_prompt_folder(pdir: Path, shots: Sequence[SceneParams], durations: Sequence[int]) -> None:
    pdir.mkdir(parents=True, exist_ok=True)
    for k, scene in enumerate(shots):
        (pdir / f"{k}.json").write_text(json.dumps({"caption": scene.caption(), "scene": scene.to_dict()}, indent=1),
                                        encoding="utf-8")
    (pdir / "shot_durations.txt").write_text(" ".join(map(str, durations)) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SynthSummary:
    out: str
    samples: int
    videos: int
    eval_prompts: int
    long_eval_prompts: int = 0


def _prepare_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MANIFEST).is_file():
            raise ValueError(f"--out {out} is not empty and was not made by `longlive data synth` (no {MANIFEST}); "
                             f"give an empty or new folder")
        for sub in ("video", "caption", "prompts", "prompts_long"):
            if (out / sub).is_dir():
                shutil.rmtree(out / sub)
        (out / MANIFEST).unlink()
    out.mkdir(parents=True, exist_ok=True)


def write_procedural_dataset(
    out: str | os.PathLike[str],
    *,
    samples: int = 8,
    seed: int = 0,
    frames: int = 33,
    height: int = 64,
    width: int = 64,
    fps: float = 24.0,
    eval_prompts: int = 4,
    eval_chunks: int = 6,
    max_shots: int = 3,
    long_eval_prompts: int = 0,
    long_eval_chunks: int = 30,
    max_shot_chunks: int = 3,
) -> SynthSummary:
    """Write the training samples and evaluation prompt folders under `out` (see the module docstring)."""
    from longlive.io.video import save_video

    if samples < 0 or eval_prompts < 0:
        raise ValueError(f"--samples and --eval-prompts must be >= 0, got {samples}, {eval_prompts}")
    if frames < 1:
        raise ValueError(f"--frames must be >= 1, got {frames}")
    if height < 16 or width < 16 or height % 2 or width % 2:
        raise ValueError(f"--height and --width must be even and >= 16 (H.264 yuv420p), got {height}x{width}")
    if not fps > 0:
        raise ValueError(f"--fps must be > 0, got {fps}")
    if eval_chunks < 1:
        raise ValueError(f"--eval-chunks must be >= 1, got {eval_chunks}")
    if not 1 <= max_shots <= 3:
        raise ValueError(f"--max-shots must be in 1..3, got {max_shots}")
    if long_eval_prompts < 0:
        raise ValueError(f"--long-eval-prompts must be >= 0, got {long_eval_prompts}")
    if long_eval_chunks < 1 or max_shot_chunks < 1:
        raise ValueError(f"--long-eval-chunks and --max-shot-chunks must be >= 1, got {long_eval_chunks}, "
                         f"{max_shot_chunks}")
    if long_eval_prompts and 32 * max_shot_chunks > frames:
        logger.warning("--max-shot-chunks %d: a shot of %d chunks has up to %d pixel frames but training shots have "
                       "--frames %d; the judge cannot check motion beyond a training shot's length", max_shot_chunks,
                       max_shot_chunks, 32 * max_shot_chunks, frames)
    root = Path(out)
    _prepare_out(root)
    videos = 0
    for s in range(samples):
        name = f"sample_{s:03d}"
        cdir = root / "caption" / name
        cdir.mkdir(parents=True, exist_ok=True)
        for k, scene in enumerate(sample_shot_list(seed, s, max_shots)):
            save_video(render_shot(scene, frames, height, width), root / "video" / name / f"{k}.mp4", fps=fps,
                       crf=10, preset="ultrafast", fsync=False)
            record = {"caption": scene.caption(), "scene": scene.to_dict(), "shot": k, "frames": frames, "fps": fps}
            (cdir / f"{k}.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
            videos += 1
    for i in range(eval_prompts):
        _write_prompt_folder(root / "prompts" / f"eval_{i:03d}", *eval_prompt(seed, i, eval_chunks, max_shots))
    for i in range(long_eval_prompts):
        _write_prompt_folder(root / "prompts_long" / f"long_{i:03d}",
                             *long_eval_prompt(seed, i, long_eval_chunks, max_shot_chunks))
    manifest = {"samples": samples, "seed": seed, "frames": frames, "height": height, "width": width, "fps": fps,
                "eval_prompts": eval_prompts, "eval_chunks": eval_chunks, "max_shots": max_shots}
    if long_eval_prompts:
        manifest.update(long_eval_prompts=long_eval_prompts, long_eval_chunks=long_eval_chunks,
                        max_shot_chunks=max_shot_chunks)
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    logger.info("wrote %d procedural samples (%d videos), %d eval prompts and %d long eval prompts to %s", samples,
                videos, eval_prompts, long_eval_prompts, root)
    return SynthSummary(out=str(root), samples=samples, videos=videos, eval_prompts=eval_prompts,
                        long_eval_prompts=long_eval_prompts)


def read_scene(caption_json: str | os.PathLike[str]) -> SceneParams:
    """The `SceneParams` stored in a caption / prompt JSON written by `write_procedural_dataset`."""
    return SceneParams.from_dict(json.loads(Path(caption_json).read_text(encoding="utf-8"))["scene"])


__all__: Sequence[str] = (
    "BACKGROUNDS", "COLOURS", "SHAPES", "SIZES", "MOTIONS", "TRAVEL", "MANIFEST", "SceneObject", "SceneParams",
    "allowed_colours", "render_shot", "sample_scene", "sample_shots", "scenes_differ", "sample_shot_list",
    "eval_prompt", "long_eval_prompt", "write_procedural_dataset", "read_scene", "SynthSummary",
)
