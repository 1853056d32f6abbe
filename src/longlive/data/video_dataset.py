"""Training clips from folders of consecutive videos (`MultiVideoConcatDataset`, spec 5.6).

Layout: `root/video/<sample>/<k>.mp4|avi|mov|mkv|webm` + `root/caption/<sample>/<k>.json` ({"caption": ...}).
A clip of F latent frames (T = 1 + s(F-1) raw frames, s = VAE temporal stride) is cut into chunks of
L latent frames: chunk 0 has 1 + s(L-1) raw frames, later chunks s*L. Chunks are taken from
consecutive videos of one sample folder, resampled to 24 fps; a chunk that starts a new video, or a
virtual cut after `max_chunks_per_shot` chunks of one video (1 s of source skipped), gets the
scene-cut prefix on its prompt. Randomness (the start) comes from a generator seeded by
(seed, epoch, index), so an item is reproducible for resumable training.
"""
from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import numpy as np
import torch

from longlive.config.schema import DEFAULT_SCENE_CUT_PREFIX

if TYPE_CHECKING:
    from longlive.config.schema import Config

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")
TARGET_FPS = 24.0
_CANDIDATES_PER_VIDEO = 50  # random starts are tried every max(1, max_start // 50) source frames
_SLOW_SCAN_S = 60.0


class DatasetError(RuntimeError):
    """A training dataset cannot be built or read; the message names the path."""


class SampleReadError(DatasetError):
    """One sample could not be read; `path` is the file (or folder) at fault, `reason` says why."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")


class AllSamplesFailedError(DatasetError):
    """Every sample of a dataset failed to load."""


# ------------------------------------------------------------------------------------------------
# Seeding and the skip-and-retry loop shared by the training datasets
# ------------------------------------------------------------------------------------------------
def item_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for item `index` of epoch `epoch` (stable across runs and platforms)."""
    if min(seed, epoch, index) < 0:
        raise ValueError(f"seed, epoch and index must be >= 0, got {seed}, {epoch}, {index}")
    state = np.random.SeedSequence([int(seed), int(epoch), int(index)]).generate_state(1, dtype=np.uint64)[0]
    return int(state) >> 1


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """CPU generator for the random choices of one item."""
    return torch.Generator().manual_seed(item_seed(seed, epoch, index))


def load_with_fallback(load: Callable[[int], dict[str, Any]], index: int, size: int, what: str) -> dict[str, Any]:
    """`load(index)`, else the next samples in order (wrapping), each failure one warning naming the file.

    The returned item's "skipped" lists the files that failed before it. Raises AllSamplesFailedError
    when all `size` samples fail.
    """
    if not 0 <= index < size:
        raise IndexError(f"index {index} out of range for {size} samples of {what}")
    errors: list[SampleReadError] = []
    started = time.monotonic()
    warned_slow = False
    for attempt in range(size):
        i = (index + attempt) % size
        try:
            item = load(i)
        except SampleReadError as exc:
            logger.warning("skipping sample %d of %s: %s", i, what, exc)
            errors.append(exc)
            if not warned_slow and time.monotonic() - started > _SLOW_SCAN_S:
                logger.warning("%s: %d samples failed in a row while loading index %d (%.0f s so far)",
                               what, len(errors), index, time.monotonic() - started)
                warned_slow = True
            continue
        item["skipped"] = [e.path for e in errors]
        return item
    first = "\n  ".join(str(e) for e in errors[:5])
    raise AllSamplesFailedError(f"{what}: all {size} samples failed to load. First errors:\n  {first}")


# ------------------------------------------------------------------------------------------------
# Planning: which source frames of which video fill each chunk
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SourceVideo:
    """Frame count and rate of one source video (what planning needs)."""

    num_frames: int
    fps: float


def frames_available(video: SourceVideo, start: int, fps: float = TARGET_FPS) -> int:
    """Frames at `fps` from source frame `start`: indices start + round(j * src_fps / fps) below the end."""
    limit = video.num_frames - start
    if limit <= 0 or start < 0:
        return 0
    step = video.fps / fps
    j = int(limit / step) + 2  # round((j - 1) * step) >= limit here; walk back to the first such j
    while j > 0 and round((j - 1) * step) >= limit:
        j -= 1
    return j


@dataclass
class Run:
    """Consecutive frames at the target fps from one video: source frames start + round(j * step), j < num_frames."""

    video: int
    start: int
    num_frames: int
    chunks: int = 0  # chunks that begin in this run (for max_chunks_per_shot)


@dataclass
class Plan:
    """Runs in clip order plus per-chunk bookkeeping; `valid_latents` < F means the tail must be padded."""

    runs: list[Run] = field(default_factory=list)
    chunk_video: list[int] = field(default_factory=list)  # video of each placed (possibly partial) chunk
    chunk_cut: list[bool] = field(default_factory=list)  # chunk starts a new video or a virtual cut (k > 0)
    valid_latents: int = 0
    complete: bool = False
    failed_chunk: Optional[int] = None

    @property
    def raw_frames(self) -> int:
        return sum(r.num_frames for r in self.runs)


def plan_clip(
    video: Callable[[int], SourceVideo],
    num_videos: int,
    start: tuple[int, int],
    frames_per_chunk: int,
    num_chunks: int,
    temporal_stride: int = 4,
    max_chunks_per_shot: int = 0,
    single_video: bool = False,
    partial: bool = False,
    fps: float = TARGET_FPS,
    exact_start: bool = False,
) -> Plan:
    """Place the chunks of one clip on the videos of a sample, starting at (video, source frame) `start`.

    A chunk continues the current run if it fits; otherwise (or after `max_chunks_per_shot` chunks of
    the run, skipping round(src_fps) source frames) it starts a new run: the virtual cut, then the
    following videos at frame 0, never wrapping to earlier videos. `single_video`: the whole clip
    from one video (no cuts): the first of `start`, then the following videos at frame 0, that holds
    it. With `partial`, a chunk that does not fit anywhere takes the whole latent frames left in its
    run and planning stops. `exact_start`: chunk 0 only at `start` (for judging random starts).
    `video(i)` is only called for videos that are looked at.
    """
    args = (video, num_videos, frames_per_chunk, num_chunks, temporal_stride, max_chunks_per_shot, partial, fps)
    firsts = [start] if exact_start else [start] + [(v, 0) for v in range(start[0] + 1, num_videos)]
    if not single_video:
        return _plan_from(*args, firsts, single_video=False)
    best: Optional[Plan] = None
    for where in firsts:
        plan = _plan_from(*args, [where], single_video=True)
        if plan.complete:
            return plan
        if best is None or plan.valid_latents > best.valid_latents:
            best = plan
    assert best is not None
    return best


def random_clip_start(video: Callable[[int], SourceVideo], num_videos: int, generator: torch.Generator,
                      **plan_kwargs: Any) -> tuple[int, int]:
    """A random (video, source frame) among the candidate starts (every max_start // 50 frames of every
    video) from which `plan_clip` places the whole clip; (0, 0) when none does."""
    starts = []
    for v in range(num_videos):
        max_start = video(v).num_frames - 1
        for f in range(0, max_start + 1, max(1, max_start // _CANDIDATES_PER_VIDEO)):
            if plan_clip(video, num_videos, (v, f), exact_start=True, **plan_kwargs).complete:
                starts.append((v, f))
    return starts[int(torch.randint(len(starts), (1,), generator=generator))] if starts else (0, 0)


def _plan_from(video: Callable[[int], SourceVideo], num_videos: int, L: int, num_chunks: int, s: int,
               max_chunks_per_shot: int, partial: bool, fps: float, first: list[tuple[int, int]],
               single_video: bool) -> Plan:
    """plan_clip with chunk 0 at the first of `first` that holds it."""
    plan = Plan()
    for k in range(num_chunks):
        raw = 1 + s * (L - 1) if k == 0 else s * L
        run = plan.runs[-1] if plan.runs else None
        virtual_cut = False
        if run is None:
            candidates = first
        else:
            info = video(run.video)
            virtual_cut = max_chunks_per_shot > 0 and run.chunks >= max_chunks_per_shot and not single_video
            if not virtual_cut and run.num_frames + raw <= frames_available(info, run.start, fps):
                run.num_frames += raw
                run.chunks += 1
                plan.chunk_video.append(run.video)
                plan.chunk_cut.append(False)
                plan.valid_latents += L
                continue
            candidates = []
            if virtual_cut:
                candidates.append((run.video, run.start + round(run.num_frames * info.fps / fps) + round(info.fps)))
            if not single_video:
                candidates += [(v, 0) for v in range(run.video + 1, num_videos)]
        placed = False
        for v, f in candidates:
            if frames_available(video(v), f, fps) >= raw:
                plan.runs.append(Run(v, f, raw, 1))
                plan.chunk_video.append(v)
                plan.chunk_cut.append(k > 0)
                plan.valid_latents += L
                placed = True
                break
        if placed:
            continue
        plan.failed_chunk = k
        if partial and not virtual_cut:
            _place_partial(plan, video, first[0], k, s, fps)
        return plan
    plan.complete = True
    return plan


def _place_partial(plan: Plan, video: Callable[[int], SourceVideo], start: tuple[int, int], k: int, s: int,
                   fps: float) -> None:
    """Give chunk k the whole latent frames left in its run (chunk 0: at the start position).

    Not called when the chunk was due a virtual cut: a partial chunk never extends a shot past the limit.
    """
    if k == 0:
        have = frames_available(video(start[0]), start[1], fps)
        if have >= 1:
            latents = 1 + (have - 1) // s
            plan.runs.append(Run(start[0], start[1], 1 + s * (latents - 1), 1))
            plan.chunk_video.append(start[0])
            plan.chunk_cut.append(False)
            plan.valid_latents += latents
        return
    run = plan.runs[-1]
    left = frames_available(video(run.video), run.start, fps) - run.num_frames
    latents = max(left, 0) // s
    if latents:
        run.num_frames += s * latents
        plan.chunk_video.append(run.video)
        plan.chunk_cut.append(False)
        plan.valid_latents += latents


# ------------------------------------------------------------------------------------------------
# Sample folders
# ------------------------------------------------------------------------------------------------
def natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


@dataclass(frozen=True)
class CaptionedVideo:
    path: Path
    caption: str


def read_training_caption(path: Path) -> Optional[str]:
    """The stripped caption of one JSON, None when it is empty; malformed files raise SampleReadError."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SampleReadError(path, f"cannot read the caption file ({exc})") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SampleReadError(path, f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    if not isinstance(data, dict) or "caption" not in data:
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise SampleReadError(path, f"expected a JSON object with a 'caption' field, got {keys}")
    caption = data["caption"]
    if caption is None:
        return None
    if not isinstance(caption, str):
        raise SampleReadError(path, f"'caption' must be a string, got {type(caption).__name__}")
    return caption.strip() or None


def list_sample_videos(video_dir: Path, caption_dir: Path, scene_cut_prefix: str = "") -> tuple[list[CaptionedVideo], list[str]]:
    """Videos of one sample folder with numeric stems, in numeric order, that have a non-empty caption.

    Returns (videos, ignored) where `ignored` names the files left out (no caption, non-numeric stem).
    """
    if not video_dir.is_dir():
        raise SampleReadError(video_dir, "sample folder not found")
    by_stem: dict[int, Path] = {}
    ignored: list[str] = []
    try:
        entries = sorted(video_dir.iterdir(), key=lambda p: natural_key(p.name))
    except OSError as exc:
        raise SampleReadError(video_dir, f"cannot list the folder ({exc})") from exc
    for p in entries:
        if not p.is_file() or p.suffix.lower() not in VIDEO_EXTENSIONS:
            continue
        if not p.stem.isdigit():
            ignored.append(f"{p.name} (stem is not a number)")
            continue
        k = int(p.stem)
        if k in by_stem:
            raise SampleReadError(p, f"video number {k} is also used by {by_stem[k].name}; keep one of them")
        by_stem[k] = p
    videos = []
    for k in sorted(by_stem):
        path = by_stem[k]
        cap_path = caption_dir / f"{path.stem}.json"
        caption = read_training_caption(cap_path) if cap_path.is_file() else None
        if caption is None:
            ignored.append(f"{path.name} ({'empty caption' if cap_path.is_file() else 'no ' + cap_path.name})")
            continue
        if scene_cut_prefix and caption.startswith(scene_cut_prefix):
            raise SampleReadError(cap_path, f"the caption starts with the scene-cut prefix {scene_cut_prefix!r}, "
                                            "which the dataset adds itself; remove it from the caption")
        videos.append(CaptionedVideo(path, caption))
    return videos, ignored


# ------------------------------------------------------------------------------------------------
# The dataset
# ------------------------------------------------------------------------------------------------
def vae_strides(vae_type: str) -> tuple[int, int]:
    """(temporal, spatial) stride of the VAE of `inference.vae_type` (LightVAE keeps the Wan2.2 strides)."""
    from longlive.models.vae import WanVAEConfig

    if vae_type == "patchify":
        from longlive.models.vae.patchify import PatchifyVAEConfig

        return PatchifyVAEConfig().temporal_stride, PatchifyVAEConfig().spatial_stride
    cfg = WanVAEConfig.preset("tiny" if vae_type == "tiny" else "wan2.2")
    return cfg.temporal_stride, cfg.spatial_stride


class MultiVideoConcatDataset(torch.utils.data.Dataset):
    """Clips of `latent_frames` latents concatenated from consecutive videos of one sample folder.

    Item: "frames" float16 [3, T, H, W] in [-1, 1] (T = 1 + s(F-1)), "prompts" (one per chunk),
    "num_valid_latent_frames", "name", "index", "skipped" (files that failed before this item), and
    "image" [3, H, W] (frame 0) with `return_image`. Unreadable samples are skipped with a warning.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        latent_frames: int,
        frames_per_chunk: int,
        frame_size: tuple[int, int],
        temporal_stride: int = 4,
        train: bool = True,
        seed: int = 0,
        max_chunks_per_shot: int = 0,
        scene_cut_prefix: str = DEFAULT_SCENE_CUT_PREFIX,
        uniform_prompt: bool = False,
        allow_padding: bool = False,
        min_latent_frames: int = 0,
        filter_invalid_folders: bool = False,
        return_image: bool = False,
        fps: float = TARGET_FPS,
    ) -> None:
        self.root = Path(root)
        if frames_per_chunk < 1 or latent_frames < frames_per_chunk or latent_frames % frames_per_chunk:
            raise ValueError(f"latent_frames={latent_frames} must be a positive multiple of frames_per_chunk={frames_per_chunk}")
        if min_latent_frames > latent_frames:
            raise ValueError(f"min_latent_frames={min_latent_frames} exceeds latent_frames={latent_frames}")
        if len(frame_size) != 2 or min(frame_size) < 1:
            raise ValueError(f"frame_size must be (height, width) in pixels, got {frame_size}")
        self.latent_frames, self.frames_per_chunk = int(latent_frames), int(frames_per_chunk)
        self.num_chunks = self.latent_frames // self.frames_per_chunk
        self.temporal_stride = int(temporal_stride)
        self.raw_frames = 1 + self.temporal_stride * (self.latent_frames - 1)
        self.frame_size = (int(frame_size[0]), int(frame_size[1]))
        self.train, self.seed, self.epoch = bool(train), int(seed), 0
        self.max_chunks_per_shot = int(max_chunks_per_shot)
        self.scene_cut_prefix = scene_cut_prefix
        self.uniform_prompt, self.allow_padding = bool(uniform_prompt), bool(allow_padding)
        self.min_latent_frames, self.return_image, self.fps = int(min_latent_frames), bool(return_image), float(fps)
        self._reported_ignored: set[str] = set()

        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: dataset root not found (cwd: {Path.cwd()}); set data.data_path to a folder "
                               "with video/<sample>/<k>.mp4 and caption/<sample>/<k>.json")
        self.video_root, self.caption_root = self.root / "video", self.root / "caption"
        for sub in (self.video_root, self.caption_root):
            if not sub.is_dir():
                raise DatasetError(f"{sub}: folder not found; the dataset layout is {self.root}/video/<sample>/<k>.mp4 "
                                   f"+ {self.root}/caption/<sample>/<k>.json")
        names = sorted((d.name for d in self.video_root.iterdir() if d.is_dir() and not d.name.startswith(".")),
                       key=natural_key)
        if not names:
            raise DatasetError(f"{self.video_root}: no sample folders (expected {self.video_root}/<sample>/<k>.mp4)")
        self.samples: list[str] = names
        if filter_invalid_folders:
            self._filter_invalid()

    @classmethod
    def from_config(cls, cfg: "Config", train: bool, seed: int, *, root: str | Path | None = None,
                    return_image: bool | None = None) -> "MultiVideoConcatDataset":
        """The dataset of `data.data_path` with the latent geometry, chunking and options of `cfg`."""
        if root is None:
            from longlive.config.paths import require_path

            root = require_path(cfg, "data.data_path", kind="dir")
        shape = cfg.data.image_or_video_shape
        if len(shape) != 5:
            raise ValueError(f"data.image_or_video_shape must be [B, F, C, H, W], got {shape}")
        temporal, spatial = vae_strides(cfg.inference.vae_type)
        d = cfg.data
        return cls(
            root, latent_frames=int(shape[1]), frames_per_chunk=cfg.frames_per_chunk,
            frame_size=(int(shape[3]) * spatial, int(shape[4]) * spatial), temporal_stride=temporal, train=train,
            seed=seed, max_chunks_per_shot=d.max_chunks_per_shot, scene_cut_prefix=cfg.inference.scene_cut_prefix,
            uniform_prompt=d.uniform_prompt, allow_padding=d.allow_padding, min_latent_frames=d.min_latent_frames,
            filter_invalid_folders=d.filter_invalid_folders, return_image=cfg.i2v if return_image is None else return_image,
        )

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        """Items of the next epoch use generators seeded by (seed, epoch, index)."""
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return load_with_fallback(self.load_sample, int(index), len(self), str(self.root))

    # ---------------------------------------------------------------------------------------------
    def _videos(self, name: str) -> list[CaptionedVideo]:
        videos, ignored = list_sample_videos(self.video_root / name, self.caption_root / name, self.scene_cut_prefix)
        if ignored and name not in self._reported_ignored:
            self._reported_ignored.add(name)
            logger.warning("%s: %d video(s) not used: %s", self.video_root / name, len(ignored),
                           ", ".join(ignored[:5]) + (" ..." if len(ignored) > 5 else ""))
        if not videos:
            raise SampleReadError(self.video_root / name, "no video with a non-empty caption in this sample folder")
        return videos

    def _plan(self, name: str, generator: Optional[torch.Generator]) -> tuple[list[CaptionedVideo], Plan]:
        videos = self._videos(name)
        infos: dict[int, SourceVideo] = {}

        def info(v: int) -> SourceVideo:
            if v not in infos:
                from longlive.io.video import VideoFileError, probe_video

                try:
                    meta = probe_video(videos[v].path)
                except (VideoFileError, OSError) as exc:
                    raise SampleReadError(videos[v].path, f"cannot probe the video ({exc})") from exc
                infos[v] = SourceVideo(meta.num_frames, meta.fps)
            return infos[v]

        kwargs = dict(frames_per_chunk=self.frames_per_chunk, num_chunks=self.num_chunks,
                      temporal_stride=self.temporal_stride, max_chunks_per_shot=self.max_chunks_per_shot,
                      single_video=self.uniform_prompt, fps=self.fps)
        start = (0, 0) if generator is None else random_clip_start(info, len(videos), generator, **kwargs)
        plan = plan_clip(info, len(videos), start, partial=self.allow_padding, **kwargs)
        if not plan.complete:
            needed = max(self.min_latent_frames, 1)
            if not self.allow_padding or plan.valid_latents < needed:
                if self.allow_padding:
                    why = f"need at least {needed} (data.min_latent_frames)"
                else:
                    why = "set data.allow_padding to pad short samples"
                raise SampleReadError(
                    self.video_root / name,
                    f"the videos give only {plan.valid_latents} of {self.latent_frames} latent frames "
                    f"({self.raw_frames} frames at {self.fps:g} fps) from video {start[0]} frame {start[1]}"
                    + (" in one video (data.uniform_prompt)" if self.uniform_prompt else "") + f"; {why}",
                )
        return videos, plan

    def load_sample(self, index: int) -> dict[str, Any]:
        """Item `index` without falling back to other samples (raises SampleReadError)."""
        from longlive.io.video import VideoFileError, read_video

        name = self.samples[index]
        generator = item_generator(self.seed, self.epoch, index) if self.train else None
        videos, plan = self._plan(name, generator)
        pieces = []
        for run in plan.runs:
            path = videos[run.video].path
            try:
                pieces.append(read_video(path, fps=self.fps, size=self.frame_size, start_frame=run.start,
                                         num_frames=run.num_frames, dtype=torch.float16))
            except (VideoFileError, OSError, ValueError) as exc:
                raise SampleReadError(path, f"cannot decode frames {run.start}.. ({exc})") from exc
        frames = torch.cat(pieces, dim=1)
        valid_raw = frames.shape[1]
        prompts = []
        for video, cut in zip(plan.chunk_video, plan.chunk_cut):
            caption = videos[video].caption
            prompts.append(self.scene_cut_prefix + caption if cut else caption)
        if valid_raw < self.raw_frames:
            pad = self.raw_frames - valid_raw
            frames = torch.cat([frames, frames[:, -1:].expand(-1, pad, -1, -1)], dim=1)
            missing = self.num_chunks - len(prompts)
            prompts += [videos[plan.chunk_video[-1]].caption] * missing
            logger.info("%s: padded %d of %d frames with the last frame (%d of %d latent frames valid, %d prompt(s) "
                        "repeated)", self.video_root / name, pad, self.raw_frames, plan.valid_latents,
                        self.latent_frames, missing)
        item: dict[str, Any] = {
            "frames": frames.contiguous(),
            "prompts": prompts,
            "num_valid_latent_frames": plan.valid_latents,
            "name": name,
            "index": int(index),
            "skipped": [],
        }
        if self.return_image:
            item["image"] = frames[:, 0].clone()
        return item

    def _filter_invalid(self) -> None:
        """Drop sample folders whose deterministic clip cannot be planned (probes every video, decodes none)."""
        keep, dropped = [], []
        for name in self.samples:
            try:
                self._plan(name, None)
                keep.append(name)
            except SampleReadError as exc:
                dropped.append(str(exc))
        if dropped:
            logger.warning("%s: filter_invalid_folders dropped %d of %d sample folders; first: %s", self.root,
                           len(dropped), len(self.samples), "; ".join(dropped[:3]))
        if not keep:
            raise AllSamplesFailedError(f"{self.root}: all {len(self.samples)} sample folders are invalid. First errors:\n  "
                                        + "\n  ".join(dropped[:5]))
        self.samples = keep


def collate_samples(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch items: tensors stacked, ints to a long tensor, prompts as a list of per-item lists."""
    if not items:
        raise ValueError("collate_samples got an empty batch")
    keys = set(items[0])
    for i, item in enumerate(items[1:], start=1):
        if set(item) != keys:
            raise ValueError(f"batch item {i} has keys {sorted(item)}, item 0 has {sorted(keys)}")
    out: dict[str, Any] = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if isinstance(values[0], torch.Tensor):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                raise ValueError(f"cannot stack '{key}' of different shapes {sorted(shapes)}")
            out[key] = torch.stack(values)
        elif isinstance(values[0], int) and not isinstance(values[0], bool):
            out[key] = torch.tensor(values, dtype=torch.long)
        else:
            out[key] = values
    return out
