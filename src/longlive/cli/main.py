"""Entry point of the `longlive` command.

Each subcommand lives in its own module under `longlive.cli` and exposes
`add_arguments(parser)` and `run(args) -> int`. Modules are imported lazily so that
`longlive --help` stays fast and a broken optional dependency only affects its subcommand.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# name -> (module, one-line help). Keep sorted by name.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("longlive.cli.bench", "time generation of a model preset with random weights (steady-state and end-to-end FPS, JSON)"),
    "data": ("longlive.cli.data", "training data tools (encode: videos -> latent files for training)"),
    "decode-latents": ("longlive.cli.decode_latents", "decode saved latents (.pt) to MP4 videos"),
    "eval": ("longlive.cli.eval", "judge generated videos of the procedural synth world (synth) and validate the judge on ground truth (validate)"),
    "export": ("longlive.cli.export", "export checkpoints (merge-lora: fold a LoRA into the generator; nvfp4: compact NVFP4 or TE weights)"),
    "generate": ("longlive.cli.generate", "generate long videos for the prompts of a config"),
    "train": ("longlive.cli.train", "train the chunk-level AR model (teacher forcing; torchrun for several GPUs)"),
    "vae-halo": ("longlive.cli.vae_halo", "print the chunk-halo VAE encoding windows per sequence-parallel rank"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longlive", description="Long video generation with chunk-level AR diffusion.")
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING, ...)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    idx = next((i for i, a in enumerate(argv) if a in SUBCOMMANDS), None)
    if idx is None:  # no subcommand: top-level options, --help, or an unknown command error
        parser.parse_args(argv)
        parser.print_help()
        return 0
    top = parser.parse_args(argv[:idx])
    name = argv[idx]
    module = importlib.import_module(SUBCOMMANDS[name][0])
    sub_parser = argparse.ArgumentParser(prog=f"longlive {name}", description=SUBCOMMANDS[name][1])
    module.add_arguments(sub_parser)
    # overrides (positional) may follow options; argparse cannot intermix around nested sub-commands
    nested = any(isinstance(a, argparse._SubParsersAction) for a in sub_parser._actions)
    parse = sub_parser.parse_args if nested else sub_parser.parse_intermixed_args
    sub_args = parse(argv[idx + 1 :])
    logging.basicConfig(level=getattr(logging, str(top.log_level).upper(), logging.INFO), format="%(levelname)s %(name)s: %(message)s")
    return int(module.run(sub_args) or 0)


def entry() -> None:
    """The `longlive` command: `main`, then exit without tearing the interpreter down after a process group.

    torch keeps a destroyed process group's C++ object (and its gloo worker threads) alive until the
    interpreter finalises; a worker that drops the last reference to a Python-owned tensor of a
    just-finished collective then needs the GIL, finds the interpreter gone and aborts the process
    ("terminate called without an active exception", exit -6) after the work has succeeded. So once a
    process group was started, and only when `main` returned, the output is flushed and the process
    leaves with `os._exit`. Exceptions take the normal path (traceback, non-zero status).
    """
    rc = main()
    mesh = sys.modules.get("longlive.parallel.mesh")  # not imported: no process group was started
    if mesh is not None and mesh.process_group_started():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)


if __name__ == "__main__":
    entry()
