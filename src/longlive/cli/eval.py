"""`longlive eval`: judge generated videos of the procedural synth world (`longlive.eval.synth`).

    longlive eval synth --videos DIR --prompts DIR --dataset DIR [--buckets 3 | 0,3,6,12] [--json OUT]
    longlive eval validate --dataset DIR [--json OUT] [--no-mp4]
    longlive eval quality --spec examples/quality/synth.yaml [--work DIR] [--markdown F] [--json F]

synth matches every `NNNN-<sample>-seed<S>.mp4` of --videos (what `longlive generate` writes) to the prompt
folder `<sample>` of --prompts (e.g. `<dataset>/prompts` or `<dataset>/prompts_long`), reads the training timing
from `<dataset>/synth.json`, detects background and objects chunk by chunk and prints per-attribute, all-correct
and shot-switch accuracies overall and per chunk-index bucket (drift), with image-statistics gaps to the
ground-truth renders. --json writes the full result (per video and per chunk). A video without a prompt folder,
or whose frame count is not 29 + 32 x (chunks - 1) for its shot durations, stops the run with an error naming it.

validate runs the detector on the dataset's own ground truth (training MP4s cut into chunk windows, and the
prompt folders rendered, raw and after an H.264 round trip) and prints its accuracies and failures.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _buckets(text: str) -> int | list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--buckets takes a width (3) or edges (0,3,6,12), got {text!r}") from None
    if len(values) == 1:
        if values[0] < 1:
            raise argparse.ArgumentTypeError(f"--buckets width must be >= 1, got {values[0]}")
        return values[0]
    if not values or values[0] != 0 or any(b <= a for a, b in zip(values[:-1], values[1:])):
        raise argparse.ArgumentTypeError(f"--buckets edges must start at 0 and increase, got {text!r}")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = ("synth --videos DIR --prompts DIR --dataset DIR [--buckets W|E0,E1,..] [--json OUT]; "
                "validate --dataset DIR [--json OUT]; quality --spec S [--markdown F]. No --config: the timing comes from the dataset's synth.json.")
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    s = sub.add_parser("synth", help="judge generated videos against their procedural prompt folders",
                       description="Judge `longlive generate` videos of the procedural world chunk by chunk.")
    s.add_argument("--videos", required=True, help="folder of generated NNNN-<sample>-seed<S>.mp4 videos")
    s.add_argument("--prompts", required=True, help="the prompt root the videos were generated from "
                   "(e.g. <dataset>/prompts or <dataset>/prompts_long)")
    s.add_argument("--dataset", required=True, help="the `longlive data synth` folder (synth.json: frames per shot)")
    s.add_argument("--buckets", type=_buckets, default=None,
                   help="drift buckets of chunk indices: a width (default 3) or edges starting at 0, e.g. 0,3,6,12")
    s.add_argument("--json", help="write the full result (summary, drift, per video and per chunk) here")
    v = sub.add_parser("validate", help="run the detector on the dataset's ground truth and report its accuracy",
                       description="Detector accuracy on ground truth: training MP4s and rendered prompt folders.")
    v.add_argument("--dataset", required=True, help="the `longlive data synth` folder")
    v.add_argument("--json", help="write the result here")
    v.add_argument("--no-mp4", action="store_true", help="skip the H.264 round trip of the prompt renders")
    q = sub.add_parser("quality", help="generate the evaluation prompts with every variant of a spec, judge them, "
                                       "write the quality table",
                       description="The quality table (docs/quality.md): see longlive.eval.quality for the spec.")
    q.add_argument("--spec", required=True, help="quality spec YAML (e.g. examples/quality/synth.yaml)")
    q.add_argument("--work", default="outputs/quality", help="evaluation data and generated videos go here")
    q.add_argument("--markdown", help="write the tables here (e.g. docs/quality.md's generated part)")
    q.add_argument("--json", help="write every variant's full summary here")
    q.add_argument("--device", help="generation device (default: cuda if available, else cpu)")


def _write_json(path: str | None, data: Any) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=1), encoding="utf-8")
        print(f"wrote {path}")


def run(args: argparse.Namespace) -> int:
    from ..eval.synth import SynthEvalError, judge_folder, summary_table, validate_detector

    try:
        if args.action == "quality":
            import shlex
            import sys

            from ..eval.quality import QualitySpecError, load_spec, quality_markdown, run_quality

            try:
                spec = load_spec(args.spec)
            except QualitySpecError as exc:
                raise SystemExit(f"longlive eval quality: {exc}") from None
            results = run_quality(spec, args.work, device=args.device)
            table = quality_markdown(results, command="longlive " + shlex.join(["eval", *sys.argv[sys.argv.index("eval") + 1:]])
                                     if "eval" in sys.argv else "")
            print(table)
            if args.markdown:
                Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
                Path(args.markdown).write_text(table, encoding="utf-8")
                print(f"wrote {args.markdown}")
            _write_json(args.json, results)
            return 0
        if args.action == "synth":
            result = judge_folder(args.videos, args.prompts, args.dataset, buckets=args.buckets)
            print(summary_table(result, title=f"{result['videos']} video(s), {result['chunks']} chunk(s), "
                                              f"{result['frames_per_shot']} frames per training shot"))
            _write_json(args.json, result)
            return 0
        if args.action == "validate":
            result = validate_detector(args.dataset, mp4=not args.no_mp4)
            for part, summary in result.items():
                if not isinstance(summary, dict):
                    continue
                if "windows" in summary:  # training windows: a plain summary without drift
                    summary = {**summary, "chunks": summary["windows"], "drift": []}
                print(summary_table(summary, title=f"{part}: {len(summary['failures'])} failure(s)"))
                for line in summary["failures"][:10]:
                    print(f"  {line}")
            _write_json(args.json, result)
            return 0
    except SynthEvalError as exc:
        raise SystemExit(f"longlive eval {args.action}: {exc}") from None
    raise SystemExit(f"unknown eval action {args.action!r}; choose synth, validate or quality")
