"""Dataset configs, buckets and caption processing: pure logic, no images."""

import json
import math
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
            "[[datasets]]\nresolution=512\n[[datasets.subsets]]\nimage_dir='a'\ncache_info=true\n",
            "cache_info has no reader",
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


def sd_scripts_make_bucket_resolutions(max_reso, min_size=256, max_size=1024, divisible=64):
    """sd-scripts library/model_util.py make_bucket_resolutions, unchanged but for the names of its imports."""
    max_width, max_height = max_reso
    max_area = max_width * max_height
    resos = set()
    width = int(math.sqrt(max_area) // divisible) * divisible
    resos.add((width, width))
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    resos = list(resos)
    resos.sort()
    return resos


def test_bucket_limits_and_steps_shape_the_buckets():
    """The dataset's min/max bucket side and step give sd-scripts' buckets; a 1000x600 image lands in its nearest."""
    spec = _spec(min_bucket_reso=384, max_bucket_reso=768, bucket_reso_steps=128)
    bucketer = Bucketer(spec)
    assert bucketer.predefined == sd_scripts_make_bucket_resolutions((512, 512), 384, 768, 128)
    assert bucketer.predefined != sd_scripts_make_bucket_resolutions((512, 512))
    assert bucketer.place(1000, 600).bucket == (640, 384)
    assert bucketer.place(600, 1000).bucket == (384, 640)
    narrow = Bucketer(_spec(min_bucket_reso=256, max_bucket_reso=640, bucket_reso_steps=128))
    assert narrow.predefined == sd_scripts_make_bucket_resolutions((512, 512), 256, 640, 128)
    assert (256, 640) in narrow.predefined and (256, 1024) not in narrow.predefined


def test_no_upscale_buckets():
    bucketer = Bucketer(_spec(bucket_no_upscale=True))
    assert bucketer.place(300, 200).bucket == (256, 192)
    p = bucketer.place(2000, 1000)  # larger than the 512x512 area: shrunk to 640x320
    assert p.resized == (640, 320) and p.bucket == (640, 320)


def test_fixed_resolution_without_buckets():
    bucketer = Bucketer(_spec(enable_bucket=False, resolution=(512, 768)))
    p = bucketer.place(1024, 1024)
    assert p.bucket == (512, 768) and p.resized == (768, 768)


def test_no_upscale_places_large_images_as_sd_scripts_rounds_them():
    """bucket_no_upscale shrinks an image above the resolution's area to that area, rounds the width or the height
    to the step (half up), whichever keeps the aspect closer, then crops to the step; an image at the area or below
    is not resized. Values worked by hand from sd-scripts' select_bucket."""
    cases = [  # resolution, step, image -> bucket, resized
        ((512, 512), 64, (882, 2258), (320, 768), (320, 819)),  # rounding the width keeps the aspect closer
        ((512, 512), 64, (397, 1190), (256, 832), (278, 832)),  # rounding the height does
        ((512, 512), 32, (300, 1457), (224, 1088), (224, 1088)),
        ((512, 768), 64, (1000, 1000), (576, 576), (576, 576)),  # the area of a non-square resolution
        ((500, 500), 64, (625, 400), (576, 384), (625, 400)),  # exactly the area: kept as it is, cropped
    ]
    for resolution, step, image, bucket, resized in cases:
        p = Bucketer(_spec(resolution=resolution, bucket_no_upscale=True, bucket_reso_steps=step)).place(*image)
        assert (p.bucket, p.resized) == (bucket, resized), (resolution, step, image)
        assert p.ar_error == pytest.approx(bucket[0] / bucket[1] - image[0] / image[1])


def test_ar_error_is_the_signed_aspect_error_of_the_bucket():
    """ar_error (its mean is the metadata's mean_img_ar_error) is bucket aspect minus image aspect, as sd-scripts."""
    p = Bucketer(_spec()).place(300, 1000)
    assert p.bucket == (256, 832) and p.ar_error == pytest.approx(256 / 832 - 0.3)
    assert Bucketer(_spec()).place(1000, 300).ar_error == pytest.approx(832 / 256 - 1000 / 300)


def test_crop_ltrb_centres_the_fitted_image_with_floored_offsets():
    """crop_ltrb: the image fitted inside the bucket (height fitted when the image is the narrower, else width),
    centred with the offset floored, the far edge truncated after adding the fitted size (sd-scripts' value)."""
    assert crop_ltrb((640, 384), (1000, 300)) == (0, 96, 640, 288)  # wider than the bucket: the width fits
    assert crop_ltrb((640, 384), (300, 1000)) == (262, 0, 377, 384)  # narrower: the height fits
    # fitted width 116.352: the offset is floor(523.648 / 2) = 261, the right edge int(261 + 116.352) = 377
    assert crop_ltrb((640, 384), (303, 1000)) == (261, 0, 377, 384)
    assert crop_ltrb((384, 640), (1000, 303)) == (0, 261, 384, 377)
    # an image less wide than the bucket but wider than square: still the height fits (460.8 wide, offset 89)
    assert crop_ltrb((640, 384), (1200, 1000)) == (89, 0, 549, 384)
    assert crop_ltrb((512, 512), (512, 512)) == (0, 0, 512, 512)


def test_bucket_lists_of_non_square_resolutions_follow_sd_scripts():
    for resolution, lo, hi, step in [((768, 512), 256, 1024, 64), ((832, 1216), 512, 2048, 64), ((640, 448), 320, 960, 32)]:
        assert bucket_resolutions(resolution, lo, hi, step) == sd_scripts_make_bucket_resolutions(resolution, lo, hi, step)


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


def test_caption_separator_splits_the_tags():
    tags = "; ".join(f"t{i}" for i in range(8))
    shuffled = {_cap(tags, seed=s, shuffle_caption=True, keep_tokens=1, caption_separator=";") for s in range(5)}
    assert len(shuffled) > 1
    for caption in shuffled:  # sd-scripts joins the shuffled tags with ", " whatever the separator
        parts = caption.split(", ")
        assert parts[0] == "t0" and sorted(parts) == sorted(tags.split("; "))
    assert _cap(tags, shuffle_caption=True, keep_tokens=1) == tags  # "," finds one tag: nothing to shuffle


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


def test_token_warmup_step_one_is_one_step_and_the_caption_is_whole_from_that_step_on():
    """token_warmup_step: below 1 a fraction of max_train_steps, from 1 on a step count; at step token_warmup_step
    the whole caption is used (49 * (1 / 49) is 0.999... in floating point: the step must not enter the formula)."""
    one = {"token_warmup_min": 1, "token_warmup_step": 1}
    assert _cap("a, b, c, d", CaptionStep(1, 0, 100), **one) == "a"
    assert _cap("a, b, c, d", CaptionStep(1, 1, 100), **one) == "a, b, c, d"
    edge = {"token_warmup_min": 1, "token_warmup_step": 49}
    assert _cap("a, b", CaptionStep(1, 48, None), **edge) == "a"
    assert _cap("a, b", CaptionStep(1, 49, None), **edge) == "a, b"


def test_caption_dropout_every_epoch():
    assert {_cap("a, b", CaptionStep(e, 0, None), caption_dropout_every_n_epochs=1) for e in (1, 2, 3)} == {""}


def test_without_shuffle_warmup_or_tag_dropout_the_caption_is_not_split_and_rejoined():
    assert _cap("a,b;  c ,d") == "a,b;  c ,d"
    assert _cap("a,b;  c ,d", keep_tokens=1, caption_separator=";") == "a,b;  c ,d"


def test_wildcard_picks_whole_lines():
    lines = {_cap("red hair, smile\nblue eyes, night", seed=s, enable_wildcard=True) for s in range(10)}
    assert lines == {"red hair, smile", "blue eyes, night"}


def test_a_third_keep_tokens_separator_stays_in_the_suffix():
    """sd-scripts splits at the first two separators only; a third one is left in the fixed suffix as text."""
    out = _cap("a ||| b, c ||| d ||| e", shuffle_caption=True, keep_tokens_separator="|||")
    assert out.split(", ")[0] == "a" and out.split(", ")[-1] == "d ||| e"
    assert sorted(out.split(", ")[1:3]) == ["b", "c"]


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


# ---- every key reaches the resolved spec -----------------------------------------------------------------

# A value away from the default for every key the dataset config resolves (subset -> dataset -> [general]).
CONFIG_VALUES = {
    "batch_size": 3, "bucket_no_upscale": True, "bucket_reso_steps": 32, "enable_bucket": True, "max_bucket_reso": 1536,
    "min_bucket_reso": 320, "validation_seed": 5, "validation_split": 0.25, "resolution": [512, 768],
    "network_multiplier": 0.5, "resize_interpolation": "nearest", "color_aug": True, "flip_aug": True,
    "num_repeats": 4, "random_crop": True, "shuffle_caption": True, "keep_tokens": 2, "keep_tokens_separator": "|||",
    "secondary_separator": ";;;", "caption_separator": ";", "enable_wildcard": True, "token_warmup_min": 2,
    "token_warmup_step": 10, "caption_prefix": "p", "caption_suffix": "s", "caption_dropout_every_n_epochs": 2,
    "caption_dropout_rate": 0.5, "caption_tag_dropout_rate": 0.25, "caption_extension": ".cap", "class_tokens": "sks",
    "prior_preservation": True,
}
# Refused when set (test_bad_configs_are_refused_with_the_reason), or the subset's own structure (tested with images).
NOT_RESOLVED = {"face_crop_aug_range", "custom_attributes", "cache_info", "image_dir", "is_reg", "metadata_file", "alpha_mask"}


def _resolved(spec: DatasetSpec, key: str):
    subset = spec.subsets[0]
    value = getattr(subset, key) if hasattr(subset, key) else getattr(spec, key)
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize("level", ["subset", "dataset", "general"])
def test_every_dataset_config_key_reaches_the_resolved_spec(tmp_path, level):
    from anima_core.data import config as dataset_config

    allowed = {
        "subset": {**dataset_config.SUBSET_ASCENDABLE_KEYS, **dataset_config.DREAMBOOTH_ASCENDABLE_KEYS},
        "dataset": {**dataset_config.DATASET_KEYS, **dataset_config.SUBSET_ASCENDABLE_KEYS,
                    **dataset_config.DREAMBOOTH_ASCENDABLE_KEYS},
        "general": dataset_config.GENERAL_KEYS,
    }[level]
    every = set(dataset_config.GENERAL_KEYS) | set(dataset_config.DREAMBOOTH_SUBSET_ONLY_KEYS)
    assert every - NOT_RESOLVED == set(CONFIG_VALUES), "give the new key a value in CONFIG_VALUES"
    for key in sorted(set(allowed) - NOT_RESOLVED):
        tables = {"general": {}, "dataset": {} if key == "resolution" else {"resolution": 512},
                  "subset": {"image_dir": "a"}}
        tables[level][key] = CONFIG_VALUES[key]
        config = {"general": tables["general"], "datasets": [{**tables["dataset"], "subsets": [tables["subset"]]}]}
        (spec,) = load_dataset_config(config, DataOptions(), tmp_path, "test")
        assert _resolved(spec, key) == CONFIG_VALUES[key], f"{key} set in the {level} table"


# A value away from the default for every [dataset] key of the profile.
PROFILE_VALUES = {
    **{k: v for k, v in CONFIG_VALUES.items()
       if k not in ("batch_size", "num_repeats", "network_multiplier", "class_tokens", "prior_preservation")},
    "train_data_dir": "train", "reg_data_dir": "reg", "train_batch_size": 3,
    "dataset_repeats": 4, "prior_loss_weight": 0.5, "alpha_mask": True, "max_data_loader_n_workers": 2,
    "persistent_data_loader_workers": True, "bad_image_policy": "error", "reg_prior_preservation": True,
}


def test_every_profile_dataset_key_reaches_the_data_options(tmp_path):
    """profile [dataset] -> DataOptions -> the resolved dataset (where the key is a dataset or subset value)."""
    from anima_core.config.schema import DatasetTable, Profile
    from anima_core.data.config import resolve_datasets
    from anima_core.training.data_phase import data_options

    # dataset_config replaces the folder form: tests/test_data_images.py::test_dataset_config_with_finetuning_metadata
    assert set(PROFILE_VALUES) | {"dataset_config"} == set(DatasetTable.model_fields), "give the new key a value"
    for folder in ("train/2_sks", "reg/1_person"):
        (tmp_path / folder).mkdir(parents=True)
    opts = data_options(Profile(dataset=DatasetTable(**PROFILE_VALUES)))
    spec_names = {"train_batch_size": "batch_size"}
    (spec,) = resolve_datasets(opts, tmp_path)[0]
    for key, value in PROFILE_VALUES.items():
        got = getattr(opts, key)
        assert (list(got) if isinstance(got, tuple) else str(got) if isinstance(got, Path) else got) == value, key
        name = spec_names.get(key, key)
        if key != "dataset_repeats" and (hasattr(spec, name) or hasattr(spec.subsets[0], name)):
            assert _resolved(spec, name) == value, f"{key} does not reach the resolved dataset"
    assert [s.is_reg for s in spec.subsets] == [False, True]
    assert [s.prior_preservation for s in spec.subsets] == [False, True]  # reg_prior_preservation: the reg folder
