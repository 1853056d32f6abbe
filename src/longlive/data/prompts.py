"""Prompt inputs: per-chunk prompts and scene-cut flags from prompt files and multi-shot folders.

Layouts (the reference's `data.data_path` contract):
- `.txt` file: one sample per non-empty line, the same prompt for every chunk.
- multi-shot folder: sample folders (directly, or under `caption/`), each with numbered
  `0.json .. N-1.json` captions (`caption` field; `global.json` skipped) and an optional
  `shot_durations.txt` (chunks per shot). A folder that itself holds numbered JSONs is one sample.
- I2V: `images/<stem>.<ext>` + `prompts/<stem>.txt` (or side by side); each line is one shot.
The first chunk of every shot after the first gets `scene_cut_prefix` and a scene-cut flag.
Malformed input raises `PromptFileError` naming the file and line; lengths are only changed when
the caller asks for it (`mismatch`), and then the number of changed chunks is logged.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from longlive.config.schema import DEFAULT_SCENE_CUT_PREFIX, PROMPT_LENGTH_POLICIES

if TYPE_CHECKING:
    from longlive.config.schema import Config

logger = logging.getLogger(__name__)

MISMATCH_POLICIES = PROMPT_LENGTH_POLICIES
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DURATIONS_FILE = "shot_durations.txt"
SKIPPED_JSON = "global.json"
_NUMBERED_JSON = re.compile(r"^(\d+)\.json$", re.IGNORECASE)


class PromptFileError(ValueError):
    """Malformed prompt input; the message names the file (and line) and what to fix."""


@dataclass(frozen=True)
class PromptSample:
    """One video's prompts: `prompts[k]` conditions chunk k; `scene_cuts[k]` marks the first chunk of a new shot."""

    name: str
    prompts: list[str]
    scene_cuts: list[bool]
    source: str

    @property
    def num_chunks(self) -> int:
        return len(self.prompts)

    @property
    def shot_starts(self) -> list[int]:
        """Chunk indices where shots start (always includes 0)."""
        return [0] + [k for k, cut in enumerate(self.scene_cuts) if cut and k > 0]


@dataclass(frozen=True)
class ImagePromptSample(PromptSample):
    """An I2V sample: conditioning image path plus per-chunk prompts."""

    image_path: Path = Path()


def _check_policy(mismatch: str) -> None:
    if mismatch not in MISMATCH_POLICIES:
        raise ValueError(f"prompt length mismatch policy {mismatch!r} is not one of {MISMATCH_POLICIES}")


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PromptFileError(f"{path}: not valid UTF-8 text (byte {exc.start}). Save the file as UTF-8.") from exc
    except OSError as exc:
        raise PromptFileError(f"{path}: cannot read ({exc}).") from exc


def _check_no_prefix(text: str, prefix: str, where: str) -> None:
    if prefix and text.startswith(prefix):
        raise PromptFileError(
            f"{where}: the prompt starts with the scene-cut prefix {prefix!r}; the loader adds it at shot starts "
            f"itself, and a prompt that already has it would mark every chunk as a scene cut. Remove the prefix."
        )


def scene_cut_mask(prompts: Sequence[str], prefix: str = DEFAULT_SCENE_CUT_PREFIX) -> list[bool]:
    """Reference rule: chunk k > 0 is a scene cut when its prompt starts with `prefix`."""
    return [k > 0 and bool(prefix) and p.startswith(prefix) for k, p in enumerate(prompts)]


# ------------------------------------------------------------------------------------------------
# Shot -> chunk expansion
# ------------------------------------------------------------------------------------------------
def even_split(num_shots: int, num_chunks: int) -> list[int]:
    """Chunks per shot for an even split; the first `num_chunks % num_shots` shots get one extra chunk."""
    base, extra = divmod(num_chunks, num_shots)
    return [base + (1 if i < extra else 0) for i in range(num_shots)]


def expand_shots(captions: Sequence[str], lengths: Sequence[int], prefix: str) -> tuple[list[str], list[bool]]:
    """Per-chunk prompts and cut flags for shots of the given lengths (prefix on each later shot's first chunk)."""
    prompts: list[str] = []
    cuts: list[bool] = []
    for shot, (caption, n) in enumerate(zip(captions, lengths)):
        for k in range(n):
            first = k == 0 and shot > 0
            prompts.append(prefix + caption if first else caption)
            cuts.append(first)
    return prompts, cuts


def fit_to_chunks(prompts: list[str], cuts: list[bool], num_chunks: int, mismatch: str, where: str,
                  what: str, last_caption: str) -> tuple[list[str], list[bool]]:
    """Make the per-chunk lists exactly `num_chunks` long, only as far as `mismatch` allows (logged)."""
    _check_policy(mismatch)
    have = len(prompts)
    if have == num_chunks:
        return prompts, cuts
    if have > num_chunks and mismatch in ("truncate", "fit"):
        dropped = have - num_chunks
        lost_shots = sum(cuts[num_chunks:])
        logger.warning("%s: %s gives %d chunks; truncated to %d (dropped %d chunk(s), %d later shot(s) lost) "
                       "because data.prompt_length_mismatch=%s", where, what, have, num_chunks, dropped, lost_shots,
                       mismatch)
        return prompts[:num_chunks], cuts[:num_chunks]
    if have < num_chunks and mismatch in ("pad_last", "fit"):
        added = num_chunks - have
        logger.warning("%s: %s gives %d chunks; padded to %d with the last caption (%d chunk(s) added) "
                       "because data.prompt_length_mismatch=%s", where, what, have, num_chunks, added, mismatch)
        return prompts + [last_caption] * added, cuts + [False] * added
    allowed = "truncate or fit" if have > num_chunks else "pad_last or fit"
    raise PromptFileError(
        f"{where}: {what} gives {have} chunks but the video has {num_chunks} chunks "
        f"(latent frames / num_frame_per_block). Fix the prompt input, change the number of frames, or set "
        f"data.prompt_length_mismatch to {allowed}."
    )


# ------------------------------------------------------------------------------------------------
# .txt prompt files
# ------------------------------------------------------------------------------------------------
def load_text_prompts(path: str | Path, num_chunks: int, scene_cut_prefix: str = DEFAULT_SCENE_CUT_PREFIX
                      ) -> list[PromptSample]:
    """One sample per non-empty line, repeated over all `num_chunks` chunks (no scene cuts)."""
    path = Path(path)
    if num_chunks < 1:
        raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
    samples: list[PromptSample] = []
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        text = line.strip()
        if not text:
            continue
        _check_no_prefix(text, scene_cut_prefix, f"{path}:{lineno}")
        samples.append(PromptSample(name=str(len(samples)), prompts=[text] * num_chunks,
                                    scene_cuts=[False] * num_chunks, source=f"{path}:{lineno}"))
    if not samples:
        raise PromptFileError(f"{path}: the prompt file has no non-empty lines. Write one prompt per line.")
    return samples


# ------------------------------------------------------------------------------------------------
# Multi-shot folders
# ------------------------------------------------------------------------------------------------
def _numbered_jsons(folder: Path) -> dict[int, Path]:
    found: dict[int, Path] = {}
    for entry in folder.iterdir():
        if not entry.is_file() or entry.suffix.lower() != ".json":
            continue
        if entry.name.lower() == SKIPPED_JSON:
            continue
        m = _NUMBERED_JSON.match(entry.name)
        if m is None:
            raise PromptFileError(
                f"{entry}: unexpected JSON file in a multi-shot folder; shot captions must be named 0.json, 1.json, "
                f"... (global.json is skipped). Rename or remove it."
            )
        index = int(m.group(1))
        if index in found:
            raise PromptFileError(f"{entry}: shot number {index} is also used by {found[index].name}. Keep one of them.")
        found[index] = entry
    return found


def read_caption(path: Path) -> str:
    """The non-empty `caption` string of one shot JSON."""
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PromptFileError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}.") from exc
    if not isinstance(data, dict):
        raise PromptFileError(f"{path}:1: expected a JSON object with a 'caption' field, got {type(data).__name__}.")
    if "caption" not in data:
        raise PromptFileError(f"{path}: missing 'caption' field (keys: {sorted(data)}). Add the shot's prompt as 'caption'.")
    caption = data["caption"]
    if not isinstance(caption, str):
        raise PromptFileError(f"{path}: 'caption' must be a string, got {type(caption).__name__}.")
    if not caption.strip():
        raise PromptFileError(f"{path}: 'caption' is empty. Write the shot's prompt.")
    return caption.strip()


def read_shot_captions(folder: str | Path) -> list[str]:
    """Captions of `0.json .. N-1.json` in numeric order (numbering must be consecutive from 0)."""
    folder = Path(folder)
    found = _numbered_jsons(folder)
    if not found:
        raise PromptFileError(f"{folder}: no shot captions (0.json, 1.json, ...) in this sample folder.")
    expected = list(range(len(found)))
    if sorted(found) != expected:
        missing = sorted(set(range(max(found) + 1)) - set(found))
        raise PromptFileError(
            f"{folder}: shot captions must be numbered consecutively from 0.json; found {sorted(found)}, "
            f"missing {', '.join(f'{m}.json' for m in missing)}. Renumber the files."
        )
    return [read_caption(found[i]) for i in expected]


def read_shot_durations(folder: str | Path) -> Optional[list[int]]:
    """Chunks per shot from `shot_durations.txt` (comma/space separated positive ints), or None if absent."""
    path = Path(folder) / DURATIONS_FILE
    if not path.is_file():
        return None
    values: list[int] = []
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        for token in re.split(r"[,\s]+", line.strip()):
            if not token:
                continue
            try:
                value = int(token)
            except ValueError:
                raise PromptFileError(f"{path}:{lineno}: {token!r} is not an integer; write chunks per shot, e.g. '2 2 4'.") from None
            if value < 1:
                raise PromptFileError(f"{path}:{lineno}: shot duration {value} must be at least 1 chunk.")
            values.append(value)
    if not values:
        raise PromptFileError(f"{path}: the file is empty; write one chunk count per shot, or delete the file.")
    return values


def load_multishot_sample(folder: str | Path, num_chunks: int, *, chunks_per_shot: Optional[int] = None,
                          scene_cut_prefix: str = DEFAULT_SCENE_CUT_PREFIX, mismatch: str = "error") -> PromptSample:
    """Per-chunk prompts of one sample folder: durations from shot_durations.txt, else chunks_per_shot, else even split."""
    _check_policy(mismatch)
    folder = Path(folder)
    captions = read_shot_captions(folder)
    for i, caption in enumerate(captions):
        _check_no_prefix(caption, scene_cut_prefix, str(folder / f"{i}.json"))
    durations = read_shot_durations(folder)
    where = str(folder)
    if durations is not None:
        if len(durations) != len(captions):
            raise PromptFileError(
                f"{folder / DURATIONS_FILE}:1: {len(durations)} duration(s) for {len(captions)} shot caption(s) "
                f"(0.json .. {len(captions) - 1}.json). Write exactly one chunk count per shot."
            )
        lengths, what = durations, f"{DURATIONS_FILE} ({' '.join(map(str, durations))})"
        where = str(folder / DURATIONS_FILE)
    elif chunks_per_shot is not None:
        if chunks_per_shot < 1:
            raise ValueError(f"chunks_per_shot must be >= 1, got {chunks_per_shot}")
        lengths, what = [chunks_per_shot] * len(captions), f"{len(captions)} shots x chunks_per_shot={chunks_per_shot}"
    else:
        if len(captions) > num_chunks:
            if mismatch not in ("truncate", "fit"):
                raise PromptFileError(
                    f"{folder}: {len(captions)} shots cannot be spread over {num_chunks} chunks (at least one chunk per "
                    f"shot). Add shot_durations.txt, generate more frames, or set data.prompt_length_mismatch to truncate."
                )
            logger.warning("%s: %d shots for %d chunks; keeping the first %d shots (one chunk each) because "
                           "data.prompt_length_mismatch=%s", folder, len(captions), num_chunks, num_chunks, mismatch)
            captions = captions[:num_chunks]
        lengths, what = even_split(len(captions), num_chunks), "even split"
    prompts, cuts = expand_shots(captions, lengths, scene_cut_prefix)
    prompts, cuts = fit_to_chunks(prompts, cuts, num_chunks, mismatch, where, what, captions[-1])
    return PromptSample(name=folder.name, prompts=prompts, scene_cuts=cuts, source=str(folder))


def _is_sample_folder(folder: Path) -> bool:
    return any(_NUMBERED_JSON.match(p.name) for p in folder.iterdir() if p.is_file())


def find_sample_folders(root: str | Path) -> list[Path]:
    """Sample folders of a multi-shot prompt root (`root/caption/*` if present, else `root/*`, or root itself)."""
    root = Path(root)
    base = root / "caption" if (root / "caption").is_dir() else root
    if _is_sample_folder(base):
        return [base]
    folders = sorted((d for d in base.iterdir() if d.is_dir() and not d.name.startswith(".")),
                     key=lambda d: _natural_key(d.name))
    if not folders:
        raise PromptFileError(
            f"{base}: no sample folders found. Expected <sample>/0.json, 1.json, ... (optionally under caption/), "
            f"or a .txt prompt file."
        )
    return folders


def load_multishot_folder(root: str | Path, num_chunks: int, *, chunks_per_shot: Optional[int] = None,
                          scene_cut_prefix: str = DEFAULT_SCENE_CUT_PREFIX, mismatch: str = "error"
                          ) -> list[PromptSample]:
    """All samples of a multi-shot prompt root, in natural folder-name order."""
    return [load_multishot_sample(f, num_chunks, chunks_per_shot=chunks_per_shot, scene_cut_prefix=scene_cut_prefix,
                                  mismatch=mismatch) for f in find_sample_folders(root)]


def load_prompts(path: str | Path, num_chunks: int, *, chunks_per_shot: Optional[int] = None,
                 scene_cut_prefix: str = DEFAULT_SCENE_CUT_PREFIX, mismatch: str = "error") -> list[PromptSample]:
    """Load a `.txt` prompt file or a multi-shot prompt folder into per-chunk prompt samples."""
    path = Path(path)
    if num_chunks < 1:
        raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
    if path.is_dir():
        return load_multishot_folder(path, num_chunks, chunks_per_shot=chunks_per_shot,
                                     scene_cut_prefix=scene_cut_prefix, mismatch=mismatch)
    if path.is_file():
        if path.suffix.lower() != ".txt":
            raise PromptFileError(f"{path}: prompt input must be a .txt file or a folder of multi-shot prompts.")
        return load_text_prompts(path, num_chunks, scene_cut_prefix)
    raise PromptFileError(f"{path}: prompt file or folder not found (cwd: {Path.cwd()}).")


# ------------------------------------------------------------------------------------------------
# I2V image + prompt layout
# ------------------------------------------------------------------------------------------------
def load_image_prompts(root: str | Path, num_chunks: int, *, scene_cut_prefix: str = DEFAULT_SCENE_CUT_PREFIX,
                       mismatch: str = "error") -> list[ImagePromptSample]:
    """I2V inputs: `images/<stem>.<ext>` + `prompts/<stem>.txt` (or side by side); each line is one shot."""
    _check_policy(mismatch)
    root = Path(root)
    if not root.is_dir():
        raise PromptFileError(f"{root}: I2V input folder not found (cwd: {Path.cwd()}).")
    images_dir = root / "images" if (root / "images").is_dir() else root
    prompts_dir = root / "prompts" if (root / "prompts").is_dir() else images_dir
    images: dict[str, Path] = {}
    for p in sorted(images_dir.iterdir(), key=lambda q: _natural_key(q.name)):
        if not p.is_file() or p.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if p.stem in images:
            raise PromptFileError(f"{p}: two images share the name {p.stem!r} ({images[p.stem].name}). Rename one.")
        images[p.stem] = p
    if not images:
        raise PromptFileError(
            f"{images_dir}: no images ({', '.join(IMAGE_EXTENSIONS)}). Expected images/<name>.png + prompts/<name>.txt."
        )
    orphans = sorted(p.name for p in prompts_dir.glob("*.txt") if p.stem not in images)
    if orphans:
        logger.warning("%s: %d prompt file(s) without a matching image are not used: %s", prompts_dir, len(orphans),
                       ", ".join(orphans[:5]) + (" ..." if len(orphans) > 5 else ""))
    samples: list[ImagePromptSample] = []
    for stem, image in images.items():
        txt = prompts_dir / f"{stem}.txt"
        if not txt.is_file():
            raise PromptFileError(f"{image}: no prompt file {txt}. Write the prompt (one shot per line) there.")
        shots: list[str] = []
        for lineno, line in enumerate(_read_text(txt).splitlines(), start=1):
            if line.strip():
                _check_no_prefix(line.strip(), scene_cut_prefix, f"{txt}:{lineno}")
                shots.append(line.strip())
        if not shots:
            raise PromptFileError(f"{txt}: the prompt file has no non-empty lines. Write one shot per line.")
        if len(shots) > num_chunks:
            if mismatch not in ("truncate", "fit"):
                raise PromptFileError(
                    f"{txt}: {len(shots)} shots cannot be spread over {num_chunks} chunks (at least one chunk per "
                    f"shot). Use fewer lines, generate more frames, or set data.prompt_length_mismatch to truncate."
                )
            logger.warning("%s: %d shots for %d chunks; keeping the first %d because data.prompt_length_mismatch=%s",
                           txt, len(shots), num_chunks, num_chunks, mismatch)
            shots = shots[:num_chunks]
        prompts, cuts = expand_shots(shots, even_split(len(shots), num_chunks), scene_cut_prefix)
        samples.append(ImagePromptSample(name=stem, prompts=prompts, scene_cuts=cuts, source=str(txt), image_path=image))
    return samples


# ------------------------------------------------------------------------------------------------
# From a config
# ------------------------------------------------------------------------------------------------
def load_prompts_from_config(cfg: "Config", field: str = "data.data_path") -> list[PromptSample]:
    """Prompt samples for a run: the path in `field` (placeholder/missing -> ConfigError), chunks from the config."""
    from longlive.config.paths import require_path

    path = require_path(cfg, field)
    kwargs = dict(scene_cut_prefix=cfg.inference.scene_cut_prefix, mismatch=cfg.data.prompt_length_mismatch)
    if cfg.i2v and path.is_dir():
        if (path / "video").is_dir():
            raise PromptFileError(
                f"{path}: has a video/ folder (video dataset layout: the first frame of each clip is the condition "
                f"image); load it with the video dataset, not as image+prompt files."
            )
        return list(load_image_prompts(path, cfg.num_chunks, **kwargs))
    return load_prompts(path, cfg.num_chunks, chunks_per_shot=cfg.data.chunks_per_shot, **kwargs)
