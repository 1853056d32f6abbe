"""LoRA DMD distillation: one shared base vs three separate models (peak memory, seconds per step).

Runs the real DMD trainer step (`DMDTrainer.train_step`: student rollout with the KV cache and
gradient at the exit step, teacher CFG and critic scoring, DMD and critic updates) on the model
preset with random weights, once with the generator and critic as LoRA adapters on one shared base
(teacher = base) and once with three separate models (the reference's layout). The text encoder is
replaced by fixed random embeddings. Steps are timed over one full `dfake_gen_update_ratio` cycle
(1 generator + critic step, then critic-only steps) after a warm-up cycle.

    python benchmarks/train_dmd.py                      # 5B, 4-chunk rollouts, 1 GPU
    python benchmarks/train_dmd.py --preset tiny --latent-hw 4 4 --frames 16   # CPU smoke run
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_ar import RandomTextEmbeddings, commit  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/train_dmd.yaml")
    p.add_argument("--preset", default="Wan2.2-TI2V-5B")
    p.add_argument("--frames", type=int, default=32, help="rollout latent frames (32 = 4 chunks, the shipped config)")
    p.add_argument("--latent-hw", type=int, nargs=2, default=[44, 80])
    p.add_argument("--layouts", nargs="+", default=["shared", "separate"])
    p.add_argument("--out", help="JSON results")
    args = p.parse_args()

    from longlive.config import load_config
    from longlive.parallel.mesh import init_parallel
    from longlive.training.dmd_trainer import DMDTrainer

    prompts = Path(tempfile.mkdtemp()) / "prompts.txt"
    prompts.write_text("".join(f"benchmark prompt number {i}\n" for i in range(16)))
    h, w = args.latent_hw
    overrides = [f"model_kwargs.model_name={args.preset}", "checkpoints.random_weights=true",
                 "checkpoints.generator_ckpt=null", "checkpoints.real_score_ckpt=null", "checkpoints.fake_score_ckpt=null",
                 f"data.data_path={prompts}", "logging.tensorboard=false", "logging.seed=1",
                 f"data.image_or_video_shape=[1,{args.frames},48,{h},{w}]", f"training.num_training_frames={args.frames}",
                 f"training.min_num_training_frames={args.frames}", f"training.slice_last_frames={args.frames}",
                 "infra.sharding_strategy=full"]
    if args.preset == "tiny":
        overrides += ["infra.mixed_precision=false", "adapter.rank=4", "adapter.alpha=4"]
    cfg = load_config(args.config, overrides)
    ctx = init_parallel(1, "full")
    dtype = torch.bfloat16 if cfg.infra.mixed_precision else torch.float32
    ratio = cfg.training.dfake_gen_update_ratio
    results = []
    for layout in args.layouts:
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        from longlive.models.wan import WanConfig

        wc = WanConfig.preset(cfg.model_preset)
        text = RandomTextEmbeddings(wc.text_dim, wc.text_len, ctx.device, dtype)
        trainer = DMDTrainer(cfg, tempfile.mkdtemp(), save=False, ctx=ctx, text_encoder=text,
                             share_base=layout == "shared", auto_resume=False)
        build = time.perf_counter() - t0
        for _ in range(ratio):  # warm-up cycle
            trainer.train_step()
        times, gen_time = [], None
        for i in range(ratio):
            if ctx.device.type == "cuda":
                torch.cuda.synchronize()
            s0 = time.perf_counter()
            s = trainer.train_step()
            if ctx.device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - s0
            times.append(dt)
            if "generator_loss" in s:
                gen_time = dt
        critic_only = [t for t in times if t != gen_time] or times
        row = {"layout": layout, "models": len(trainer.nets.models), "build_s": round(build, 1),
               "seconds_per_step": round(sum(times) / len(times), 3), "generator_step_s": gen_time and round(gen_time, 3),
               "critic_step_s": round(sum(critic_only) / len(critic_only), 3),
               "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if ctx.device.type == "cuda" else None,
               "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if ctx.device.type == "cuda" else None,
               "trainable_params": sum(p.numel() for r in (trainer.nets.generator, trainer.nets.critic) for p in r.parameters())}
        results.append(row)
        print(json.dumps(row), flush=True)
        del trainer, s
        gc.collect()
    info = {"gpu": torch.cuda.get_device_name() if ctx.device.type == "cuda" else "cpu", "torch": torch.__version__,
            "commit": commit(), "preset": args.preset, "rollout_frames": args.frames, "ratio": ratio,
            "command": "python benchmarks/train_dmd.py " + " ".join(a for a in sys.argv[1:] if not a.startswith("--out"))}
    print("| layout | models | s/step (cycle mean) | generator step | critic step | peak allocated | peak reserved |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['layout']} | {r['models']} | {r['seconds_per_step']} | {r['generator_step_s']} | {r['critic_step_s']} | "
              f"{r['peak_allocated_gib']} | {r['peak_reserved_gib']} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"info": info, "results": results}, indent=1))
    ctx.close()


if __name__ == "__main__":
    main()
