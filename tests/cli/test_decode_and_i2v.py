"""`longlive decode-latents` and image-to-video through `longlive generate` (tiny config, CPU)."""
from pathlib import Path

import torch
from PIL import Image

from longlive.cli.main import main
from longlive.config import load_config
from longlive.io.video import probe_video
from longlive.pipelines.inference import build_vae, load_image

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
SMALL = ["data.image_or_video_shape=[1,16,48,2,2]", "model_kwargs.local_attn_size=16", "inference.sink_size=0"]


def test_saved_latents_decode_to_video(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red ball\n")
    assert main(["generate", "--config", TINY, "--output-folder", str(tmp_path / "lat"), "--no-progress",
                 f"data.data_path={prompts}", "inference.save_latents_only=true", *SMALL]) == 0
    assert main(["decode-latents", "--config", TINY, "--input", str(tmp_path / "lat"), "--output-dir", str(tmp_path / "vid")]) == 0
    videos = list((tmp_path / "vid").glob("*.mp4"))
    assert len(videos) == 1
    info = probe_video(videos[0])
    assert info.num_frames == 1 + 4 * 15 and (info.height, info.width) == (32, 32)


def test_image_to_video_clamps_first_latent_to_the_image(tmp_path):
    root = tmp_path / "i2v"
    (root / "images").mkdir(parents=True)
    (root / "prompts").mkdir()
    rgb = (torch.rand(20, 24, 3) * 255).to(torch.uint8).numpy()
    Image.fromarray(rgb).save(root / "images" / "cat.png")
    (root / "prompts" / "cat.txt").write_text("a cat sits\na cat jumps\n")
    args = ["--no-progress", f"data.data_path={root}", "i2v=true", "inference.independent_first_frame=true", "inference.save_latents_only=true", *SMALL]
    assert main(["generate", "--config", TINY, "--output-folder", str(tmp_path / "out"), *args]) == 0
    lat = torch.load(next((tmp_path / "out").glob("*.pt")), weights_only=True)
    assert lat["prompts"][1].startswith("The scene transitions.")  # second shot starts at chunk 1
    cfg = load_config(TINY, SMALL)
    vae = build_vae(cfg, torch.device("cpu"), torch.float32)
    expected = vae.encode(load_image(root / "images" / "cat.png", 32, 32))
    assert torch.allclose(lat["latents"][:, 0], expected[:, :, 0], atol=1e-6)  # [B, F, C, H, W] layout
