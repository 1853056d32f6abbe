"""The quality table: generate the evaluation prompts with several model variants and judge them.

A spec (YAML) names a base inference config, the evaluation data and the variants:

    config: configs/demo.yaml          # base inference config (model, VAE, cache settings)
    dataset:                           # `write_procedural_dataset` arguments of the evaluation data
      seed: 7
      frames: 97                       # the training shot length (motion speed)
      long_eval_prompts: 4
      long_eval_chunks: 30             # 10x the 3-chunk training clips
      max_shot_chunks: 3
    prompts: prompts_long              # which prompt folders of the dataset are generated
    buckets: [0, 3, 6, 12, 18, 24]     # drift buckets (chunk index)
    variants:
      - name: DMD, 4 steps
        overrides: [checkpoints.generator_ckpt=models/synth/dmd4.safetensors, inference.sampling_steps=4]

`run_quality` writes the dataset (once, into `<work>/data`), runs `longlive generate` for every variant
in this process (same code path as the command line) into `<work>/<variant slug>/`, judges each folder with
`judge_folder`, and returns the results; `quality_markdown` makes the table. Variants whose checkpoint is
missing fail with the config error naming the field, before anything is generated.
"""
from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from longlive.eval.synth import judge_folder

log = logging.getLogger(__name__)

_SPEC_KEYS = {"config", "dataset", "prompts", "buckets", "variants", "device"}
_DATASET_DEFAULTS = {"samples": 0, "seed": 7, "frames": 97, "height": 64, "width": 64, "eval_prompts": 0, "eval_chunks": 6,
                     "long_eval_prompts": 4, "long_eval_chunks": 30, "max_shot_chunks": 3}


class QualitySpecError(ValueError):
    """A malformed quality spec; the message names the file and the field."""


def load_spec(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise QualitySpecError(f"{path}: cannot read the quality spec: {exc}") from exc
    if not isinstance(spec, dict):
        raise QualitySpecError(f"{path}: a quality spec is a mapping with keys {sorted(_SPEC_KEYS)}")
    unknown = set(spec) - _SPEC_KEYS
    if unknown:
        raise QualitySpecError(f"{path}: unknown keys {sorted(unknown)}; known: {sorted(_SPEC_KEYS)}")
    if not isinstance(spec.get("config"), str):
        raise QualitySpecError(f"{path}: 'config' (the base inference config) is required")
    dataset = spec.get("dataset") or {}
    bad = set(dataset) - set(_DATASET_DEFAULTS)
    if bad:
        raise QualitySpecError(f"{path}: dataset: unknown keys {sorted(bad)}; known: {sorted(_DATASET_DEFAULTS)}")
    spec["dataset"] = {**_DATASET_DEFAULTS, **dataset}
    spec.setdefault("prompts", "prompts_long")
    if spec["prompts"] not in ("prompts", "prompts_long"):
        raise QualitySpecError(f"{path}: prompts must be 'prompts' or 'prompts_long', got {spec['prompts']!r}")
    variants = spec.get("variants")
    if not isinstance(variants, list) or not variants:
        raise QualitySpecError(f"{path}: 'variants' must be a non-empty list of {{name, overrides}}")
    names = set()
    for i, v in enumerate(variants):
        if not isinstance(v, dict) or not isinstance(v.get("name"), str) or set(v) - {"name", "overrides"}:
            raise QualitySpecError(f"{path}: variants[{i}] must be {{name: str, overrides: [field=value, ...]}}")
        v.setdefault("overrides", [])
        if not all(isinstance(o, str) and "=" in o for o in v["overrides"]):
            raise QualitySpecError(f"{path}: variants[{i}] ({v['name']}): overrides are 'field=value' strings")
        if _slug(v["name"]) in names:
            raise QualitySpecError(f"{path}: variants[{i}]: two variants named like {v['name']!r}")
        names.add(_slug(v["name"]))
    spec["source"] = str(path)
    return spec


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower() or "variant"


def _eval_chunks(spec: Mapping[str, Any]) -> int:
    d = spec["dataset"]
    return int(d["long_eval_chunks"] if spec["prompts"] == "prompts_long" else d.get("eval_chunks", 6))


def variant_overrides(spec: Mapping[str, Any], variant: Mapping[str, Any], data: Path, out: Path) -> list[str]:
    """The `longlive generate` overrides of one variant: the spec's data and output, then the variant's own."""
    from longlive.config import load_config

    base = load_config(spec["config"])
    _, _, c, h, w = base.data.image_or_video_shape
    frames = _eval_chunks(spec) * base.frames_per_chunk
    return [f"data.data_path={data / spec['prompts']}", f"data.image_or_video_shape=[1,{frames},{c},{h},{w}]",
            f"inference.output_folder={out}", "inference.num_samples=1", *variant["overrides"]]


def run_quality(spec: Mapping[str, Any], work: str | Path, *, device: str | None = None) -> list[dict[str, Any]]:
    """Generate and judge every variant (see the module docstring); one result dict per variant."""
    from longlive.cli.main import main as longlive_main
    from longlive.config import load_config
    from longlive.data.procedural import MANIFEST, write_procedural_dataset

    work = Path(work)
    data = work / "data"
    manifest = json.loads((data / MANIFEST).read_text()) if (data / MANIFEST).is_file() else {}
    wanted = dict(spec["dataset"])
    if not wanted["long_eval_prompts"]:  # synth.json records the long-prompt arguments only when there are some
        for k in ("long_eval_prompts", "long_eval_chunks", "max_shot_chunks"):
            wanted.pop(k)
    if any(manifest.get(k) != v for k, v in wanted.items()):
        log.info("writing the evaluation data to %s", data)  # missing, or made with other arguments
        write_procedural_dataset(data, **spec["dataset"])
    plans = []
    for v in spec["variants"]:
        out = work / _slug(v["name"])
        overrides = variant_overrides(spec, v, data, out)
        load_config(spec["config"], overrides)  # every variant's config is checked before any generation
        plans.append((v, out, overrides))
    results = []
    for v, out, overrides in plans:
        start = time.perf_counter()
        args = ["generate", "--config", spec["config"], "--no-progress"]
        if device or spec.get("device"):
            args += ["--device", device or spec["device"]]
        code = longlive_main(args + overrides)
        if code:
            raise RuntimeError(f"{spec.get('source', 'spec')}: variant {v['name']!r}: longlive generate exited with {code}")
        seconds = time.perf_counter() - start
        judged = judge_folder(out, data / spec["prompts"], data, buckets=spec.get("buckets"))
        judged.pop("per_video", None)
        results.append({"name": v["name"], "overrides": v["overrides"], "seconds": seconds, **judged})
        log.info("%s: all-correct %.3f, switch %s (%.0f s)", v["name"], judged["accuracy"]["all_correct"],
                 judged["switch"]["accuracy"], seconds)
    return results


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}"


def quality_markdown(results: Sequence[Mapping[str, Any]], command: str = "") -> str:
    """Two tables: adherence per variant, then all-correct accuracy per chunk bucket (drift)."""
    cols = ("all_correct", "background", "colour", "shape", "motion")
    lines = []
    if command:
        lines += [f"Produced by `{command}`.", ""]
    lines += ["| variant | chunks | all correct | background | colour | shape | motion | shot switch | purity gap | "
              "generation s |", "| --- | " + "--- | " * 9]
    for r in results:
        acc, st = r["accuracy"], r["stats"]["abs_diff"]
        lines.append(f"| {r['name']} | {r['chunks']} | " + " | ".join(_fmt(acc.get(c)) for c in cols)
                     + f" | {_fmt(r['switch']['accuracy'])} | {_fmt(st.get('purity'))} | {r['seconds']:.0f} |")
    buckets = [b["chunk_range"] for b in results[0].get("drift", [])] if results else []
    if buckets:
        heads = [f"chunks {lo}-{'' if hi is None else hi - 1}" for lo, hi in buckets]
        lines += ["", "All-correct accuracy by chunk index (drift):", "",
                  "| variant | " + " | ".join(heads) + " |", "| --- | " + "--- | " * len(heads)]
        for r in results:
            lines.append(f"| {r['name']} | " + " | ".join(_fmt(b["accuracy"]["all_correct"]) for b in r["drift"]) + " |")
    return "\n".join(lines) + "\n"
