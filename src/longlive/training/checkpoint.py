"""Training checkpoints: sharded, atomic, pruned (spec 5.7, avoiding 9.2 item 10's full copies).

A checkpoint is a folder `logdir/checkpoint_{step:06d}/` holding
- the trainer state written with torch.distributed.checkpoint (DCP): every rank writes its own
  shards, so FSDP2 models, optimizers and EMA shadows are never gathered to one rank;
- `rank_{r:05d}.pt`: each rank's own small state (RNG states, data position, error buffers), read
  back with `torch.load(weights_only=True)`;
- optional exports (e.g. a full generator `.safetensors` written by `export_full_state`);
- `manifest.json`, written last by rank 0.
Everything is written into `checkpoint_{step:06d}.partial/` and renamed into place only after all
ranks finished and the files were fsynced, so a folder without `.partial` is always complete.
All ranks must see the same `logdir` (a shared filesystem), and one training job owns a logdir.
DCP's own `.metadata` file is a pickle: load only checkpoints your own runs wrote.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from .. import __version__
from ..io.checkpoint import CheckpointError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "longlive_training_checkpoint"
FORMAT_VERSION = 1
_COMPLETE = re.compile(r"^checkpoint_(\d{6,})$")
_PARTIAL_SUFFIX = ".partial"

__all__ = [
    "CheckpointManager",
    "ModelOptimizerState",
    "export_full_state",
    "read_manifest",
    "rank_file_name",
]


# ---------------------------------------------------------------------------------------- helpers
def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank_world(group) -> tuple[int, int]:
    if _dist_on():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def _collective_device(group) -> torch.device:
    backend = str(dist.get_backend(group))
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _agree(ok: bool, group) -> bool:
    """True on every rank iff `ok` on every rank (a barrier that also carries success)."""
    if not _dist_on():
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=_collective_device(group))
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


def _step_collectively(what: str, where: Path, group, fn: Callable[[], Any]) -> Any:
    """Run `fn` on every rank; if it fails on any rank, raise on all ranks instead of hanging."""
    result, error = None, None
    try:
        result = fn()
    except Exception as exc:  # re-raised below, on every rank
        error = exc
        log.error("checkpoint %s: %s failed on this rank: %s: %s", where, what, type(exc).__name__, exc)
    if not _agree(error is None, group):
        if error is not None:
            raise error
        raise CheckpointError(f"checkpoint {where}: {what} failed on another rank (see that rank's log); this save is abandoned")
    return result


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:  # e.g. platforms without directory handles
        log.debug("cannot open %s to fsync it: %s", path, exc)
        return
    try:
        os.fsync(fd)
    except OSError as exc:  # some network filesystems refuse fsync on directories
        log.debug("fsync of directory %s not supported: %s", path, exc)
    finally:
        os.close(fd)


def _quiet_no_dist(fn: Callable[[], Any]) -> Any:
    """Call DCP; without a process group it warns on every call that it runs single-process (intended here)."""
    if _dist_on():
        return fn()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled, unavailable or uninitialized")
        return fn()


_SAFE_LEAVES = (torch.Tensor, int, float, bool, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


def _check_per_rank(obj: Any, where: str) -> None:
    """Per-rank state must load with torch.load(weights_only=True): tensors, numbers, strings, containers."""
    from torch.distributed.tensor import DTensor

    if isinstance(obj, DTensor):
        raise TypeError(f"per-rank state {where} is a DTensor; put sharded tensors into `state` (DCP), not `per_rank`")
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"per-rank state {where}: key {k!r} is a {type(k).__name__}; use str or int keys")
            _check_per_rank(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_per_rank(v, f"{where}[{i}]")
    elif not isinstance(obj, _SAFE_LEAVES):
        raise TypeError(
            f"per-rank state {where} is a {type(obj).__name__}; only tensors, numbers, strings and "
            "dicts/lists/tuples of them can be restored with torch.load(weights_only=True)"
        )


def rank_file_name(rank: int) -> str:
    """Name of one rank's per-rank state file inside a checkpoint folder."""
    return f"rank_{rank:05d}.pt"


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a complete checkpoint folder; raises CheckpointError for incomplete/foreign folders."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"training checkpoint not found: {path} is not a folder")
    manifest = path / MANIFEST
    if not manifest.is_file():
        hint = " (the save was interrupted; it is removed when a CheckpointManager is next created)" if path.name.endswith(_PARTIAL_SUFFIX) else ""
        raise CheckpointError(
            f"{path}: no {MANIFEST}, so this is not a complete longlive training checkpoint{hint}; "
            "use CheckpointManager.latest() or pick another checkpoint folder"
        )
    try:
        data = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{manifest}: unreadable manifest: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{manifest}: not a longlive training checkpoint manifest (format {data.get('format') if isinstance(data, dict) else None!r})")
    for key in ("step", "world_size", "files"):
        if key not in data:
            raise CheckpointError(f"{manifest}: field {key!r} is missing")
    return data


def _list_files(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------- manager
class CheckpointManager:
    """Saves, finds, loads and prunes the training checkpoints of one logdir (collective on `group`)."""

    def __init__(self, logdir: str | os.PathLike, max_checkpoints: int, *, group: dist.ProcessGroup | None = None) -> None:
        if max_checkpoints < 1:
            raise ValueError(f"max_checkpoints must be >= 1, got {max_checkpoints}")
        self.logdir = Path(logdir)
        self.max_checkpoints = int(max_checkpoints)
        self.group = group
        self.rank, self.world_size = _rank_world(group)
        if self.rank == 0:
            self.logdir.mkdir(parents=True, exist_ok=True)
            self._remove_partials()

    # ------------------------------------------------------------------ discovery
    def path_for(self, step: int) -> Path:
        return self.logdir / f"checkpoint_{step:06d}"

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints (folders with a manifest), oldest first."""
        if not self.logdir.is_dir():
            return []
        found = []
        for p in self.logdir.iterdir():
            m = _COMPLETE.match(p.name)
            if m and p.is_dir() and (p / MANIFEST).is_file():
                found.append((int(m.group(1)), p))
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        done = self.checkpoints()
        return done[-1] if done else None

    def _remove_partials(self) -> None:
        for p in sorted(self.logdir.glob(f"checkpoint_*{_PARTIAL_SUFFIX}")):
            if p.is_dir():
                log.warning("removing incomplete checkpoint %s (a save was interrupted before it finished)", p)
                shutil.rmtree(p)

    # ------------------------------------------------------------------ save
    def save(
        self,
        step: int,
        state: dict[str, Any],
        per_rank: dict[str, Any] | None = None,
        export: Callable[[Path], None] | None = None,
    ) -> Path:
        """Write checkpoint `step` (collective). `state` goes through DCP (sharded), `per_rank` into this
        rank's `rank_XXXXX.pt`; `export(folder)` runs on all ranks to add files. Returns the final folder."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        t0 = time.perf_counter()
        final = self.path_for(step)
        partial = final.with_name(final.name + _PARTIAL_SUFFIX)

        def prepare() -> None:
            if per_rank is not None:
                _check_per_rank(per_rank, "per_rank")
            if self.rank == 0:
                if partial.exists():
                    shutil.rmtree(partial)
                partial.mkdir(parents=True)

        _step_collectively("preparing the folder", partial, self.group, prepare)
        _step_collectively(
            "writing the sharded state (DCP)", partial, self.group,
            lambda: _quiet_no_dist(lambda: dcp.save(state, checkpoint_id=partial, process_group=self.group, no_dist=not _dist_on())),
        )

        def write_rank_file() -> None:
            if per_rank is None:
                return
            with open(partial / rank_file_name(self.rank), "wb") as f:
                torch.save(per_rank, f)
                f.flush()
                os.fsync(f.fileno())

        _step_collectively("writing the per-rank state", partial, self.group, write_rank_file)
        if export is not None:
            _step_collectively("the export callback", partial, self.group, lambda: export(partial))
        _step_collectively("finishing (manifest, rename, pruning)", partial, self.group,
                           lambda: self._finish(step, partial, final, per_rank is not None) if self.rank == 0 else None)
        if self.rank == 0:
            log.info("saved checkpoint %s (%.1f s)", final, time.perf_counter() - t0)
        return final

    def _finish(self, step: int, partial: Path, final: Path, has_per_rank: bool) -> None:
        files = _list_files(partial)
        for name in files:
            _fsync_file(partial / name)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "step": step,
            "world_size": self.world_size,
            "per_rank": has_per_rank,
            "files": files,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "unix_time": time.time(),
            "host": socket.gethostname(),
            "longlive_version": __version__,
            "torch_version": torch.__version__,
        }
        tmp = partial / (MANIFEST + ".tmp")
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, partial / MANIFEST)
        _fsync_dir(partial)
        replaced = None
        if final.exists():  # the same step saved again (e.g. after a resume): swap, then delete the old one
            replaced = final.with_name(final.name + ".replaced" + _PARTIAL_SUFFIX)
            if replaced.exists():
                shutil.rmtree(replaced)
            log.warning("checkpoint %s exists already; replacing it", final)
            os.replace(final, replaced)
        os.replace(partial, final)
        _fsync_dir(self.logdir)
        if replaced is not None:
            shutil.rmtree(replaced)
        self._prune()

    def _prune(self) -> None:
        done = self.checkpoints()
        for old in done[: max(0, len(done) - self.max_checkpoints)]:
            # Rename first, so a crash during deletion never leaves a complete-looking half folder.
            doomed = old.with_name(old.name + ".pruned" + _PARTIAL_SUFFIX)
            os.replace(old, doomed)
            shutil.rmtree(doomed)
            log.info("removed old checkpoint %s (keeping the newest %d)", old, self.max_checkpoints)

    # ------------------------------------------------------------------ load
    def load(self, path: str | os.PathLike, state: dict[str, Any], *, per_rank_keys: Iterable[str] = ()) -> dict[str, Any]:
        """Load checkpoint `path` into `state` in place (collective) and return this rank's per-rank dict.

        `per_rank_keys` names per-rank entries the caller needs; then the checkpoint must come from the
        same world size. Without them, per-rank state from another world size is dropped with a warning.
        """
        path = Path(path)
        required = list(per_rank_keys)

        def check_and_read() -> dict[str, Any]:
            manifest = read_manifest(path)
            missing = [name for name, size in manifest["files"].items()
                       if not (path / name).is_file() or (path / name).stat().st_size != size]
            if missing:
                raise CheckpointError(f"{path}: files listed in {MANIFEST} are missing or have another size: {missing[:8]}")
            saved_world = int(manifest["world_size"])
            if saved_world != self.world_size:
                if required:
                    raise CheckpointError(
                        f"{path}: written by {saved_world} ranks but this run has {self.world_size}; its per-rank "
                        f"state ({', '.join(required)}) cannot be mapped to other ranks. Resume with {saved_world} "
                        "ranks, or load without per_rank_keys to restart that state fresh"
                    )
                if self.rank == 0 and manifest.get("per_rank"):
                    log.warning("%s: written by %d ranks, this run has %d: per-rank state (RNG, data position, "
                                "buffers) is not restored", path, saved_world, self.world_size)
                return {}
            rank_file = path / rank_file_name(self.rank)
            if not rank_file.is_file():
                if required:
                    raise CheckpointError(f"{path}: no per-rank file {rank_file.name}, but {required} are required")
                return {}
            try:
                obj = torch.load(rank_file, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise CheckpointError(f"{rank_file}: cannot be read with torch.load(weights_only=True): {exc}") from exc
            if not isinstance(obj, dict):
                raise CheckpointError(f"{rank_file}: expected a dict, got {type(obj).__name__}")
            absent = [k for k in required if k not in obj]
            if absent:
                raise CheckpointError(f"{rank_file}: required per-rank entries {absent} are missing (present: {sorted(obj)})")
            return obj

        per_rank = _step_collectively("checking the checkpoint", path, self.group, check_and_read)
        _quiet_no_dist(lambda: dcp.load(state, checkpoint_id=path, process_group=self.group, no_dist=not _dist_on()))
        if self.rank == 0:
            log.info("loaded checkpoint %s", path)
        return per_rank


# ---------------------------------------------------------------------------------------- stateful
class ModelOptimizerState(Stateful):
    """Model (+ optimizer) as one DCP Stateful; works for FSDP2-sharded and plain modules alike."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 *, options: StateDictOptions | None = None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.options = options

    def state_dict(self) -> dict[str, Any]:
        if self.optimizer is None:
            return {"model": get_model_state_dict(self.model, options=self.options)}
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self.options)
        return {"model": model_sd, "optimizer": optim_sd}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.optimizer is None:
            set_model_state_dict(self.model, state_dict["model"], options=self.options)
        else:
            set_state_dict(self.model, self.optimizer, model_state_dict=state_dict["model"],
                           optim_state_dict=state_dict["optimizer"], options=self.options)


# ---------------------------------------------------------------------------------------- export
def export_full_state(
    named_tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    metadata: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    group: dist.ProcessGroup | None = None,
) -> Path:
    """Gather (DTensor) weights one at a time and write them from rank 0 as a generator safetensors
    file readable by `longlive.models.wan.state_dict.load_weights` (collective; other ranks write nothing).
    `dtype` casts floating-point tensors (e.g. bf16 for a smaller file)."""
    from torch.distributed.tensor import DTensor

    from ..models.wan.state_dict import save_generator

    path = Path(path)
    rank, _ = _rank_world(group)
    full: dict[str, torch.Tensor] = {}
    for name, tensor in named_tensors.items():  # same order on every rank: full_tensor() is collective
        t = tensor.detach()
        if isinstance(t, DTensor):
            t = t.full_tensor()
        elif rank != 0:
            continue
        if rank == 0:
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            full[name] = t.cpu()  # right away: at most one gathered tensor stays on the device
        del t
    _step_collectively("exporting the full state", path, group,
                       lambda: save_generator(full, path, metadata=metadata) if rank == 0 else None)
    if rank == 0:
        log.info("exported %d tensors to %s", len(full), path)
    return path
