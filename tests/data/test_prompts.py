"""Prompt inputs: .txt files, multi-shot folders (layouts, durations, splits), I2V layout, malformed input."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from longlive.config import ConfigError, load_config
from longlive.data.prompts import (
    PromptFileError,
    even_split,
    find_sample_folders,
    load_image_prompts,
    load_multishot_sample,
    load_prompts,
    load_prompts_from_config,
    load_text_prompts,
    scene_cut_mask,
)

P = "The scene transitions. "
REPO = Path(__file__).resolve().parents[2]


def _sample(folder: Path, captions: list[str], durations: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, c in enumerate(captions):
        (folder / f"{i}.json").write_text(json.dumps({"caption": c, "title": ""}), encoding="utf-8")
    if durations is not None:
        (folder / "shot_durations.txt").write_text(durations, encoding="utf-8")
    return folder


# ------------------------------------------------------------------------------------------------ txt
def test_text_file_one_sample_per_line(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a cat\n\n  a dog  \n", encoding="utf-8")
    samples = load_prompts(f, 3)
    assert [s.name for s in samples] == ["0", "1"]
    assert samples[0].prompts == ["a cat"] * 3 and samples[1].prompts == ["a dog"] * 3
    assert samples[1].scene_cuts == [False] * 3 and samples[1].source == f"{f}:3"


@pytest.mark.parametrize("text", ["", "\n  \n"])
def test_empty_text_file_is_an_error(tmp_path, text):
    f = tmp_path / "p.txt"
    f.write_text(text, encoding="utf-8")
    with pytest.raises(PromptFileError, match=f"{f}: the prompt file has no non-empty lines"):
        load_text_prompts(f, 2)


def test_text_line_with_prefix_is_an_error(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("ok\nThe scene transitions. bad\n", encoding="utf-8")
    with pytest.raises(PromptFileError, match=f"{f}:2: the prompt starts with the scene-cut prefix"):
        load_prompts(f, 2)


# ------------------------------------------------------------------------------------------------ folders
@pytest.mark.parametrize("with_caption_dir", [False, True])
def test_folder_with_durations(tmp_path, with_caption_dir):
    root = tmp_path / "prompts"
    base = root / "caption" if with_caption_dir else root
    _sample(base / "demo", ["A", "B", "C"], "2,1 2\n")
    samples = load_prompts(root, 5)
    assert len(samples) == 1 and samples[0].name == "demo"
    assert samples[0].prompts == ["A", "A", P + "B", P + "C", "C"]
    assert samples[0].scene_cuts == [False, False, True, True, False]
    assert samples[0].shot_starts == [0, 2, 3]
    assert scene_cut_mask(samples[0].prompts) == samples[0].scene_cuts


def test_chunks_per_shot_and_even_split(tmp_path):
    folder = _sample(tmp_path / "s", ["A", "B"])
    s = load_multishot_sample(folder, 4, chunks_per_shot=2)
    assert s.prompts == ["A", "A", P + "B", "B"] and s.scene_cuts == [False, False, True, False]
    s3 = load_multishot_sample(_sample(tmp_path / "t", ["A", "B", "C"]), 7)
    assert s3.prompts == ["A", "A", "A", P + "B", "B", P + "C", "C"]
    assert s3.scene_cuts == [False, False, False, True, False, True, False]
    assert even_split(3, 7) == [3, 2, 2] and even_split(2, 4) == [2, 2]


def test_durations_file_wins_over_chunks_per_shot(tmp_path):
    folder = _sample(tmp_path / "s", ["A", "B"], "1 3")
    s = load_multishot_sample(folder, 4, chunks_per_shot=2)
    assert s.prompts == ["A", P + "B", "B", "B"]


def test_custom_prefix_and_global_json_skipped(tmp_path):
    folder = _sample(tmp_path / "s", ["A", "B"], "1 1")
    (folder / "global.json").write_text("{not json", encoding="utf-8")
    s = load_multishot_sample(folder, 2, scene_cut_prefix="CUT: ")
    assert s.prompts == ["A", "CUT: B"] and s.scene_cuts == [False, True]


def test_numeric_order_and_natural_sample_order(tmp_path):
    root = tmp_path / "r"
    captions = [f"shot {i}" for i in range(11)]
    _sample(root / "sample_10", captions, " ".join(["1"] * 11))
    _sample(root / "sample_2", ["x"])
    samples = load_prompts(root, 11)
    assert [s.name for s in samples] == ["sample_2", "sample_10"]
    assert samples[1].prompts[10] == P + "shot 10" and samples[1].prompts[2] == P + "shot 2"


def test_single_sample_folder_and_shipped_tiny_example():
    samples = load_prompts(REPO / "examples/prompts/tiny_multishot", 4)
    assert len(samples) == 1 and samples[0].name == "tiny_multishot"
    assert samples[0].scene_cuts == [False, True, False, True]
    assert samples[0].prompts[1].startswith(P) and samples[0].prompts[2] == samples[0].prompts[1][len(P):]


def test_from_config(monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = load_config("configs/tiny.yaml")
    (s,) = load_prompts_from_config(cfg)
    assert s.num_chunks == cfg.num_chunks == 4
    cfg = load_config("configs/inference.yaml")
    (s,) = load_prompts_from_config(cfg)
    assert s.num_chunks == 16 and sum(s.scene_cuts) == 2
    bad = load_config("configs/train_dmd.yaml")
    with pytest.raises(ConfigError, match=r"train_dmd\.yaml: field 'data\.data_path' is still the placeholder"):
        load_prompts_from_config(bad)


def test_config_mismatch_policy_is_used(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    folder = _sample(tmp_path / "s", ["A", "B"], "2 2")
    cfg = load_config("configs/tiny.yaml", [f"data.data_path={folder}", "data.image_or_video_shape=[1, 24, 48, 8, 8]"])
    with pytest.raises(PromptFileError, match="gives 4 chunks but the video has 3"):
        load_prompts_from_config(cfg)
    cfg = load_config("configs/tiny.yaml", [f"data.data_path={folder}", "data.image_or_video_shape=[1, 24, 48, 8, 8]",
                                            "data.prompt_length_mismatch=truncate"])
    assert load_prompts_from_config(cfg)[0].prompts == ["A", "A", P + "B"]


# ------------------------------------------------------------------------------------------------ mismatch policy
def test_duration_sum_mismatch(tmp_path, caplog):
    folder = _sample(tmp_path / "s", ["A", "B"], "2 3")
    dur = folder / "shot_durations.txt"
    with pytest.raises(PromptFileError) as exc:
        load_multishot_sample(folder, 4)
    assert str(dur) in str(exc.value) and "gives 5 chunks but the video has 4" in str(exc.value)
    with pytest.raises(PromptFileError, match="pad_last or fit"):
        load_multishot_sample(folder, 6)
    with pytest.raises(PromptFileError, match="truncate or fit"):
        load_multishot_sample(folder, 4, mismatch="pad_last")
    with caplog.at_level(logging.WARNING, logger="longlive.data.prompts"):
        s = load_multishot_sample(folder, 4, mismatch="truncate")
    assert s.prompts == ["A", "A", P + "B", "B"] and "dropped 1 chunk(s)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="longlive.data.prompts"):
        s = load_multishot_sample(folder, 7, mismatch="pad_last")
    assert s.prompts == ["A", "A", P + "B", "B", "B", "B", "B"]
    assert s.scene_cuts == [False, False, True, False, False, False, False]
    assert "2 chunk(s) added" in caplog.text
    assert load_multishot_sample(folder, 3, mismatch="fit").num_chunks == 3
    assert load_multishot_sample(folder, 8, mismatch="fit").num_chunks == 8


def test_chunks_per_shot_mismatch_and_too_many_shots(tmp_path):
    folder = _sample(tmp_path / "s", ["A", "B", "C"])
    with pytest.raises(PromptFileError, match=r"3 shots x chunks_per_shot=2 gives 6 chunks but the video has 4"):
        load_multishot_sample(folder, 4, chunks_per_shot=2)
    with pytest.raises(PromptFileError, match=f"{folder}: 3 shots cannot be spread over 2 chunks"):
        load_multishot_sample(folder, 2)
    s = load_multishot_sample(folder, 2, mismatch="truncate")
    assert s.prompts == ["A", P + "B"]


# ------------------------------------------------------------------------------------------------ malformed
def test_bad_json_names_file_and_line(tmp_path):
    folder = _sample(tmp_path / "s", ["A", "B"])
    (folder / "1.json").write_text('{\n  "caption": "B",\n}\n', encoding="utf-8")
    with pytest.raises(PromptFileError, match=rf"{folder / '1.json'}:3:1: invalid JSON"):
        load_multishot_sample(folder, 2)


@pytest.mark.parametrize("content, expected", [
    ({"title": "x"}, "missing 'caption' field"),
    ({"caption": "   "}, "'caption' is empty"),
    ({"caption": 3}, "'caption' must be a string"),
    (["caption"], "expected a JSON object"),
    ({"caption": P + "x"}, "starts with the scene-cut prefix"),
])
def test_bad_caption_names_file(tmp_path, content, expected):
    folder = _sample(tmp_path / "s", ["A", "B"])
    (folder / "1.json").write_text(json.dumps(content), encoding="utf-8")
    with pytest.raises(PromptFileError) as exc:
        load_multishot_sample(folder, 2)
    assert str(folder / "1.json") in str(exc.value) and expected in str(exc.value)


def test_non_consecutive_numbering(tmp_path):
    folder = _sample(tmp_path / "s", ["A"])
    (folder / "2.json").write_text(json.dumps({"caption": "C"}), encoding="utf-8")
    with pytest.raises(PromptFileError, match=rf"{folder}: shot captions must be numbered consecutively.*missing 1\.json"):
        load_multishot_sample(folder, 2)


def test_unexpected_or_duplicate_json_names(tmp_path):
    folder = _sample(tmp_path / "s", ["A"])
    (folder / "notes.json").write_text("{}", encoding="utf-8")
    with pytest.raises(PromptFileError, match=r"notes\.json: unexpected JSON file"):
        load_multishot_sample(folder, 1)
    folder2 = _sample(tmp_path / "t", ["A"])
    (folder2 / "00.json").write_text(json.dumps({"caption": "A"}), encoding="utf-8")
    with pytest.raises(PromptFileError, match="shot number 0 is also used"):
        load_multishot_sample(folder2, 1)


@pytest.mark.parametrize("durations, expected", [
    ("2 x", r"shot_durations\.txt:1: 'x' is not an integer"),
    ("2\n0", r"shot_durations\.txt:2: shot duration 0 must be at least 1"),
    ("1 1 1", r"shot_durations\.txt:1: 3 duration\(s\) for 2 shot caption\(s\)"),
    ("\n", r"shot_durations\.txt: the file is empty"),
])
def test_bad_durations_file(tmp_path, durations, expected):
    folder = _sample(tmp_path / "s", ["A", "B"], durations)
    with pytest.raises(PromptFileError, match=expected):
        load_multishot_sample(folder, 2)


def test_missing_inputs(tmp_path):
    with pytest.raises(PromptFileError, match="not found"):
        load_prompts(tmp_path / "nothing", 2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PromptFileError, match="no sample folders found"):
        find_sample_folders(tmp_path / "empty")
    (tmp_path / "root" / "sample").mkdir(parents=True)
    with pytest.raises(PromptFileError, match=r"sample: no shot captions"):
        load_prompts(tmp_path / "root", 2)
    other = tmp_path / "prompts.csv"
    other.write_text("a\n", encoding="utf-8")
    with pytest.raises(PromptFileError, match=r"must be a \.txt file"):
        load_prompts(other, 2)
    with pytest.raises(ValueError, match="num_chunks"):
        load_prompts(other, 0)


# ------------------------------------------------------------------------------------------------ I2V
def _image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n")
    return path


def test_i2v_images_and_prompts_dirs(tmp_path):
    cat = _image(tmp_path / "images" / "cat.png")
    _image(tmp_path / "images" / "dog.JPG")
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "cat.txt").write_text("a cat sits\n\na cat jumps\na cat sleeps\n", encoding="utf-8")
    (tmp_path / "prompts" / "dog.txt").write_text("a dog runs\n", encoding="utf-8")
    samples = load_image_prompts(tmp_path, 4)
    assert [s.name for s in samples] == ["cat", "dog"]
    assert samples[0].image_path == cat
    assert samples[0].prompts == ["a cat sits", "a cat sits", P + "a cat jumps", P + "a cat sleeps"]
    assert samples[0].scene_cuts == [False, False, True, True]
    assert samples[1].prompts == ["a dog runs"] * 4 and samples[1].scene_cuts == [False] * 4


def test_i2v_flat_layout_and_orphans(tmp_path, caplog):
    _image(tmp_path / "a.webp")
    (tmp_path / "a.txt").write_text("one\ntwo\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("orphan\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="longlive.data.prompts"):
        (s,) = load_image_prompts(tmp_path, 2)
    assert s.prompts == ["one", P + "two"] and "1 prompt file(s) without a matching image" in caplog.text


def test_i2v_errors(tmp_path):
    img = _image(tmp_path / "images" / "cat.png")
    with pytest.raises(PromptFileError, match=rf"{img}: no prompt file .*cat\.txt"):
        load_image_prompts(tmp_path, 2)
    txt = tmp_path / "images" / "cat.txt"
    txt.write_text("\n", encoding="utf-8")
    with pytest.raises(PromptFileError, match=rf"{txt}: the prompt file has no non-empty lines"):
        load_image_prompts(tmp_path, 2)
    txt.write_text("a\nb\nc\n", encoding="utf-8")
    with pytest.raises(PromptFileError, match=rf"{txt}: 3 shots cannot be spread over 2 chunks"):
        load_image_prompts(tmp_path, 2)
    assert load_image_prompts(tmp_path, 2, mismatch="truncate")[0].prompts == ["a", P + "b"]
    _image(tmp_path / "images" / "cat.jpg")
    with pytest.raises(PromptFileError, match="two images share the name 'cat'"):
        load_image_prompts(tmp_path, 2)
    (tmp_path / "none").mkdir()
    with pytest.raises(PromptFileError, match="no images"):
        load_image_prompts(tmp_path / "none", 2)


def test_i2v_from_config(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    _image(tmp_path / "images" / "cat.png")
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "cat.txt").write_text("a cat sits\na cat jumps\n", encoding="utf-8")
    cfg = load_config("configs/inference_i2v.yaml", [f"data.data_path={tmp_path}", "inference.num_output_frames=32"])
    (s,) = load_prompts_from_config(cfg)
    assert s.image_path.name == "cat.png" and s.prompts == ["a cat sits", "a cat sits", P + "a cat jumps", "a cat jumps"]
    (tmp_path / "video").mkdir()
    with pytest.raises(PromptFileError, match="video dataset layout"):
        load_prompts_from_config(cfg)
