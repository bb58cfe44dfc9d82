"""Datasets on real (tiny) image files: checks, step counts, caches, batches and resume determinism."""

import io
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from anima_core.data import DataOptions, build_training_data
from anima_core.data.images import BadImage, check_image
from anima_core.errors import DatasetError
from anima_core.models.tokenizer_files import load_qwen_tokenizer



def _image(path: Path, w: int, h: int, seed: int = 0, mode: str = "RGB") -> Path:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (h, w, 4 if mode == "RGBA" else 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)
    return path


def _folder(root: Path, sizes, repeats: int = 1, name: str = "chara", caption=lambda i: f"tag{i}, a, b, c, d") -> Path:
    folder = root / f"{repeats}_{name}"
    for i, (w, h) in enumerate(sizes):
        _image(folder / f"img{i}.png", w, h, seed=i)
        if caption is not None:
            (folder / f"img{i}.txt").write_text(caption(i), encoding="utf-8")
    return folder


def _opts(root: Path, **kw) -> DataOptions:
    base = {
        "train_data_dir": str(root),
        "resolution": 64,
        "enable_bucket": True,
        "min_bucket_reso": 32,
        "max_bucket_reso": 128,
        "bucket_reso_steps": 16,
        "caption_extension": ".txt",
        "max_data_loader_n_workers": 0,
        "seed": 7,
    }
    base.update(kw)
    return DataOptions(**base)


class FakeVAE:
    """Test double for the VAE interface: an 8x average pool, channels repeated to 16."""

    dtype = torch.float32

    def __init__(self, name: str = "vae-a"):
        self.name = name
        self.images_encoded = 0

    def identity(self) -> str:
        return self.name

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        self.images_encoded += pixels.shape[0]
        pooled = F.avg_pool2d(pixels, 8)
        return torch.cat([pooled] * 5 + [pooled[:, :1]], dim=1)


class FakeTextEncoder:
    """Test double for the text encoder interface: states derived from a hash of the caption."""

    def __init__(self, name: str = "te-a"):
        self.name = name
        self.captions_encoded: list[str] = []

    def identity(self) -> str:
        return self.name

    def encode(self, captions, qwen_max_length, t5_max_length):
        self.captions_encoded += captions
        b = len(captions)
        states = torch.stack(
            [torch.full((qwen_max_length, 4), float(int(hashlib.sha1(c.encode()).hexdigest()[:6], 16))) for c in captions]
        )
        mask = torch.ones(b, qwen_max_length, dtype=torch.int64)
        ids = torch.full((b, t5_max_length), 5, dtype=torch.int64)
        return states, mask, ids, torch.ones(b, t5_max_length, dtype=torch.int64)


# ---- step counts -------------------------------------------------------------------------------


def test_kohya_folders_buckets_and_step_counts(tmp_path):
    _folder(tmp_path, [(64, 64), (80, 48), (48, 80), (64, 64), (64, 64)], repeats=3)
    data = build_training_data(_opts(tmp_path, train_batch_size=2), base_dir=tmp_path)
    # 64x64 area with 16-px steps: 64x64, 80x48, 48x80 buckets hold 9, 3, 3 samples -> 5 + 2 + 2 batches
    assert data.num_train_images == 15 and data.num_reg_images == 0
    assert data.num_batches_per_epoch == 9
    report = "\n".join(data.bucket_report())
    assert "bucket 64x64: 9 samples, 5 batch(es)" in report and "bucket 80x48: 3 samples, 2 batch(es)" in report
    meta = data.metadata()
    assert meta["ss_num_train_images"] == "15" and meta["ss_num_batches_per_epoch"] == "9"
    assert json.loads(meta["ss_dataset_dirs"]) == {"3_chara": {"n_repeats": 3, "img_count": 5}}
    assert json.loads(meta["ss_tag_frequency"])["3_chara"]["a"] == 5
    batches = list(data.epoch_batches(0))
    assert len(batches) == 9 and sum(len(b.paths) for b in batches) == 15
    for b in batches:
        assert b.pixels.shape[2:] == (b.bucket[1], b.bucket[0]) and b.pixels.min() >= -1 and b.pixels.max() <= 1


def test_bucket_smaller_than_batch_is_warned(tmp_path):
    _folder(tmp_path, [(64, 64), (64, 64), (80, 48)])
    data = build_training_data(_opts(tmp_path, train_batch_size=2), base_dir=tmp_path)
    assert any("warning: bucket 80x48 has 1 sample(s), fewer than the batch size 2" in line for line in data.bucket_report())


def test_regularisation_images_are_balanced_and_weighted(tmp_path):
    train, reg = tmp_path / "train", tmp_path / "reg"
    _folder(train, [(64, 64)] * 2, repeats=3)
    _folder(reg, [(64, 64)] * 4, repeats=1, name="person", caption=None)
    data = build_training_data(_opts(train, reg_data_dir=str(reg), enable_bucket=False, prior_loss_weight=0.5), base_dir=tmp_path)
    # 6 training samples; 4 reg images repeated to 6 samples (2, 2, 1, 1) -> 12 batches of 1
    assert data.num_train_images == 6 and data.num_reg_images == 4
    assert data.num_batches_per_epoch == 12
    batches = list(data.epoch_batches(0))
    reg_batches = [b for b in batches if "person" in b.paths[0]]
    assert len(reg_batches) == 6 and all(b.loss_weights.tolist() == [0.5] for b in reg_batches)
    assert all(b.captions == ["person"] for b in reg_batches)  # no caption file: the class tokens
    assert json.loads(data.metadata()["ss_reg_dataset_dirs"]) == {"1_person": {"n_repeats": 1, "img_count": 4}}


def test_dataset_config_with_finetuning_metadata(tmp_path):
    images = tmp_path / "ft"
    _image(images / "a.png", 64, 64)
    _image(images / "b.png", 64, 64, seed=1)
    (images / "meta.jsonl").write_text(
        json.dumps({"image_path": "a.png", "caption": "a cat", "tags": "cute"})
        + "\n"
        + json.dumps({"image_path": "b.png", "tags": "dog"})
        + "\n"
    )
    config = tmp_path / "dataset.toml"
    config.write_text(
        "[general]\nresolution = 64\n[[datasets]]\nbatch_size = 2\n[[datasets.subsets]]\nimage_dir = 'ft'\nmetadata_file = 'ft/meta.jsonl'\nnum_repeats = 2\n"
    )
    data = build_training_data(DataOptions(dataset_config=config, max_data_loader_n_workers=0, seed=1), base_dir=tmp_path)
    assert data.num_train_images == 4 and data.num_batches_per_epoch == 2
    captions = sorted(c for b in data.epoch_batches(0) for c in b.captions)
    assert captions == ["a cat,cute", "a cat,cute", "dog", "dog"]
    (entry,) = json.loads(data.metadata()["ss_datasets"])
    assert entry["subsets"][0]["metadata_file"] == "meta.jsonl" and entry["num_train_images"] == 4


def test_validation_split_uses_its_own_seed(tmp_path):
    _folder(tmp_path, [(64, 64)] * 10)
    splits = []
    for seed in (1, 2):
        data = build_training_data(_opts(tmp_path, seed=seed, validation_split=0.2, validation_seed=3), base_dir=tmp_path)
        train = {p for b in data.epoch_batches(0) for p in b.paths}
        val = {p for b in data.validation.epoch_batches(0) for p in b.paths}
        assert len(train) == 8 and len(val) == 2 and not train & val
        assert data.metadata()["ss_num_validation_images"] == "2"
        splits.append(val)
    assert splits[0] == splits[1]


# ---- bad input ---------------------------------------------------------------------------------


def _bad_folder(root: Path) -> Path:
    folder = _folder(root, [(64, 64)])
    (folder / "zero.png").write_bytes(b"")
    good = (folder / "img0.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    Image.new("CMYK", (64, 64)).save(folder / "cmyk.jpg")
    Image.new("I;16", (64, 64)).save(folder / "deep.png")
    palette = Image.new("P", (64, 64))
    palette.info["transparency"] = 0
    palette.save(folder / "palette.png", transparency=0)
    _image(folder / "tiny.png", 16, 16)
    _image(folder / "latin1.png", 64, 64)
    (folder / "latin1.txt").write_bytes("caf\xe9, tag".encode("latin-1"))
    _image(folder / "long.png", 64, 64)
    (folder / "long.txt").write_text(", ".join(f"word{i}" for i in range(40)))
    _image(folder / "nocaption.png", 64, 64)
    return folder


EXPECTED_BAD = {
    "zero.png": "empty file",
    "truncated.png": "cannot be decoded",
    "cmyk.jpg": "CMYK",
    "deep.png": "16-bit",
    "palette.png": "palette image with transparency",
    "tiny.png": "smaller than the smallest bucket",
    "latin1.png": "not UTF-8",
    "long.png": "tokens past the limit of 32",
}


@pytest.fixture(scope="module")
def qwen_tokenizer(tiny_model):
    """The tiny model's Qwen3 tokenizer: the real one where its files exist, else a generated one."""
    return load_qwen_tokenizer(tiny_model.qwen_tokenizer, tiny_model.qwen3)


def test_every_bad_input_is_named_and_skipped(tmp_path, qwen_tokenizer):
    _bad_folder(tmp_path)
    warnings = []
    data = build_training_data(
        _opts(tmp_path, qwen3_max_token_length=32), base_dir=tmp_path, tokenizer=qwen_tokenizer, on_warning=warnings.append
    )
    reasons = {Path(p).name: r for p, r in data.skipped}
    assert set(reasons) == set(EXPECTED_BAD)
    for name, words in EXPECTED_BAD.items():
        assert words in reasons[name], (name, reasons[name])
    assert any("nocaption.png" in w and "no caption file" in w for w in warnings)
    assert any(w.startswith(f"skipped {len(EXPECTED_BAD)} image(s)") for w in warnings)
    used = sorted(Path(p).name for b in data.epoch_batches(0) for p in b.paths)
    assert used == ["img0.png", "nocaption.png"]


def test_error_policy_lists_every_bad_input(tmp_path, qwen_tokenizer):
    _bad_folder(tmp_path)
    with pytest.raises(DatasetError) as info:
        build_training_data(
            _opts(tmp_path, qwen3_max_token_length=32, bad_image_policy="error"), base_dir=tmp_path, tokenizer=qwen_tokenizer
        )
    for name in EXPECTED_BAD:
        assert name in str(info.value)


def test_palette_transparency_is_fine_with_alpha_mask(tmp_path):
    folder = _folder(tmp_path, [])
    folder.mkdir(parents=True, exist_ok=True)
    image = Image.new("P", (64, 64))
    image.putpalette([0, 0, 0, 255, 255, 255] * 128)
    image.paste(1, (0, 0, 32, 64))
    image.save(folder / "p.png", transparency=0)
    data = build_training_data(_opts(tmp_path, alpha_mask=True), base_dir=tmp_path)
    (batch,) = data.epoch_batches(0)
    mask = batch.alpha_masks[0, 0]
    assert batch.alpha_masks.shape == (1, 1, 64, 64)
    assert mask[:, :32].min() == 1 and mask[:, 32:].max() == 0


def test_image_broken_after_start_is_skipped_with_a_warning(tmp_path):
    folder = _folder(tmp_path, [(64, 64)] * 3)
    warnings = []
    data = build_training_data(_opts(tmp_path), base_dir=tmp_path, on_warning=warnings.append)
    (folder / "img1.png").write_bytes(b"garbage")
    paths = [p for b in data.epoch_batches(0) for p in b.paths]
    assert len(paths) == 2 and not any(p.endswith("img1.png") for p in paths)
    assert any("img1.png" in w and "cannot be loaded" in w for w in warnings)


# ---- determinism -------------------------------------------------------------------------------


def _same(a, b) -> bool:
    for x, y in zip(a, b):
        if x.paths != y.paths or x.captions != y.captions or x.bucket != y.bucket:
            return False
        for field in ("pixels", "latents", "alpha_masks"):
            tx, ty = getattr(x, field), getattr(y, field)
            if (tx is None) != (ty is None) or (tx is not None and not torch.equal(tx, ty)):
                return False
    return len(a) == len(b)


RANDOM_OPTIONS = {
    "shuffle_caption": True,
    "flip_aug": True,
    "random_crop": True,
    "color_aug": True,
    "caption_tag_dropout_rate": 0.3,
    "caption_dropout_rate": 0.2,
}


def test_resume_gives_the_same_batches(tmp_path):
    _folder(tmp_path, [(64, 64), (80, 48), (96, 64), (64, 64)], repeats=2)
    data = build_training_data(_opts(tmp_path, train_batch_size=2, **RANDOM_OPTIONS), base_dir=tmp_path)
    full = list(data.epoch_batches(1))
    for k in (1, 3):
        assert _same(list(data.epoch_batches(1, k)), full[k:])
    again = build_training_data(_opts(tmp_path, train_batch_size=2, **RANDOM_OPTIONS), base_dir=tmp_path)
    assert _same(list(again.epoch_batches(1)), full)
    assert not _same(list(data.epoch_batches(2)), full)


def test_loader_workers_give_the_same_batches(tmp_path):
    _folder(tmp_path, [(64, 64), (80, 48), (96, 64)], repeats=2)
    inline = build_training_data(_opts(tmp_path, train_batch_size=2, **RANDOM_OPTIONS), base_dir=tmp_path)
    workers = build_training_data(
        _opts(tmp_path, train_batch_size=2, max_data_loader_n_workers=2, persistent_data_loader_workers=True, **RANDOM_OPTIONS),
        base_dir=tmp_path,
    )
    assert _same(list(workers.epoch_batches(0, 2)), list(inline.epoch_batches(0, 2)))
    assert _same(list(workers.epoch_batches(1)), list(inline.epoch_batches(1)))
    # the batches came from worker processes, and the same workers served both epochs
    assert inline._loader is None
    assert (workers._loader.num_workers, workers._loader.persistent_workers) == (2, True)
    first = workers._loader
    list(workers.epoch_batches(2))
    assert workers._loader is first
    fresh = build_training_data(_opts(tmp_path, train_batch_size=2, max_data_loader_n_workers=1), base_dir=tmp_path)
    list(fresh.epoch_batches(0))
    first = fresh._loader
    list(fresh.epoch_batches(1))
    assert fresh._loader is not first  # without persistent workers each epoch starts its own


def test_caption_extension_and_class_tokens_choose_the_caption(tmp_path):
    """The caption is the file with caption_extension; an image without one is captioned with the class tokens."""
    folder = _folder(tmp_path, [(64, 64), (64, 64)], name="sks girl", caption=None)
    (folder / "img0.cap").write_text("from the cap file", encoding="utf-8")
    (folder / "img0.txt").write_text("from the txt file", encoding="utf-8")
    for extension, first in ((".cap", "from the cap file"), (".txt", "from the txt file")):
        data = build_training_data(_opts(tmp_path, caption_extension=extension, enable_bucket=False), base_dir=tmp_path)
        captions = {Path(p).name: c for b in data.epoch_batches(0) for p, c in zip(b.paths, b.captions)}
        assert captions == {"img0.png": first, "img1.png": "sks girl"}, extension


def test_resize_interpolation_is_the_named_filter(tmp_path):
    """A 64x64 image trained at 32x32 is shrunk with the filter named (PIL's, as sd-scripts uses for these names)."""
    _folder(tmp_path, [(64, 64)])
    image = Image.open(next(tmp_path.rglob("*.png"))).convert("RGB")
    for name, pil_filter in (("nearest", Image.Resampling.NEAREST), ("bicubic", Image.Resampling.BICUBIC), (None, Image.Resampling.BOX)):
        data = build_training_data(_opts(tmp_path, resolution=32, enable_bucket=False, resize_interpolation=name),
                                   base_dir=tmp_path)
        (batch,) = list(data.epoch_batches(0))
        expected = torch.from_numpy(np.array(image.resize((32, 32), pil_filter))).permute(2, 0, 1).float() / 127.5 - 1
        assert torch.equal(batch.pixels[0], expected), name


# ---- caches ------------------------------------------------------------------------------------


def test_cached_latents_match_encoding_the_batch_pixels(tmp_path):
    _folder(tmp_path, [(64, 64), (80, 48)], repeats=2)
    opts = _opts(tmp_path, flip_aug=True)
    plain = build_training_data(opts, base_dir=tmp_path)
    cached = build_training_data(opts, base_dir=tmp_path)
    vae = FakeVAE()
    progress = []
    cached.cache_latents(vae, to_disk=False, batch_size=4, device="cpu", progress=progress.append)
    assert vae.images_encoded == 4  # 2 images, each plain and mirrored
    assert (progress[-1].phase, progress[-1].done, progress[-1].total, progress[-1].finished) == ("latents", 2, 2, True)
    for a, b in zip(plain.epoch_batches(0), cached.epoch_batches(0)):
        assert b.pixels is None and a.paths == b.paths
        assert torch.allclose(FakeVAE().encode(a.pixels), b.latents, atol=1e-6)


def test_latent_disk_cache_is_reused_and_rebuilt_for_the_right_reasons(tmp_path, caplog):
    folder = _folder(tmp_path, [(64, 64), (80, 48)])
    opts = _opts(tmp_path)
    vae = FakeVAE()
    build_training_data(opts, base_dir=tmp_path).cache_latents(vae, to_disk=True, batch_size=2, device="cpu")
    assert vae.images_encoded == 2
    assert (folder / "img0_0064x0064_anima.npz").is_file() and (folder / "img1_0080x0048_anima.npz").is_file()
    with np.load(folder / "img1_0080x0048_anima.npz") as npz:
        assert npz["latents_6x10"].shape == (16, 6, 10) and list(npz["crop_ltrb_6x10"]) == [0, 0, 80, 48]

    again = FakeVAE()
    data = build_training_data(opts, base_dir=tmp_path)
    data.cache_latents(again, to_disk=True, batch_size=2, device="cpu")
    assert again.images_encoded == 0
    assert all(b.latents.shape[1] == 16 for b in data.epoch_batches(0))

    _image(folder / "img0.png", 64, 64, seed=99)  # same size, new content
    changed = FakeVAE()
    with caplog.at_level("INFO"):
        build_training_data(opts, base_dir=tmp_path).cache_latents(changed, to_disk=True, batch_size=2, device="cpu")
    assert changed.images_encoded == 1 and "the image file changed" in caplog.text

    other = FakeVAE("vae-b")
    with caplog.at_level("INFO"):
        build_training_data(opts, base_dir=tmp_path).cache_latents(other, to_disk=True, batch_size=2, device="cpu")
    assert other.images_encoded == 2 and "the VAE changed" in caplog.text


def test_latent_cache_refuses_random_crop(tmp_path):
    _folder(tmp_path, [(64, 64)])
    data = build_training_data(_opts(tmp_path, random_crop=True), base_dir=tmp_path)
    with pytest.raises(DatasetError, match="random_crop"):
        data.cache_latents(FakeVAE(), to_disk=False, batch_size=1, device="cpu")


def test_text_disk_cache_is_reused_and_rebuilt_when_a_caption_changes(tmp_path):
    folder = _folder(tmp_path, [(64, 64), (64, 64)])
    opts = _opts(tmp_path, caption_prefix="pre", qwen3_max_token_length=8, t5_max_token_length=6)
    te = FakeTextEncoder()
    data = build_training_data(opts, base_dir=tmp_path)
    data.cache_text(te, to_disk=True, batch_size=4)
    assert sorted(te.captions_encoded) == ["pre tag0, a, b, c, d", "pre tag1, a, b, c, d"]
    with np.load(folder / "img0_anima_te.npz") as npz:
        assert npz["prompt_embeds"].dtype == np.float32 and npz["prompt_embeds"].shape == (8, 4)
        assert npz["attn_mask"].dtype == np.int64 and npz["t5_input_ids"].dtype == np.int32 and npz["t5_attn_mask"].shape == (6,)
        assert "caption_dropout_rate" in npz.files

    reuse = FakeTextEncoder()
    build_training_data(opts, base_dir=tmp_path).cache_text(reuse, to_disk=True, batch_size=4)
    assert reuse.captions_encoded == []

    (folder / "img1.txt").write_text("new caption")
    changed = FakeTextEncoder()
    data = build_training_data(opts, base_dir=tmp_path)
    data.cache_text(changed, to_disk=True, batch_size=4)
    assert changed.captions_encoded == ["pre new caption"]
    batch_captions = sorted(c for b in data.epoch_batches(0) for c in b.captions)
    assert batch_captions == ["pre new caption", "pre tag0, a, b, c, d"]


def test_caption_dropout_with_cached_text_gives_the_empty_caption_values(tmp_path):
    _folder(tmp_path, [(64, 64)] * 3)
    data = build_training_data(
        _opts(tmp_path, caption_dropout_rate=1.0, qwen3_max_token_length=8, t5_max_token_length=6), base_dir=tmp_path
    )
    data.cache_text(FakeTextEncoder(), to_disk=False, batch_size=2)
    for batch in data.epoch_batches(0):
        states, mask, ids, t5_mask = batch.text
        assert batch.captions == [""]
        assert not states.any() and not mask.any()
        assert ids.tolist() == [[1, 0, 0, 0, 0, 0]] and t5_mask.tolist() == [[1, 0, 0, 0, 0, 0]]


def test_text_cache_refuses_per_sample_caption_options(tmp_path):
    _folder(tmp_path, [(64, 64)])
    data = build_training_data(_opts(tmp_path, shuffle_caption=True, caption_dropout_every_n_epochs=2), base_dir=tmp_path)
    with pytest.raises(DatasetError, match="shuffle_caption, caption_dropout_every_n_epochs"):
        data.cache_text(FakeTextEncoder(), to_disk=False, batch_size=1)


def _full_decode_fails(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except Exception:  # noqa: BLE001 - any failure of the full decode
        return True
    return False


@pytest.mark.parametrize("progressive", [False, True])
def test_the_jpeg_check_refuses_exactly_what_a_full_decode_refuses(tmp_path, progressive):
    """The scan decodes JPEGs at 1/8 scale (every coefficient still read, little of the inverse DCT): cut and
    damaged files must pass or fail it as they pass or fail a full decode, and a whole file gives its real size."""
    rng = np.random.default_rng(5)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (96, 160, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90,
                                                                              progressive=progressive)
    good = buffer.getvalue()
    variants = {"whole": good}
    for fraction in (0.3, 0.6, 0.9, 0.99):
        variants[f"cut at {fraction}"] = good[: int(len(good) * fraction)]
    for start in (0.4, 0.7):
        damaged = bytearray(good)
        at = int(len(good) * start)
        damaged[at : at + 64] = bytes(64)
        variants[f"zeroed at {start}"] = bytes(damaged)
    variants["no end marker"] = good[:-2]
    outcomes = {}
    for name, data in variants.items():
        path = tmp_path / f"{name}.jpg"
        path.write_bytes(data)
        try:
            facts = check_image(path, alpha_mask=False)
            outcomes[name] = False
            assert (facts.width, facts.height) == (160, 96)
        except BadImage:
            outcomes[name] = True
        assert outcomes[name] == _full_decode_fails(data), name
    assert not outcomes["whole"] and outcomes["cut at 0.6"]  # the cases are not all alike
