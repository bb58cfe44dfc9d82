"""Dataset configs, buckets and caption processing: pure logic, no images."""

import json
from pathlib import Path

import numpy as np
import pytest

from anima_core.data import DataOptions
from anima_core.data.buckets import Bucketer, bucket_resolutions, crop_ltrb
from anima_core.data.captions import CaptionStep, process_caption
from anima_core.data.config import (
    DatasetSpec,
    SubsetSpec,
    load_dataset_config,
    read_config_file,
)
from anima_core.errors import DatasetError

# The first example of sd-scripts docs/config_README-en.md, unchanged.
README_EXAMPLE = r"""
[general]
shuffle_caption = true
caption_extension = '.txt'
keep_tokens = 1

# This is a DreamBooth-style dataset
[[datasets]]
resolution = 512
batch_size = 4
keep_tokens = 2

  [[datasets.subsets]]
  image_dir = 'C:\hoge'
  class_tokens = 'hoge girl'
  # This subset uses keep_tokens = 2 (the value of the parent datasets)

  [[datasets.subsets]]
  image_dir = 'C:\fuga'
  class_tokens = 'fuga boy'
  keep_tokens = 3

  [[datasets.subsets]]
  is_reg = true
  image_dir = 'C:\reg'
  class_tokens = 'human'
  keep_tokens = 1

# This is a fine-tuning dataset
[[datasets]]
resolution = [768, 768]
batch_size = 2

  [[datasets.subsets]]
  image_dir = 'C:\piyo'
  metadata_file = 'C:\piyo\piyo_md.json'
  # This subset uses keep_tokens = 1 (the value of [general])
"""

# The keep_tokens_separator example of the same document, unchanged.
SEPARATOR_EXAMPLE = """
[general]
flip_aug = true
color_aug = false
resolution = [1024, 1024]

[[datasets]]
batch_size = 6
enable_bucket = true
bucket_no_upscale = true
caption_extension = ".txt"
keep_tokens_separator= "|||"
shuffle_caption = true
caption_tag_dropout_rate = 0.1
secondary_separator = ";;;" # subset 側に書くこともできます / can be written in the subset side
enable_wildcard = true # 同上 / same as above

  [[datasets.subsets]]
  image_dir = "/path/to/image_dir"
  num_repeats = 1

  # ||| の前後はカンマは不要です（自動的に追加されます） / No comma is required before and after ||| (it is added automatically)
  caption_prefix = "1girl, hatsune miku, vocaloid |||"

  # ||| の後はシャッフル、drop されず残ります / After |||, it is not shuffled or dropped and remains
  # 単純に文字列として連結されるので、カンマなどは自分で入れる必要があります / It is simply concatenated as a string, so you need to put commas yourself
  caption_suffix = ", anime screencap ||| masterpiece, rating: general"
"""


def _load(tmp_path: Path, text: str, opts: DataOptions | None = None, name: str = "dataset.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return load_dataset_config(read_config_file(path), opts or DataOptions(), tmp_path, str(path))


def test_readme_example_loads_with_sd_scripts_lookup_order(tmp_path):
    db, ft = _load(tmp_path, README_EXAMPLE)
    assert db.is_dreambooth and not ft.is_dreambooth
    assert db.resolution == (512, 512) and db.batch_size == 4
    assert ft.resolution == (768, 768) and ft.batch_size == 2
    hoge, fuga, reg = db.subsets
    assert [hoge.keep_tokens, fuga.keep_tokens, reg.keep_tokens] == [2, 3, 1]
    assert ft.subsets[0].keep_tokens == 1
    assert all(s.shuffle_caption and s.caption_extension == ".txt" for s in db.subsets)
    assert (hoge.class_tokens, hoge.is_reg, reg.is_reg) == ("hoge girl", False, True)
    assert ft.subsets[0].metadata_file is not None


def test_separator_example_loads(tmp_path):
    (ds,) = _load(tmp_path, SEPARATOR_EXAMPLE)
    s = ds.subsets[0]
    assert ds.enable_bucket and ds.bucket_no_upscale and ds.resolution == (1024, 1024) and ds.batch_size == 6
    assert s.flip_aug and s.keep_tokens_separator == "|||" and s.secondary_separator == ";;;" and s.enable_wildcard
    assert s.caption_prefix == "1girl, hatsune miku, vocaloid |||" and s.caption_tag_dropout_rate == 0.1
    assert s.image_dir == Path("/path/to/image_dir")


def test_options_fill_in_below_config_values(tmp_path):
    text = "[general]\nflip_aug = false\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'imgs'\n"
    opts = DataOptions(resolution=(768, 512), flip_aug=True, random_crop=True, train_batch_size=3, dataset_repeats=5)
    (ds,) = _load(tmp_path, text, opts)
    s = ds.subsets[0]
    assert ds.resolution == (768, 512) and ds.batch_size == 3
    assert s.num_repeats == 5 and s.random_crop and not s.flip_aug
    assert s.image_dir == tmp_path / "imgs"


def test_json_config(tmp_path):
    config = {"datasets": [{"resolution": 512, "subsets": [{"image_dir": "a", "num_repeats": 2}]}]}
    (ds,) = _load(tmp_path, json.dumps(config), name="dataset.json")
    assert ds.subsets[0].num_repeats == 2


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "[general]\nshufle_caption = true\n[[datasets]]\nresolution=512\n[[datasets.subsets]]\nimage_dir='a'\n",
            "did you mean 'shuffle_caption'",
        ),
        ("[[datasets]]\nresolution=512\n[[datasets.subsets]]\nimage_dir='a'\nbatch_size=2\n", "unknown key 'batch_size'"),
        (
            "[[datasets]]\nresolution=512\nenable_bucket=true\nbucket_reso_steps=24\n[[datasets.subsets]]\nimage_dir='a'\n",
            "multiple of 16",
        ),
        ("[[datasets]]\nresolution=520\n[[datasets.subsets]]\nimage_dir='a'\n", "multiple of 16"),
        ("[[datasets]]\n[[datasets.subsets]]\nimage_dir='a'\n", "no resolution"),
        (
            "[[datasets]]\nresolution=512\n[[datasets.subsets]]\nimage_dir='a'\n[[datasets.subsets]]\nmetadata_file='m.json'\n",
            "mixed",
        ),
        (
            "[[datasets]]\nresolution=512\n[[datasets.subsets]]\nimage_dir='a'\nflip_aug='yes'\n",
            "'flip_aug' must be true or false",
        ),
        (
            "[[datasets]]\nresolution=512\n[[datasets.subsets]]\nimage_dir='a'\nface_crop_aug_range=[2.0, 3.0]\n",
            "face_crop_aug_range",
        ),
        (
            "[[datasets]]\nresolution=512\n[[datasets.subsets]]\nimage_dir='a'\ncustom_attributes={weight=2}\n",
            "custom_attributes has no reader",
        ),
        (
            "[[datasets]]\nresolution=64\nenable_bucket=true\nmin_bucket_reso=32\n[[datasets.subsets]]\nimage_dir='a'\n",
            "min_bucket_reso 32 rounds down to 0",
        ),
        ("[genral]\n[[datasets]]\nresolution=512\n[[datasets.subsets]]\nimage_dir='a'\n", "did you mean 'general'"),
    ],
)
def test_bad_configs_are_refused_with_the_reason(tmp_path, text, expected):
    with pytest.raises(DatasetError, match=expected):
        _load(tmp_path, text)


def test_toml_syntax_error_names_the_file(tmp_path):
    with pytest.raises(DatasetError, match="dataset.toml cannot be parsed"):
        _load(tmp_path, "[[datasets]\n")


# ---- buckets: values computed by hand from the sd-scripts rules -----------------------------------


def test_bucket_list_for_512_area():
    resos = bucket_resolutions((512, 512), 256, 1024, 64)
    expected = {(256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576), (512, 512)}
    assert set(resos) == expected | {(h, w) for w, h in expected}


def _spec(**kw) -> DatasetSpec:
    return DatasetSpec(is_dreambooth=True, **{"resolution": (512, 512), "enable_bucket": True, **kw})


def test_bucket_selection_and_resize():
    bucketer = Bucketer(_spec())
    p = bucketer.place(1000, 600)
    assert p.bucket == (640, 384) and p.resized == (640, 384)
    p = bucketer.place(300, 1000)  # aspect 0.3: 256x832 (0.3077) beats 256x896 (0.2857)
    assert p.bucket == (256, 832) and p.resized == (256, 853)
    # the image fits 249.6x832 inside the bucket, centred
    assert crop_ltrb((256, 832), (300, 1000)) == (3, 0, 252, 832)


def test_no_upscale_buckets():
    bucketer = Bucketer(_spec(bucket_no_upscale=True))
    assert bucketer.place(300, 200).bucket == (256, 192)
    p = bucketer.place(2000, 1000)  # larger than the 512x512 area: shrunk to 640x320
    assert p.resized == (640, 320) and p.bucket == (640, 320)


def test_fixed_resolution_without_buckets():
    bucketer = Bucketer(_spec(enable_bucket=False, resolution=(512, 768)))
    p = bucketer.place(1024, 1024)
    assert p.bucket == (512, 768) and p.resized == (768, 768)


# ---- captions ----------------------------------------------------------------------------------

AT = CaptionStep(epoch=1, step=0, max_train_steps=100)


def _cap(caption: str, at: CaptionStep = AT, seed: int = 0, **kw) -> str:
    return process_caption(SubsetSpec(image_dir=None, **kw), caption, at, np.random.default_rng(seed))


def test_prefix_suffix_and_first_line():
    assert _cap("a, b", caption_prefix="p", caption_suffix="s") == "p a, b s"
    # as in sd-scripts, the suffix joins the last line and only the first line is used
    assert _cap("a, b\nsecond", caption_prefix="p", caption_suffix="s") == "p a, b"


def test_shuffle_keeps_the_first_tokens():
    tags = ", ".join(f"t{i}" for i in range(10))
    results = {_cap(tags, seed=s, shuffle_caption=True, keep_tokens=2) for s in range(5)}
    assert len(results) > 1
    for r in results:
        parts = r.split(", ")
        assert parts[:2] == ["t0", "t1"] and sorted(parts) == sorted(tags.split(", "))


def test_keep_tokens_separator_example():
    kw = {
        "shuffle_caption": True,
        "keep_tokens_separator": "|||",
        "caption_prefix": "1girl, hatsune miku, vocaloid |||",
        "caption_suffix": ", anime screencap ||| masterpiece, rating: general",
    }
    out = _cap("x, y, z", seed=3, **kw).split(", ")
    assert out[:3] == ["1girl", "hatsune miku", "vocaloid"]
    assert out[-2:] == ["masterpiece", "rating: general"]
    assert sorted(out[3:-2]) == ["anime screencap", "x", "y", "z"]


def test_secondary_separator_keeps_a_group_together():
    out = _cap("a, sky;;;cloud, b", seed=1, shuffle_caption=True, secondary_separator=";;;")
    assert "sky,cloud" in out.split(", ")


def test_wildcards():
    outs = {_cap("{simple|white} background, {{literal}}", seed=s, enable_wildcard=True) for s in range(10)}
    assert outs == {"simple background, {literal}", "white background, {literal}"}
    lines = {_cap("one\ntwo", seed=s, enable_wildcard=True) for s in range(10)}
    assert lines == {"one", "two"}


def test_tag_dropout_keeps_fixed_tokens():
    assert _cap("a, b, c, d", caption_tag_dropout_rate=1.0, keep_tokens=1) == "a"
    outs = {_cap("a, b, c, d", seed=s, caption_tag_dropout_rate=0.5) for s in range(10)}
    assert len(outs) > 1


def test_caption_dropout_rate_and_every_n_epochs():
    assert _cap("a, b", caption_dropout_rate=1.0) == ""
    every2 = {"caption_dropout_every_n_epochs": 2}
    assert _cap("a, b", CaptionStep(2, 0, None), **every2) == ""
    assert _cap("a, b", CaptionStep(3, 0, None), **every2) == "a, b"


def test_token_warmup():
    kw = {"token_warmup_min": 1, "token_warmup_step": 10}
    assert _cap("a, b, c, d", CaptionStep(1, 0, None), **kw) == "a"
    assert _cap("a, b, c, d", CaptionStep(1, 5, None), **kw) == "a, b"  # floor(5 * 3 / 10) + 1
    assert _cap("a, b, c, d", CaptionStep(1, 10, None), **kw) == "a, b, c, d"
    fraction = {"token_warmup_min": 1, "token_warmup_step": 0.1}
    assert _cap("a, b, c, d", CaptionStep(1, 0, 100), **fraction) == "a"


def test_dataset_defaults_are_the_profiles():
    """The profile's [dataset] table, DataOptions and the resolved specs agree on every default (they drifted
    once: max_data_loader_n_workers was 8 in DataOptions and 0 in the profile)."""
    from dataclasses import MISSING, fields

    from anima_core.config.schema import DatasetTable
    from anima_core.data.config import DatasetSpec, SubsetSpec

    table = DatasetTable()
    options = DataOptions()
    shared = [f.name for f in fields(DataOptions) if f.name in DatasetTable.model_fields]
    assert len(shared) > 30 and options.max_data_loader_n_workers == table.max_data_loader_n_workers
    assert all(getattr(options, name) == getattr(table, name) for name in shared)
    renamed = {"batch_size": "train_batch_size", "num_repeats": "dataset_repeats"}
    for spec in (SubsetSpec, DatasetSpec):
        for f in fields(spec):
            name = renamed.get(f.name, f.name)
            if f.default is not MISSING and hasattr(options, name):
                assert f.default == getattr(options, name), (spec.__name__, f.name)
