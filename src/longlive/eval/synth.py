"""Judge generated videos of the procedural synth world (`longlive.data.procedural`) against their prompts.

Detector (`detect_chunk`, numpy only, deterministic) on the uint8 RGB frames `[T, H, W, 3]` of one chunk:

1. Frames are block-averaged by an integer factor so that the short side is in [WORK_SIZE, 2 * WORK_SIZE)
   (no change at 64x64); everything below runs at that working resolution.
2. Every pixel gets the nearest palette colour (RGB Euclidean distance) among black, gray, white (backgrounds)
   and red, green, blue, yellow, magenta (white is both a background and an object colour).
3. Background = the most frequent class over all pixels of the chunk (objects cover at most ~1/3 of a frame).
4. Object colours = the object palette minus the background class (so white counts as an object only on a
   black or gray background). A pixel belongs to colour c when c is its nearest palette colour and it lies
   within MAX_OBJECT_DISTANCE (110) of c. Cleanup keeps the pixels within 2 pixels of the mask's 3x3 opening:
   specks and 1-2 pixel seams go, the outline of a real blob stays as it is (blends of two palette colours are
   nearest to one of them or to gray, never to a third object colour, so blurred edges make no false objects).
   The main blob of a frame is the box spanned by the heaviest contiguous run of the row profile, then of the
   column profile (other blobs of that colour are ignored).
5. A colour is present when the median over the chunk's frames of its main-blob area is at least MIN_AREA
   (1 %) of the frame (the smallest object, a small triangle, covers >= 1.8 % of any frame with aspect <= 16:9,
   3.1 % of a square frame). Frames where the blob has at least MIN_AREA are "visible frames".
6. Shape: for each of circle / square / upward triangle, a template of the blob's area is centred on the blob's
   centroid (the triangle's centroid lies 2/3 below its apex) and its IoU with the blob is averaged over the
   visible frames; the best wins. Moment-placed templates do not depend on the blob's bounding box, so stray
   edge pixels hardly matter. On clean renders the true shape scores >= 0.99 and the others <= 0.85
   (square vs circle ~0.83, triangle vs either ~0.7).
7. Size: side of the winning template from the median visible area, as a fraction of min(H, W) (0.25 small,
   0.4 large as rendered); "large" above SIZE_SPLIT = sqrt(0.25 * 0.4) = 0.316.
8. Motion: Theil-Sen (median of pairwise slopes) fit of the blob centroid against the frame index over the
   visible frames, times (T - 1) = displacement over the chunk in frame fractions. "still" when both |dx| and
   |dy| are below the threshold, else the direction of the larger component. The detector default threshold is
   STILL_THRESHOLD = 0.04 of the frame; the judge uses MOTION_FRACTION (0.4) x the distance an object travels
   in that chunk at training speed (TRAVEL x (chunk frames - 1) / (frames per shot - 1); 0.041-0.045 for
   --frames 97), so a moving object clears it by 2.5x and a still one by far.

Judge (`judge_video`, `judge_file`, `judge_folder`): a video of C chunks has 29 + 32 (C - 1) pixel frames
(chunk 0: 29 frames, later chunks 32). Chunk c belongs to the shot k whose `shot_durations.txt` range covers it.
The ground truth of shot k is `render_shot(scene_k, F, H, W)` where F = synth.json["frames"] (training speed;
a shot's local frame 0 is its first chunk's first frame). For every chunk:

- `background`: the detected background is the scene's background.
- per expected object: `colour` (found), `shape`, `size`, `motion` (a missing object counts as wrong for
  every attribute). Motion is judged only when the chunk ends within the first F frames of its shot (beyond
  that no training shot shows the object; such chunks get `motion: None`, and the ground truth holds frame F-1).
- `no_extra`: no object colour is detected that the scene does not have.
- `all_correct`: background, every object's colour, shape and (judged) motion, and no_extra (size is
  reported but not part of it).
- `switch` (first chunk of every shot k > 0 only), comparing old = shot k-1 and new = shot k on what differs:
  if the backgrounds differ the detected background must be the new one; every colour in old but not in new must
  be absent (unless it is the new background colour, which is never an object); every colour in new but not old
  must be found; for a colour in both, a shape that differs must be detected as the new shape and a motion that
  differs (judged chunks only) as the new motion. `switch` is True when all these checks pass, False otherwise,
  and None when nothing checkable differs (then it is not counted).
- image statistics of the generated chunk and of its ground truth render at the same resolution: mean R, G, B,
  `std` (per-channel std over all pixels, averaged), `purity` (fraction of pixels within PURITY_DISTANCE = 60
  of a palette colour), `gradient` (mean magnitude of the forward-difference gradient of the channel mean),
  `temporal` (mean absolute difference between consecutive frames), all in 0..255 units at the working
  resolution, and their difference generated - ground truth. Pixel errors against the ground truth are not
  used: positions are sampled, so a correct generation differs from the render pixel by pixel.

Aggregation (`aggregate`, `judge_folder`): accuracies pooled over all chunks of all videos (per attribute,
all_correct, switch) and the same per chunk-index bucket (`drift`, default buckets of 3 chunks) with mean
statistics, so degradation over a long horizon is visible.

`validate_detector(dataset_root)` measures the detector on ground truth: (a) the training MP4s of the dataset
(`video/` + `caption/`, H.264 crf 10), cut into chunk windows (29 frames, then 32, full windows only; a shot
shorter than 29 frames is one window), each judged against its caption's scene with the judge's motion rule;
(b) the ground-truth renders of the prompt folders `prompts/` and `prompts_long/` judged chunk by chunk by
`judge_video` exactly as a generated video (switch included), raw and (c) after an H.264 round trip at crf 18
(what `longlive generate` writes). It returns accuracies and every failure it saw.
"""
from __future__ import annotations

import json
import logging
import math
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from longlive.data.procedural import BACKGROUNDS, COLOURS, MANIFEST, SIZES, TRAVEL, SceneParams, read_scene, render_shot

logger = logging.getLogger(__name__)

FIRST_CHUNK_FRAMES = 29  # pixel frames of chunk 0 (1 + 4 * 7)
CHUNK_FRAMES = 32  # pixel frames of every later chunk
WORK_SIZE = 64  # frames are block-averaged to a short side in [WORK_SIZE, 2 * WORK_SIZE)
MAX_OBJECT_DISTANCE = 110.0  # RGB L2: farther pixels belong to no object colour
PURITY_DISTANCE = 60.0  # RGB L2: "palette purity" counts pixels this close to a palette colour
MIN_AREA = 0.01  # fraction of the frame: median main-blob area for an object colour to be present
STILL_THRESHOLD = 0.04  # fraction of the frame: detector default displacement over a chunk below which "still"
MOTION_FRACTION = 0.4  # judge: still threshold = this x the travel of a chunk at training speed
SIZE_SPLIT = math.sqrt(SIZES["small"] * SIZES["large"])  # blob extent / min(H, W) above which "large"
DEFAULT_BUCKET = 3  # chunks per drift bucket
TEMPLATES = ("circle", "square", "triangle")
_AREA_FACTOR = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}  # area = factor x side^2
STAT_KEYS = ("mean_r", "mean_g", "mean_b", "std", "purity", "gradient", "temporal")
ATTRIBUTES = ("background", "colour", "shape", "size", "motion", "no_extra", "all_correct")

PALETTE: dict[str, tuple[int, int, int]] = {**BACKGROUNDS, **{k: v for k, v in COLOURS.items() if k not in BACKGROUNDS}}
_PALETTE_NAMES = tuple(PALETTE)
_PALETTE_RGB = np.array([PALETTE[n] for n in _PALETTE_NAMES], dtype=np.float32)
_STEM = re.compile(r"^\d+-(.+)-seed-?\d+$")


class SynthEvalError(ValueError):
    """Bad judge input (missing prompt folder, frame count that does not fit, ...); the message names the file."""


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------
def expected_frames(num_chunks: int) -> int:
    """Pixel frames of a video of `num_chunks` chunks: 29 + 32 * (num_chunks - 1)."""
    return FIRST_CHUNK_FRAMES + CHUNK_FRAMES * (int(num_chunks) - 1)


def chunk_bounds(num_chunks: int) -> list[tuple[int, int]]:
    """Pixel frame range [start, end) of every chunk."""
    return [(0, FIRST_CHUNK_FRAMES) if c == 0 else (expected_frames(c), expected_frames(c + 1))
            for c in range(int(num_chunks))]


def chunk_travel(chunk_frames: int, frames_per_shot: int) -> float:
    """Distance (frame fraction) a moving object covers over `chunk_frames` frames at training speed."""
    return TRAVEL * (chunk_frames - 1) / max(frames_per_shot - 1, 1)


# ------------------------------------------------------------------------------------------------
# Detector
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DetectedObject:
    """One object colour found in a chunk. `area` and `extent` are fractions of the frame (area) / min(H, W);
    `displacement` (dx, dy) is the centroid's fitted movement over the chunk in frame fractions."""

    colour: str
    shape: str
    size: str
    motion: str
    area: float
    extent: float
    displacement: tuple[float, float]
    shape_scores: dict[str, float]
    visible_frames: int


@dataclass(frozen=True)
class ChunkDetection:
    background: str
    objects: tuple[DetectedObject, ...] = field(default_factory=tuple)

    def get(self, colour: str) -> DetectedObject | None:
        return next((o for o in self.objects if o.colour == colour), None)

    @property
    def colours(self) -> list[str]:
        return [o.colour for o in self.objects]


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"frames must be uint8 [T, H, W, 3] with T >= 1, got shape {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype}")
    return frames


def _downsample(frames: np.ndarray) -> np.ndarray:
    """float32 [T, h, w, 3]: block mean by the integer factor that brings the short side below 2 * WORK_SIZE."""
    t, h, w, _ = frames.shape
    f = max(1, min(h, w) // WORK_SIZE)
    x = frames.astype(np.float32)
    if f == 1:
        return x
    h2, w2 = h // f * f, w // f * f
    return x[:, :h2, :w2].reshape(t, h2 // f, f, w2 // f, f, 3).mean(axis=(2, 4))


def _classify(work: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest palette index (int8) and its distance, per pixel."""
    flat = work.reshape(-1, 3)
    d2 = (flat * flat).sum(axis=1, keepdims=True) - 2.0 * flat @ _PALETTE_RGB.T + (_PALETTE_RGB ** 2).sum(axis=1)
    idx = d2.argmin(axis=1)
    dist = np.sqrt(np.maximum(d2[np.arange(len(idx)), idx], 0.0))
    return idx.astype(np.int8).reshape(work.shape[:-1]), dist.reshape(work.shape[:-1])


def _neighbourhood(mask: np.ndarray, op: str) -> np.ndarray:
    """3x3 erosion ('all') or dilation ('any') of boolean [T, H, W] masks, edges replicated."""
    p = np.pad(mask, ((0, 0), (1, 1), (1, 1)), mode="edge")
    h, w = mask.shape[1:]
    out = p[:, 1:h + 1, 1:w + 1].copy()
    for dy in range(3):
        for dx in range(3):
            view = p[:, dy:dy + h, dx:dx + w]
            if op == "all":
                out &= view
            else:
                out |= view
    return out


def _clean(mask: np.ndarray) -> np.ndarray:
    """Keep the pixels of `mask` within 2 pixels of its 3x3 opening: specks and 1-2 pixel seams go, while the
    outline of a real blob (a triangle's apex, the staircase edges of H.264 chroma) is kept as it was."""
    opened = _neighbourhood(_neighbourhood(mask, "all"), "any")
    return mask & _neighbourhood(_neighbourhood(opened, "any"), "any")


def _heaviest_run(profile: np.ndarray) -> tuple[int, int] | None:
    """[start, end) of the contiguous non-zero run of `profile` with the largest sum."""
    on = profile > 0
    if not on.any():
        return None
    edges = np.diff(np.concatenate([[0], on.astype(np.int8), [0]]))
    starts, ends = np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0]
    sums = [profile[a:b].sum() for a, b in zip(starts, ends)]
    i = int(np.argmax(sums))
    return int(starts[i]), int(ends[i])


def _template_iou(blob: np.ndarray, r0: int, c0: int, cx: float, cy: float, shape: str) -> float:
    """IoU of `blob` (a crop whose top-left pixel is (r0, c0)) with `shape` of the blob's area placed at the blob's
    centroid (cx, cy), drawn like `render_shot` (pixel centres; the triangle's centroid lies 2/3 below its apex)."""
    side = math.sqrt(blob.sum() / _AREA_FACTOR[shape])
    half = side / 2
    my = cy - side / 6 if shape == "triangle" else cy
    y0, y1 = min(r0, math.floor(my - half) - 1), max(r0 + blob.shape[0], math.ceil(my + half) + 1)
    x0, x1 = min(c0, math.floor(cx - half) - 1), max(c0 + blob.shape[1], math.ceil(cx + half) + 1)
    dy = (np.arange(y0, y1) + 0.5)[:, None] - my
    dx = (np.arange(x0, x1) + 0.5)[None, :] - cx
    if shape == "circle":
        tpl = dx * dx + dy * dy <= half * half
    elif shape == "square":
        tpl = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    else:
        depth = dy + half
        tpl = (depth >= 0) & (depth <= 2 * half) & (np.abs(dx) <= depth / 2)
    window = np.zeros(tpl.shape, dtype=bool)
    window[r0 - y0:r0 - y0 + blob.shape[0], c0 - x0:c0 - x0 + blob.shape[1]] = blob
    return float((window & tpl).sum() / max((window | tpl).sum(), 1))


def _theil_sen(t: np.ndarray, v: np.ndarray) -> float:
    i, j = np.triu_indices(len(t), k=1)
    return float(np.median((v[j] - v[i]) / (t[j] - t[i])))


def _motion_word(dx: float, dy: float, threshold: float) -> str:
    if max(abs(dx), abs(dy)) < threshold:
        return "still"
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def _measure(mask: np.ndarray, colour: str, still_threshold: float, min_area: float) -> DetectedObject | None:
    t_len, h, w = mask.shape
    areas = np.zeros(t_len)
    boxes: list[tuple[int, int, int, int] | None] = [None] * t_len
    for t in range(t_len):
        rows = _heaviest_run(mask[t].sum(axis=1))
        if rows is None:
            continue
        cols = _heaviest_run(mask[t, rows[0]:rows[1]].sum(axis=0))
        if cols is None:
            continue
        r0, r1 = rows
        c0, c1 = cols
        rows2 = _heaviest_run(mask[t, :, c0:c1].sum(axis=1))  # the column cut may leave a narrower row span
        if rows2 is not None:
            r0, r1 = rows2
        boxes[t] = (r0, r1, c0, c1)
        areas[t] = mask[t, r0:r1, c0:c1].sum() / (h * w)
    if float(np.median(areas)) < min_area:
        return None
    visible = [t for t in range(t_len) if areas[t] >= min_area and boxes[t] is not None]
    scores = {name: 0.0 for name in TEMPLATES}
    cx, cy = [], []
    for t in visible:
        r0, r1, c0, c1 = boxes[t]  # type: ignore[misc]
        blob = mask[t, r0:r1, c0:c1]
        ys, xs = np.nonzero(blob)
        x, y = xs.mean() + c0 + 0.5, ys.mean() + r0 + 0.5
        for name in TEMPLATES:
            scores[name] += _template_iou(blob, r0, c0, x, y, name) / len(visible)
        cx.append(x / w)
        cy.append(y / h)
    tt = np.array(visible, dtype=np.float64)
    if len(visible) >= 2:
        dx = _theil_sen(tt, np.array(cx)) * (t_len - 1)
        dy = _theil_sen(tt, np.array(cy)) * (t_len - 1)
    else:
        dx = dy = 0.0
    shape = max(TEMPLATES, key=lambda n: scores[n])
    extent = math.sqrt(float(np.median(areas[visible])) * h * w / _AREA_FACTOR[shape]) / min(h, w)
    return DetectedObject(colour=colour, shape=shape,
                          size="large" if extent > SIZE_SPLIT else "small",
                          motion=_motion_word(dx, dy, still_threshold), area=float(np.median(areas)), extent=extent,
                          displacement=(float(dx), float(dy)), shape_scores={k: round(v, 4) for k, v in scores.items()},
                          visible_frames=len(visible))


def _detect(work: np.ndarray, cls: np.ndarray, dist: np.ndarray, still_threshold: float, min_area: float
            ) -> ChunkDetection:
    counts = np.bincount(cls.ravel().astype(np.int64), minlength=len(_PALETTE_NAMES))
    background = _PALETTE_NAMES[int(counts.argmax())]
    objects = []
    for colour in COLOURS:
        if colour == background:
            continue
        i = _PALETTE_NAMES.index(colour)
        raw = (cls == i) & (dist <= MAX_OBJECT_DISTANCE)
        if raw.reshape(raw.shape[0], -1).sum(axis=1).max() < min_area * raw[0].size:
            continue
        found = _measure(_clean(raw), colour, still_threshold, min_area)
        if found is not None:
            objects.append(found)
    return ChunkDetection(background=background, objects=tuple(objects))


def _stats(work: np.ndarray, dist: np.ndarray) -> dict[str, float]:
    lum = work.mean(axis=-1)
    gx = np.diff(lum, axis=2)[:, :-1, :]
    gy = np.diff(lum, axis=1)[:, :, :-1]
    temporal = float(np.abs(np.diff(work, axis=0)).mean()) if work.shape[0] > 1 else 0.0
    mean = work.reshape(-1, 3).mean(axis=0)
    return {"mean_r": float(mean[0]), "mean_g": float(mean[1]), "mean_b": float(mean[2]),
            "std": float(work.reshape(-1, 3).std(axis=0).mean()), "purity": float((dist <= PURITY_DISTANCE).mean()),
            "gradient": float(np.sqrt(gx * gx + gy * gy).mean()), "temporal": temporal}


def analyse_chunk(frames: np.ndarray, *, still_threshold: float = STILL_THRESHOLD, min_area: float = MIN_AREA
                  ) -> tuple[ChunkDetection, dict[str, float]]:
    """Detection and image statistics of one chunk of uint8 frames `[T, H, W, 3]` (see the module docstring)."""
    work = _downsample(_check_frames(frames))
    cls, dist = _classify(work)
    return _detect(work, cls, dist, still_threshold, min_area), _stats(work, dist)


def detect_chunk(frames: np.ndarray, *, still_threshold: float = STILL_THRESHOLD, min_area: float = MIN_AREA
                 ) -> ChunkDetection:
    """Background and objects (colour, shape, size, motion) of one chunk of uint8 frames `[T, H, W, 3]`."""
    return analyse_chunk(frames, still_threshold=still_threshold, min_area=min_area)[0]


def image_stats(frames: np.ndarray) -> dict[str, float]:
    """Image statistics (STAT_KEYS) of uint8 frames `[T, H, W, 3]` at the detector's working resolution."""
    work = _downsample(_check_frames(frames))
    return _stats(work, _classify(work)[1])


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptShots:
    """The shots of one prompt folder: scenes from `<k>.json`, chunks per shot from `shot_durations.txt`."""

    name: str
    folder: Path
    scenes: tuple[SceneParams, ...]
    durations: tuple[int, ...]

    @property
    def num_chunks(self) -> int:
        return sum(self.durations)

    def shot_of_chunk(self) -> list[tuple[int, int]]:
        """(shot, chunk index within the shot) of every chunk."""
        return [(k, j) for k, d in enumerate(self.durations) for j in range(d)]


def load_prompt_shots(folder: str | Path, num_chunks: int | None = None) -> PromptShots:
    """Scenes and durations of a prompt folder; without shot_durations.txt the loader's even split of
    `num_chunks` is used (then `num_chunks` is required)."""
    from longlive.data.prompts import PromptFileError, even_split, read_shot_durations

    folder = Path(folder)
    if not folder.is_dir():
        raise SynthEvalError(f"{folder}: prompt folder not found")
    scenes: list[SceneParams] = []
    while (folder / f"{len(scenes)}.json").is_file():
        path = folder / f"{len(scenes)}.json"
        try:
            scenes.append(read_scene(path))
        except (KeyError, TypeError, ValueError) as exc:
            raise SynthEvalError(f"{path}: no procedural scene in this prompt JSON ({exc!r}); judge only prompt "
                                 f"folders written by `longlive data synth`") from None
    if not scenes:
        raise SynthEvalError(f"{folder}: no shot JSONs (0.json, 1.json, ...)")
    try:
        durations = read_shot_durations(folder)
    except PromptFileError as exc:
        raise SynthEvalError(str(exc)) from None
    if durations is None:
        if num_chunks is None:
            raise SynthEvalError(f"{folder}: no shot_durations.txt; give the number of chunks")
        durations = even_split(len(scenes), num_chunks)
    if len(durations) != len(scenes):
        raise SynthEvalError(f"{folder / 'shot_durations.txt'}: {len(durations)} durations for {len(scenes)} shots")
    return PromptShots(folder.name, folder, tuple(scenes), tuple(int(d) for d in durations))


def read_manifest(dataset_dir: str | Path) -> dict[str, Any]:
    """synth.json of a dataset written by `longlive data synth` (needs "frames")."""
    path = Path(dataset_dir) / MANIFEST
    if not path.is_file():
        raise SynthEvalError(f"{path}: not found; --dataset must be a folder written by `longlive data synth`")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(manifest, dict) or int(manifest.get("frames", 0)) < 1:
        raise SynthEvalError(f"{path}: no positive 'frames' (frames per training shot)")
    return manifest


def read_frames(path: str | Path) -> np.ndarray:
    """All frames of a video file as uint8 `[T, H, W, 3]` (PyAV)."""
    import av

    path = Path(path)
    if not path.is_file():
        raise SynthEvalError(f"{path}: video file not found")
    try:
        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise SynthEvalError(f"{path}: cannot decode the video ({exc})") from exc
    if not frames:
        raise SynthEvalError(f"{path}: the video has no frames")
    return np.stack(frames)


# ------------------------------------------------------------------------------------------------
# Judge
# ------------------------------------------------------------------------------------------------
def _shot_render(scene: SceneParams, frames_per_shot: int, height: int, width: int) -> np.ndarray:
    return render_shot(scene, frames_per_shot, height, width)


def render_ground_truth(shots: PromptShots, frames_per_shot: int, height: int, width: int) -> np.ndarray:
    """uint8 `[29 + 32 (C - 1), H, W, 3]`: every shot at training speed from its first chunk on; frames past a
    training shot's length (`frames_per_shot`) hold its last frame."""
    parts = []
    bounds = chunk_bounds(shots.num_chunks)
    start = 0
    for scene, d in zip(shots.scenes, shots.durations):
        a, b = bounds[start][0], bounds[start + d - 1][1]
        render = _shot_render(scene, frames_per_shot, height, width)
        parts.append(render[np.minimum(np.arange(b - a), frames_per_shot - 1)])
        start += d
    return np.concatenate(parts)


def _verdict(expected: Any, detected: Any) -> dict[str, Any]:
    return {"expected": expected, "detected": detected, "ok": expected == detected}


def compare(detection: ChunkDetection, scene: SceneParams, motion_judged: bool) -> dict[str, Any]:
    """Per-attribute verdicts of one chunk's detection against the scene it should show."""
    objects = []
    for obj in scene.objects:
        got = detection.get(obj.colour)
        entry: dict[str, Any] = {"colour": obj.colour, "found": got is not None}
        for attr in ("shape", "size"):
            entry[attr] = _verdict(getattr(obj, attr), None if got is None else getattr(got, attr))
        motion = _verdict(obj.motion, None if got is None else got.motion)
        if not motion_judged:
            motion["ok"] = None
        entry["motion"] = motion
        if got is not None:
            entry["displacement"] = [round(v, 4) for v in got.displacement]
        objects.append(entry)
    expected_colours = {o.colour for o in scene.objects}
    extra = [c for c in detection.colours if c not in expected_colours]
    background = _verdict(scene.background, detection.background)
    all_correct = (background["ok"] and not extra
                   and all(o["found"] and o["shape"]["ok"] and o["motion"]["ok"] is not False for o in objects))
    return {"background": background, "objects": objects, "extra": extra, "no_extra": not extra,
            "all_correct": bool(all_correct)}


def switch_check(detection: ChunkDetection, old: SceneParams, new: SceneParams, motion_judged: bool
                 ) -> dict[str, Any] | None:
    """Shot-switch verdict at the first chunk of `new` (module docstring); None when nothing checkable differs."""
    checks: list[tuple[str, bool]] = []
    if old.background != new.background:
        checks.append((f"background {old.background}->{new.background}", detection.background == new.background))
    old_objs = {o.colour: o for o in old.objects}
    new_objs = {o.colour: o for o in new.objects}
    for colour in old_objs:
        if colour not in new_objs and colour != new.background:
            checks.append((f"{colour} gone", detection.get(colour) is None))
    for colour, obj in new_objs.items():
        got = detection.get(colour)
        if colour not in old_objs:
            checks.append((f"{colour} appears", got is not None))
            continue
        before = old_objs[colour]
        if before.shape != obj.shape:
            checks.append((f"{colour} {before.shape}->{obj.shape}", got is not None and got.shape == obj.shape))
        if before.motion != obj.motion and motion_judged:
            checks.append((f"{colour} {before.motion}->{obj.motion}", got is not None and got.motion == obj.motion))
    if not checks:
        return None
    return {"ok": all(ok for _, ok in checks), "checks": [{"what": w, "ok": ok} for w, ok in checks]}


def judge_video(video: np.ndarray, shots: PromptShots, frames_per_shot: int, *, name: str = "",
                ground_truth: np.ndarray | None = None) -> dict[str, Any]:
    """Judge one video (uint8 `[T, H, W, 3]`, T = 29 + 32 (C - 1) for the C chunks of `shots`).

    Returns {"video", "prompt", "chunks": C, "chunk_results": [per-chunk dict], "summary": aggregate of this
    video}. `ground_truth` (same shape) defaults to `render_ground_truth` at the video's resolution."""
    video = _check_frames(video)
    want = expected_frames(shots.num_chunks)
    if video.shape[0] != want:
        raise SynthEvalError(f"{name or 'video'}: {video.shape[0]} frames, but {shots.folder} asks for "
                             f"{shots.num_chunks} chunks = {want} frames (29 + 32 x (chunks - 1))")
    if ground_truth is None:
        ground_truth = render_ground_truth(shots, frames_per_shot, video.shape[1], video.shape[2])
    results = []
    bounds = chunk_bounds(shots.num_chunks)
    shot_start = np.cumsum([0] + list(shots.durations))
    for c, (k, j) in enumerate(shots.shot_of_chunk()):
        a, b = bounds[c]
        local_end = b - bounds[int(shot_start[k])][0]
        judged = local_end <= frames_per_shot
        threshold = MOTION_FRACTION * chunk_travel(b - a, frames_per_shot)
        detection, stats = analyse_chunk(video[a:b], still_threshold=threshold)
        record: dict[str, Any] = {"chunk": c, "shot": k, "shot_chunk": j, "frames": [a, b], "motion_judged": judged}
        record.update(compare(detection, shots.scenes[k], judged))
        record["switch"] = (switch_check(detection, shots.scenes[k - 1], shots.scenes[k], judged)
                            if k > 0 and j == 0 else None)
        gt_stats = image_stats(ground_truth[a:b])
        record["stats"] = {s: round(v, 4) for s, v in stats.items()}
        record["gt_stats"] = {s: round(v, 4) for s, v in gt_stats.items()}
        record["stats_diff"] = {s: round(stats[s] - gt_stats[s], 4) for s in STAT_KEYS}
        results.append(record)
    out = {"video": name, "prompt": str(shots.folder), "chunks": shots.num_chunks, "chunk_results": results}
    out["summary"] = aggregate([out])
    return out


def judge_file(video_path: str | Path, prompt_folder: str | Path, frames_per_shot: int) -> dict[str, Any]:
    """`judge_video` of an MP4 against its prompt folder; errors name the file."""
    video_path = Path(video_path)
    frames = read_frames(video_path)
    chunks = (frames.shape[0] - FIRST_CHUNK_FRAMES) / CHUNK_FRAMES + 1
    try:
        shots = load_prompt_shots(prompt_folder, int(chunks) if chunks == int(chunks) and chunks >= 1 else None)
    except SynthEvalError as exc:
        raise SynthEvalError(f"{video_path}: {exc}") from None
    if frames.shape[0] != expected_frames(shots.num_chunks):
        raise SynthEvalError(f"{video_path}: {frames.shape[0]} frames, but its prompt folder {shots.folder} has "
                             f"{shots.num_chunks} chunks (shot durations {' '.join(map(str, shots.durations))}) = "
                             f"{expected_frames(shots.num_chunks)} frames (29 + 32 x (chunks - 1))")
    return judge_video(frames, shots, frames_per_shot, name=str(video_path))


# ------------------------------------------------------------------------------------------------
# Aggregation
# ------------------------------------------------------------------------------------------------
def bucket_edges(buckets: int | Sequence[int] | None, num_chunks: int) -> list[tuple[int, int | None]]:
    """Chunk-index buckets [lo, hi): None -> width DEFAULT_BUCKET; an int -> that width; a sequence -> ascending
    edges starting at 0 (the last bucket is open-ended)."""
    if buckets is None or isinstance(buckets, int):
        width = DEFAULT_BUCKET if buckets is None else int(buckets)
        if width < 1:
            raise ValueError(f"bucket width must be >= 1, got {width}")
        los = list(range(0, max(num_chunks, 1), width))
        return [(lo, lo + width) for lo in los]
    edges = [int(e) for e in buckets]
    if not edges or edges[0] != 0 or any(b <= a for a, b in zip(edges[:-1], edges[1:])):
        raise ValueError(f"bucket edges must start at 0 and increase strictly, got {edges}")
    return [(lo, hi) for lo, hi in zip(edges[:-1], edges[1:])] + [(edges[-1], None)]


class _Tally:
    def __init__(self) -> None:
        self.hits = {a: 0 for a in ATTRIBUTES + ("switch",)}
        self.total = {a: 0 for a in ATTRIBUTES + ("switch",)}
        self.chunks = 0
        self.stats: dict[str, list[float]] = {f"{p}{s}": [] for p in ("", "gt_", "absdiff_") for s in STAT_KEYS}

    def add(self, attr: str, ok: Any) -> None:
        if ok is None:
            return
        self.total[attr] += 1
        self.hits[attr] += bool(ok)

    def add_chunk(self, r: Mapping[str, Any]) -> None:
        self.chunks += 1
        self.add("background", r["background"]["ok"])
        self.add("no_extra", r["no_extra"])
        self.add("all_correct", r["all_correct"])
        for o in r["objects"]:
            self.add("colour", o["found"])
            for attr in ("shape", "size", "motion"):
                self.add(attr, o[attr]["ok"])
        if r.get("switch") is not None:
            self.add("switch", r["switch"]["ok"])
        if "stats" in r:
            for s in STAT_KEYS:
                self.stats[s].append(r["stats"][s])
                self.stats[f"gt_{s}"].append(r["gt_stats"][s])
                self.stats[f"absdiff_{s}"].append(abs(r["stats_diff"][s]))

    def summary(self) -> dict[str, Any]:
        acc = {a: (round(self.hits[a] / self.total[a], 4) if self.total[a] else None) for a in self.total}
        switch = acc.pop("switch")
        stats = {"generated": {}, "ground_truth": {}, "abs_diff": {}}
        for s in STAT_KEYS:
            for key, prefix in (("generated", ""), ("ground_truth", "gt_"), ("abs_diff", "absdiff_")):
                values = self.stats[f"{prefix}{s}"]
                stats[key][s] = round(float(np.mean(values)), 4) if values else None
        return {"chunks": self.chunks, "accuracy": acc, "counts": {a: self.total[a] for a in ATTRIBUTES},
                "switch": {"accuracy": switch, "count": self.total["switch"]}, "stats": stats}


def aggregate(videos: Sequence[Mapping[str, Any]], buckets: int | Sequence[int] | None = None) -> dict[str, Any]:
    """Pooled accuracies, switch accuracy, statistics and per-bucket drift of `judge_video` results."""
    total = _Tally()
    max_chunks = max((int(v["chunks"]) for v in videos), default=0)
    edges = bucket_edges(buckets, max_chunks)
    per_bucket = [_Tally() for _ in edges]
    for v in videos:
        for r in v["chunk_results"]:
            total.add_chunk(r)
            for (lo, hi), tally in zip(edges, per_bucket):
                if r["chunk"] >= lo and (hi is None or r["chunk"] < hi):
                    tally.add_chunk(r)
    out = {"videos": len(videos), **total.summary(), "drift": []}
    for (lo, hi), tally in zip(edges, per_bucket):
        if tally.chunks:
            out["drift"].append({"chunk_range": [lo, hi], **tally.summary()})
    return out


def _slug(name: str) -> str:
    """The sample-name slug of `longlive.pipelines.inference.output_stem`."""
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")[:60] or "sample"


def match_videos(videos_dir: str | Path, prompts_dir: str | Path) -> list[tuple[Path, Path]]:
    """(MP4, prompt folder) pairs: `NNNN-<slug>-seed<S>.mp4` matched to the prompt folder with that slug."""
    from longlive.data.prompts import PromptFileError, find_sample_folders

    videos_dir, prompts_dir = Path(videos_dir), Path(prompts_dir)
    if not videos_dir.is_dir():
        raise SynthEvalError(f"{videos_dir}: videos folder not found")
    try:
        folders = find_sample_folders(prompts_dir)
    except (PromptFileError, OSError) as exc:
        raise SynthEvalError(f"{prompts_dir}: no prompt folders ({exc})") from None
    by_slug = {_slug(f.name): f for f in folders}
    mp4s = sorted(videos_dir.glob("*.mp4"))
    if not mp4s:
        raise SynthEvalError(f"{videos_dir}: no .mp4 videos")
    pairs = []
    for path in mp4s:
        m = _STEM.match(path.stem)
        if m is None:
            raise SynthEvalError(f"{path}: name is not NNNN-<sample>-seed<S>.mp4 (the `longlive generate` naming)")
        folder = by_slug.get(m.group(1))
        if folder is None:
            raise SynthEvalError(f"{path}: no prompt folder named {m.group(1)!r} in {prompts_dir} "
                                 f"(have {', '.join(sorted(by_slug)[:8])}{' ...' if len(by_slug) > 8 else ''})")
        pairs.append((path, folder))
    return pairs


def judge_folder(videos_dir: str | Path, prompts_dir: str | Path, dataset_dir: str | Path,
                 buckets: int | Sequence[int] | None = None) -> dict[str, Any]:
    """Judge every `NNNN-<sample>-seed<S>.mp4` of `videos_dir` (the output of `longlive generate`) against the
    prompt folder `<sample>` of `prompts_dir`, with training timing from `dataset_dir/synth.json`.

    Args:
        videos_dir: folder of generated MP4s (other files are ignored).
        prompts_dir: the prompt root given to generation (e.g. `<dataset>/prompts` or `<dataset>/prompts_long`).
        dataset_dir: the synth dataset folder (its synth.json gives frames per training shot).
        buckets: drift buckets of chunk indices: None (width 3), a width, or ascending edges from 0.

    Returns a JSON-serialisable dict: "videos", "chunks", "accuracy" {background, colour, shape, size, motion,
    no_extra, all_correct} (None where nothing was judged), "counts" (denominators), "switch" {accuracy,
    count}, "stats" {generated, ground_truth, abs_diff} means, "drift" [per bucket: "chunk_range" [lo, hi|None]
    and the same keys], "frames_per_shot", and "per_video" [{video, prompt, chunks, summary, chunk_results}].
    Raises SynthEvalError naming the file for a video without prompt folder or with a frame count that does
    not fit its shot durations.
    """
    frames_per_shot = int(read_manifest(dataset_dir)["frames"])
    results = [judge_file(video, folder, frames_per_shot) for video, folder in match_videos(videos_dir, prompts_dir)]
    out = aggregate(results, buckets)
    out["frames_per_shot"] = frames_per_shot
    out["per_video"] = results
    return out


# ------------------------------------------------------------------------------------------------
# Validation on ground truth
# ------------------------------------------------------------------------------------------------
def _training_windows(num_frames: int) -> list[tuple[int, int]]:
    if num_frames < FIRST_CHUNK_FRAMES:
        return [(0, num_frames)]
    windows, a, b = [], 0, FIRST_CHUNK_FRAMES
    while b <= num_frames:
        windows.append((a, b))
        a, b = b, b + CHUNK_FRAMES
    return windows


def _failures(name: str, r: Mapping[str, Any]) -> list[str]:
    out = []
    if not r["background"]["ok"]:
        out.append(f"{name}: background {r['background']}")
    for o in r["objects"]:
        for attr in ("shape", "size", "motion"):
            if o[attr]["ok"] is False:
                out.append(f"{name}: {o['colour']} {attr} {o[attr]['expected']} detected {o[attr]['detected']}"
                           + (f" (displacement {o.get('displacement')})" if attr == "motion" else ""))
        if not o["found"]:
            out.append(f"{name}: {o['colour']} not found")
    if r["extra"]:
        out.append(f"{name}: extra colours {r['extra']}")
    if r.get("switch") is not None and not r["switch"]["ok"]:
        out.append(f"{name}: switch failed {r['switch']['checks']}")
    return out


def _validate_training(root: Path, frames_per_shot: int) -> dict[str, Any]:
    tally = _Tally()
    failures: list[str] = []
    for caption in sorted((root / "caption").glob("*/*.json")):
        video = root / "video" / caption.parent.name / f"{caption.stem}.mp4"
        if not video.is_file():
            continue
        scene = read_scene(caption)
        frames = read_frames(video)
        gt = render_shot(scene, frames.shape[0], frames.shape[1], frames.shape[2])
        for a, b in _training_windows(frames.shape[0]):
            threshold = MOTION_FRACTION * chunk_travel(b - a, frames_per_shot)
            detection, stats = analyse_chunk(frames[a:b], still_threshold=threshold)
            record: dict[str, Any] = compare(detection, scene, True)
            gt_stats = image_stats(gt[a:b])
            record.update(stats=stats, gt_stats=gt_stats, stats_diff={s: stats[s] - gt_stats[s] for s in STAT_KEYS})
            tally.add_chunk(record)
            failures += _failures(f"{video.relative_to(root)}[{a}:{b}]", record)
    out = tally.summary()
    out["windows"] = out.pop("chunks")
    out["failures"] = failures
    return out


def _validate_prompts(root: Path, frames_per_shot: int, height: int, width: int, mp4: bool) -> dict[str, Any]:
    results, failures = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            shots = load_prompt_shots(folder)
            gt = render_ground_truth(shots, frames_per_shot, height, width)
            video = gt
            if mp4:
                from longlive.io.video import save_video

                path = Path(tmp) / f"{folder.name}.mp4"
                save_video(gt, path, fps=24, fsync=False)
                video = read_frames(path)
            r = judge_video(video, shots, frames_per_shot, name=str(folder), ground_truth=gt)
            results.append(r)
            for c in r["chunk_results"]:
                failures += _failures(f"{folder.name} chunk {c['chunk']}", c)
    out = aggregate(results)
    out["failures"] = failures
    return out


def validate_detector(dataset_root: str | Path, *, mp4: bool = True) -> dict[str, Any]:
    """Run the detector on ground truth of a synth dataset and report its accuracies (module docstring).

    Returns {"training": summary over chunk windows of the training MP4s, "prompts" / "prompts_long": judge
    summaries of the raw ground-truth renders, "prompts_mp4" / "prompts_long_mp4": the same after an H.264
    round trip (crf 18, when `mp4`)}; every summary lists its "failures". Parts whose folder is absent are left
    out."""
    root = Path(dataset_root)
    manifest = read_manifest(root)
    frames, height, width = int(manifest["frames"]), int(manifest["height"]), int(manifest["width"])
    out: dict[str, Any] = {"frames_per_shot": frames, "height": height, "width": width}
    if (root / "caption").is_dir():
        out["training"] = _validate_training(root, frames)
    for sub in ("prompts", "prompts_long"):
        if (root / sub).is_dir():
            out[sub] = _validate_prompts(root / sub, frames, height, width, mp4=False)
            if mp4:
                out[f"{sub}_mp4"] = _validate_prompts(root / sub, frames, height, width, mp4=True)
    return out


def summary_table(summary: Mapping[str, Any], title: str = "") -> str:
    """Plain-text table of an `aggregate`/`judge_folder` summary: overall row, then one row per drift bucket."""
    def fmt(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}"

    cols = ("background", "colour", "shape", "size", "motion", "no_extra", "all_correct")
    labels = ("bg", "colour", "shape", "size", "motion", "no_extra", "all_ok", "switch", "purity", "d_purity",
              "d_grad", "d_std")
    head = f"{'chunks':>10} {'n':>5} " + " ".join(f"{c:>8}" for c in labels)
    lines = [title] if title else []
    lines.append(head)

    def row(label: str, s: Mapping[str, Any]) -> str:
        st = s["stats"]
        return (f"{label:>10} {s['chunks']:>5} " + " ".join(f"{fmt(s['accuracy'][c]):>8}" for c in cols)
                + f" {fmt(s['switch']['accuracy']):>8} {fmt(st['generated']['purity']):>8}"
                + f" {fmt(st['abs_diff']['purity']):>8} {fmt(st['abs_diff']['gradient']):>8}"
                + f" {fmt(st['abs_diff']['std']):>8}")

    lines.append(row("all", summary))
    for b in summary.get("drift", []):
        lo, hi = b["chunk_range"]
        lines.append(row(f"[{lo},{'' if hi is None else hi})", b))
    return "\n".join(lines)


__all__: Iterable[str] = (
    "ChunkDetection", "DetectedObject", "PromptShots", "SynthEvalError", "aggregate", "analyse_chunk",
    "bucket_edges", "chunk_bounds", "compare", "detect_chunk", "expected_frames", "image_stats", "judge_file",
    "judge_folder", "judge_video", "load_prompt_shots", "match_videos", "read_frames", "read_manifest",
    "render_ground_truth", "summary_table", "switch_check", "validate_detector",
)
