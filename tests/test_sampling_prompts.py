"""sd-scripts preview prompt files in all three formats; broken lines are warnings, not errors."""

from __future__ import annotations

import json

import pytest

from anima_core.sampling.prompts import PromptFileError, SamplePrompt, load_prompt_file, parse_prompt_line


def test_line_options_set_every_key():
    line = "1girl, smile --n lowres, bad hands --w 768 --h 1000 --d 42 --s 20 --l 5.5 --fs 2.5"
    prompt, warnings = parse_prompt_line(line)
    assert warnings == []
    assert prompt == SamplePrompt(
        prompt="1girl, smile", negative_prompt="lowres, bad hands", width=768, height=992, seed=42,
        sample_steps=20, scale=5.5, flow_shift=2.5,
    )  # fmt: skip


def test_defaults_and_size_rounding():
    prompt, _ = parse_prompt_line("a cat --w 30 --h 527")
    assert (prompt.width, prompt.height) == (64, 512)
    plain, _ = parse_prompt_line("a cat")
    assert plain == SamplePrompt("a cat", "", 512, 512, None, 30, 7.5, 3.0)
    assert plain.seed_or(100) == 100
    assert parse_prompt_line("x --s 5000")[0].sample_steps == 1000


def test_txt_file_skips_comments_and_reports_broken_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# previews\n\nfirst --d 1\nsecond --w wide --q 3\n  \nthird --l 4\n", encoding="utf-8")
    result = load_prompt_file(path)
    assert [p.prompt for p in result.prompts] == ["first", "second", "third"]
    assert [p.index for p in result.prompts] == [0, 1, 2]
    assert result.prompts[1].width == 512  # the bad value falls back to the default
    assert result.prompts[2].scale == 4.0
    assert len(result.warnings) == 2
    assert all(w.startswith(f"{path}:4:") for w in result.warnings)
    assert "`width`" in result.warnings[0] and "--q 3" in result.warnings[1]


def test_toml_defaults_and_subsets(tmp_path):
    path = tmp_path / "prompts.toml"
    path.write_text(
        """
[prompt]
negative_prompt = "lowres"
width = 640
sample_steps = 12

[[prompt.subset]]
prompt = "a fox"
seed = 3

[[prompt.subset]]
prompt = "a wolf"
width = 1024
scale = "high"

[[prompt.subset]]
seed = 4
""",
        encoding="utf-8",
    )
    result = load_prompt_file(path)
    fox, wolf = result.prompts
    assert (fox.prompt, fox.negative_prompt, fox.width, fox.sample_steps, fox.seed) == ("a fox", "lowres", 640, 12, 3)
    assert (wolf.width, wolf.scale, wolf.index) == (1024, 7.5, 1)
    assert len(result.warnings) == 2
    assert "prompt.subset[1]" in result.warnings[0] and "`scale`" in result.warnings[0]
    assert "prompt.subset[2]" in result.warnings[1] and "no `prompt`" in result.warnings[1]


def test_json_objects_and_lines(tmp_path):
    path = tmp_path / "prompts.json"
    entries = [
        {"prompt": "a boat", "negative_prompt": "blurry", "height": 256, "flow_shift": 1.0, "seed": 8},
        "a train --w 320",
        {"prompt": "a plane", "colour": "red"},
        7,
    ]
    path.write_text(json.dumps(entries), encoding="utf-8")
    result = load_prompt_file(path)
    boat, train, plane = result.prompts
    assert (boat.negative_prompt, boat.height, boat.flow_shift, boat.seed) == ("blurry", 256, 1.0, 8)
    assert (train.prompt, train.width) == ("a train", 320)
    assert plane.prompt == "a plane"
    assert len(result.warnings) == 2
    assert "`colour` ignored" in result.warnings[0] and "item[3]" in result.warnings[1]


def test_unparsable_files_are_warnings(tmp_path):
    toml = tmp_path / "bad.toml"
    toml.write_text("[prompt\n", encoding="utf-8")
    js = tmp_path / "bad.json"
    js.write_text('[{"prompt": "x",}\n]', encoding="utf-8")
    for path in (toml, js):
        result = load_prompt_file(path)
        assert result.prompts == [] and len(result.warnings) == 1 and str(path) in result.warnings[0]


def test_missing_file_and_unknown_format_raise_named_errors(tmp_path):
    with pytest.raises(PromptFileError, match="cannot be read"):
        load_prompt_file(tmp_path / "missing.txt")
    other = tmp_path / "prompts.yaml"
    other.write_text("- a", encoding="utf-8")
    with pytest.raises(PromptFileError, match=r"\.txt, \.toml or \.json"):
        load_prompt_file(other)
