"""Caching large datasets: compact exact in-memory caches, the memory plan, parallel = serial, progress, lazy models."""

import pickle
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import pytest
import torch
from test_data_images import FakeTextEncoder, FakeVAE, _folder, _opts
from training_helpers import make_run, read_events

from anima_core.data import build_training_data
from anima_core.data import memory as cache_memory
from anima_core.data.caching import ModelSource
from anima_core.data.compact import OVERHEAD_BYTES
from anima_core.models import load_text_encoder


def _batches_text(data, epoch=0):
    return {tuple(b.paths): b.text for b in data.epoch_batches(epoch)}


def _same_text(a, b) -> bool:
    return a.keys() == b.keys() and all(all(torch.equal(x, y) for x, y in zip(a[k], b[k])) for k in a)


# ---- compact in-memory caches -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compact_text_cache_gives_the_encoders_padded_outputs_exactly(tmp_path, tiny_model, dtype):
    """Trimmed to the real tokens and kept in the encoder's dtype, yet every batch is bit-equal to the padded
    float32 outputs (what the disk cache stores and what training used before)."""
    captions = {0: "1girl", 1: "1girl, long hair, smile, looking at viewer, outdoors", 2: "1girl, smile"}
    _folder(tmp_path, [(64, 64)] * 3, caption=lambda i: captions[i])
    opts = _opts(tmp_path, train_batch_size=3, qwen3_max_token_length=96, t5_max_token_length=20, caption_dropout_rate=0.5)
    te = load_text_encoder(tiny_model.qwen3, tokenizer_path=tiny_model.qwen_tokenizer,
                           t5_tokenizer_path=tiny_model.t5_tokenizer, dtype=dtype)
    memory = build_training_data(opts, base_dir=tmp_path)
    memory.cache_text(te, to_disk=False, batch_size=2)
    disk = build_training_data(opts, base_dir=tmp_path)
    disk.cache_text(te, to_disk=True, batch_size=3)
    assert all(_same_text(_batches_text(memory, e), _batches_text(disk, e)) for e in range(3))  # dropouts too

    stored = list(memory._text.values())
    assert all(c.outputs.states.dtype == dtype for c in stored)
    lengths = sorted(c.outputs.states.shape[0] for c in stored)
    counts = sorted(cache_memory.qwen_token_counter(te.qwen_tokenizer)(list(captions.values())))
    assert lengths == counts and lengths[-1] < 96  # the real tokens are kept, the padding is not
    # The estimate from the tokenizer's counts is what the cache holds.
    width, itemsize = stored[0].outputs.states.shape[1], torch.empty((), dtype=dtype).element_size()
    estimate, exact = cache_memory.text_cache_bytes(
        memory, width=width, itemsize=itemsize, count_tokens=cache_memory.qwen_token_counter(te.qwen_tokenizer)
    )
    held = sum(
        c.outputs.states.numel() * itemsize + c.outputs.mask.numel() + 5 * 20 + OVERHEAD_BYTES for c in stored
    )
    assert exact and estimate == held


def test_in_memory_latents_share_one_buffer_per_bucket_and_match_the_estimate(tmp_path):
    _folder(tmp_path, [(64, 64), (64, 64), (80, 48)], repeats=1)
    data = build_training_data(_opts(tmp_path, flip_aug=True, alpha_mask=True), base_dir=tmp_path)
    plain = build_training_data(_opts(tmp_path, flip_aug=True, alpha_mask=True), base_dir=tmp_path)
    data.cache_latents(FakeVAE(), to_disk=False, batch_size=2, device="cpu", workers=2)
    entries = list(data._latents.values())
    storages = {t.untyped_storage().data_ptr() for lat, flip, _ in entries for t in (lat, flip)}
    assert len(storages) == 2  # one buffer per bucket holds every image and mirror
    held = sum(lat.nbytes + flip.nbytes + alpha.nbytes + OVERHEAD_BYTES for lat, flip, alpha in entries)
    assert cache_memory.latent_cache_bytes(data) == held
    # alpha masks kept as uint8 come back as the float32 values the uncached path computes
    for a, b in zip(plain.epoch_batches(0), data.epoch_batches(0)):
        assert a.paths == b.paths and torch.equal(a.alpha_masks, b.alpha_masks)
        assert torch.allclose(FakeVAE().encode(a.pixels), b.latents, atol=1e-6)


class RecordingVAE(FakeVAE):
    """Keeps every pixel batch it is asked to encode."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def encode(self, pixels):
        self.batches.append(pixels.clone())
        return super().encode(pixels)


def _modes_folder(root):
    """An RGB photo-like image resized on loading, an RGBA one, a palette image with transparency and a grey one."""
    from PIL import Image

    folder = root / "1_modes"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, (80, 96, 4), dtype=np.uint8)
    Image.fromarray(rgba[..., :3]).save(folder / "rgb.png")
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    palette = Image.fromarray(rgba[..., :3]).quantize(16)
    palette.info["transparency"] = 0
    palette.save(folder / "palette.png", transparency=0)
    Image.fromarray(rgba[..., 0], "L").save(folder / "grey.png")
    for name in ("rgb", "rgba", "palette", "grey"):
        (folder / f"{name}.txt").write_text(name)
    return root


@pytest.mark.parametrize("alpha_mask", [False, True])
def test_the_vae_gets_the_pixels_training_would_load_mirrors_included(tmp_path, alpha_mask):
    """Caching hands the batch to the device as bytes and makes floats there, and builds each mirror by
    flipping the decoded image: both must be bit-equal to `load_image` (decode, resize, crop, flip, to floats)
    as the uncached training path runs it, whatever the image's mode."""
    from anima_core.data.images import centre_framing, load_image

    root = _modes_folder(tmp_path)
    data = build_training_data(_opts(root, flip_aug=True, alpha_mask=alpha_mask, train_batch_size=4), base_dir=root)
    vae = RecordingVAE()
    data.cache_latents(vae, to_disk=False, batch_size=4, device="cpu", workers=2)
    entries = data.datasets[0].entries
    expected = []
    for e in entries:
        for flip in (False, True):
            img = load_image(e.path, e.placement, centre_framing(e.placement, flip), interpolation=None, alpha_mask=alpha_mask)
            expected.append(img.pixels)
    got = [p for batch in vae.batches for p in batch]
    assert len(entries) == (4 if alpha_mask else 3)  # a palette with transparency needs alpha_mask
    assert len(got) == len(expected) == 2 * len(entries)
    for n, pixels in enumerate(expected):
        what = ("mirror of " if n % 2 else "") + entries[n // 2].path.name
        assert any(g.shape == pixels.shape and torch.equal(g, pixels) for g in got), f"cached pixels of {what} differ"
    assert all(batch.is_contiguous() for batch in vae.batches)


# ---- the memory plan ----------------------------------------------------------------------------


def test_caches_that_would_not_fit_go_to_disk_and_say_so(tmp_path):
    _folder(tmp_path, [(64, 64)] * 4)
    data = build_training_data(_opts(tmp_path, qwen3_max_token_length=16, t5_max_token_length=16), base_dir=tmp_path)
    per_image = cache_memory.latent_cache_bytes(data) // 4
    text_bound, exact = cache_memory.text_cache_bytes(data, width=32, itemsize=2, count_tokens=None)
    assert not exact and text_bound == 4 * (16 * (32 * 2 + 1) + 16 * 5 + OVERHEAD_BYTES)
    common = dict(latents=True, latents_to_disk=False, text=True, text_to_disk=False, text_width=32, text_itemsize=2)

    roomy = cache_memory.place_caches(data, available=10**9, **common)
    assert not roomy.latents_to_disk and not roomy.text_to_disk and roomy.switched is None
    assert "in-memory cache for 4 images" in roomy.lines[0] and "upper bound" in roomy.lines[0]

    # room for the latents (half the memory may hold caches) but not for the text outputs as well
    tight = cache_memory.place_caches(data, available=2 * (4 * per_image + text_bound // 2), **common)
    assert not tight.latents_to_disk and tight.text_to_disk
    assert tight.switched.startswith("text-encoder outputs would not fit in memory: caching them on disk")

    none = cache_memory.place_caches(data, available=per_image, **common)
    assert none.latents_to_disk and none.text_to_disk and "latents and text-encoder outputs" in none.switched


def test_run_moves_caches_to_disk_when_memory_is_short(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setattr(cache_memory, "available_memory", lambda: 1000)
    result = make_run(tmp_path, tiny_model).run()
    assert result.status == "finished"
    assert sorted(p.name for p in (tmp_path / "data" / "2_tiny").glob("*.npz")) == [
        "img0_0064x0064_anima.npz", "img0_anima_te.npz", "img1_0064x0064_anima.npz", "img1_anima_te.npz"]
    events = read_events(result.run_dir)
    assert any(e["type"] == "log" and e["message"].startswith("in-memory cache for 2 images") for e in events)
    assert any(e["type"] == "warning" and "would not fit in memory" in e["message"] for e in events)


# ---- parallel caching ---------------------------------------------------------------------------


def test_parallel_caching_writes_the_same_files_as_serial(tmp_path):
    sizes = [(64, 64), (80, 48), (96, 64), (64, 64), (48, 80), (64, 96), (64, 64)]
    serial_root, parallel_root = tmp_path / "serial", tmp_path / "parallel"
    _folder(serial_root, sizes)
    shutil.copytree(serial_root, parallel_root)
    for root, workers in ((serial_root, 0), (parallel_root, 4)):
        data = build_training_data(_opts(root, flip_aug=True), base_dir=root)
        data.cache_latents(FakeVAE(), to_disk=True, batch_size=3, device="cpu", workers=workers)
        data.cache_text(FakeTextEncoder(), to_disk=True, batch_size=3, workers=workers)
    serial = sorted(p.relative_to(serial_root) for p in serial_root.rglob("*.npz"))
    assert len(serial) == 2 * len(sizes)
    assert serial == sorted(p.relative_to(parallel_root) for p in parallel_root.rglob("*.npz"))
    for rel in serial:
        with np.load(serial_root / rel) as a, np.load(parallel_root / rel) as b:
            assert a.files == b.files
            for name in a.files:
                assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), (rel, name)
    assert not list(tmp_path.rglob(".anima-tmp-*"))


def test_parallel_in_memory_caching_gives_the_same_batches_as_serial(tmp_path):
    _folder(tmp_path, [(64, 64), (80, 48), (96, 64), (64, 64), (48, 80)], repeats=2)
    opts = _opts(tmp_path, train_batch_size=2, flip_aug=True, qwen3_max_token_length=8, t5_max_token_length=6)
    results = []
    for workers in (0, 3):
        data = build_training_data(opts, base_dir=tmp_path)
        data.cache_latents(FakeVAE(), to_disk=False, batch_size=2, device="cpu", workers=workers)
        data.cache_text(FakeTextEncoder(), to_disk=False, batch_size=2, workers=workers)
        results.append(list(data.epoch_batches(1)))
    serial, parallel = results
    assert len(serial) == len(parallel) > 0
    for a, b in zip(serial, parallel):
        assert a.paths == b.paths and torch.equal(a.latents, b.latents)
        assert all(torch.equal(x, y) for x, y in zip(a.text, b.text))


def test_shares_divide_the_files_between_processes_without_overlap(tmp_path):
    _folder(tmp_path, [(64, 64), (80, 48), (96, 64), (64, 64), (48, 80)])
    opts = _opts(tmp_path)
    encoded = []
    for rank in range(2):
        vae = FakeVAE()
        build_training_data(opts, base_dir=tmp_path).cache_latents(vae, to_disk=True, batch_size=2, device="cpu",
                                                                   share=(rank, 2))
        encoded.append(vae.images_encoded)
    assert encoded == [3, 2]
    again = FakeVAE()
    build_training_data(opts, base_dir=tmp_path).cache_latents(again, to_disk=True, batch_size=2, device="cpu")
    assert again.images_encoded == 0


class _ThreadedGather:
    """What ``Processes.exchange`` does between processes, between threads: every payload, pickled as
    all_gather_object pickles it, handed to everyone in rank order."""

    def __init__(self, world: int):
        self.slots = [None] * world
        self.meet = threading.Barrier(world, timeout=30)

    def exchange(self, rank: int):
        def exchange(payload):
            self.slots[rank] = pickle.dumps(payload)
            self.meet.wait()
            gathered = [pickle.loads(b) for b in self.slots]
            self.meet.wait()
            return gathered
        return exchange


def test_in_memory_caching_divided_between_processes_gives_each_every_entry_bit_for_bit(tmp_path):
    """Each of 2 processes encodes its share; both end with every cached entry exactly as one process caches
    it (the same batches), an image that broke after the scan is skipped by both and reported by both, and
    the progress counts every process's entries."""
    _folder(tmp_path, [(64, 64), (80, 48), (96, 64), (64, 64), (48, 80), (64, 64), (64, 64)], repeats=2)
    opts = _opts(tmp_path, train_batch_size=2, flip_aug=True, alpha_mask=True, qwen3_max_token_length=8,
                 t5_max_token_length=6)
    single, warned = build_training_data(opts, base_dir=tmp_path), []
    divided = [build_training_data(replace(opts, num_processes=2, process_index=rank), base_dir=tmp_path)
               for rank in range(2)]
    (tmp_path / "2_chara" / "img5.png").write_bytes(b"broken after the scan")
    single.on_warning = warned.append
    single.cache_latents(FakeVAE(), to_disk=False, batch_size=1, device="cpu", workers=0)
    single.cache_text(FakeTextEncoder(), to_disk=False, batch_size=1, workers=0)

    gather_latents, gather_text = _ThreadedGather(2), _ThreadedGather(2)

    def process(rank):
        data = divided[rank]
        warnings, seen, vae, encoder = [], [], FakeVAE(), FakeTextEncoder()
        data.on_warning = warnings.append
        data.cache_latents(vae, to_disk=False, batch_size=1, device="cpu", workers=0, share=(rank, 2),
                           exchange=gather_latents.exchange(rank), progress=seen.append)
        data.cache_text(encoder, to_disk=False, batch_size=1, workers=0, share=(rank, 2),
                        exchange=gather_text.exchange(rank), progress=seen.append)
        return data, warnings, seen, vae.images_encoded, len(encoder.captions_encoded)

    with ThreadPoolExecutor(2) as pool:
        processes = list(pool.map(process, range(2)))
    assert [p[3] for p in processes] == [2 * 4, 2 * 2]  # images (and mirrors) 0, 2, 4, 6 and 1, 3 (5 broke)
    assert [p[4] for p in processes] == [4, 3]
    for data, warnings, seen, _, _ in processes:
        assert warnings == warned and len(warned) == 1 and "img5.png" in warned[0]
        assert data._broken == single._broken == {(0, 5)}
        assert data._latents.keys() == single._latents.keys() and data._text.keys() == single._text.keys()
        for key, (lat, flip, alpha) in single._latents.items():
            mine = data._latents[key]
            assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip((lat, flip, alpha), mine)), key
        for key, cached in single._text.items():
            assert all(torch.equal(a, b) and a.dtype == b.dtype
                       for a, b in zip(cached.outputs.expand(), data._text[key].outputs.expand())), key
        ends = [(p.phase, p.done, p.total, p.new, p.new_by_process) for p in seen if p.finished]
        assert ends == [("latents", 7, 7, 7, [4, 3]), ("text", 7, 7, 7, [4, 3])]
        assert seen[-1].fields()["new_by_process"] == [4, 3]
    # one buffer per bucket still holds the bucket's entries, whichever process encoded them
    def buffers(data):
        return len({t.untyped_storage().data_ptr() for lat, flip, _ in data._latents.values() for t in (lat, flip)})

    assert buffers(processes[0][0]) == buffers(processes[1][0]) == buffers(single) == len(single._bucket_samples(0))


def test_in_memory_caching_divided_between_processes_needs_an_exchange(tmp_path):
    _folder(tmp_path, [(64, 64)])
    data = build_training_data(_opts(tmp_path), base_dir=tmp_path)
    with pytest.raises(ValueError, match="needs `exchange`"):
        data.cache_latents(FakeVAE(), to_disk=False, batch_size=1, device="cpu", share=(0, 2))


# ---- progress, lazy models, cheap reuse checks --------------------------------------------------


def test_every_phase_reports_counts_rate_and_eta(tmp_path):
    _folder(tmp_path, [(64, 64), (80, 48), (64, 64)])
    opts = _opts(tmp_path)
    seen = []
    data = build_training_data(opts, base_dir=tmp_path, progress=seen.append)
    data.cache_latents(FakeVAE(), to_disk=True, batch_size=2, device="cpu", progress=seen.append)
    first = [(p.phase, p.done, p.total, p.reused, p.finished) for p in seen]
    assert first == [("scan", 0, 3, 0, False), ("scan", 3, 3, 0, True),
                     ("check latents", 0, 3, 0, False), ("check latents", 3, 3, 0, True),
                     ("latents", 0, 3, 0, False), ("latents", 3, 3, 0, True)]
    assert seen[-1].rate > 0 and seen[-1].eta_s == 0 and seen[-1].new == 3

    seen.clear()
    build_training_data(opts, base_dir=tmp_path).cache_latents(FakeVAE(), to_disk=True, batch_size=2, device="cpu",
                                                               progress=seen.append)
    end = seen[-1]
    assert (end.phase, end.done, end.total, end.reused, end.new) == ("latents", 3, 3, 3, 0)
    assert "3 reused, 0 new" in end.describe() and end.fields()["rate"] >= 0


def test_vae_is_not_loaded_when_every_latent_is_cached(tmp_path):
    _folder(tmp_path, [(64, 64), (80, 48)])
    opts = _opts(tmp_path)
    loads = []

    def source():
        def load():
            loads.append(1)
            return FakeVAE()
        return ModelSource("vae-a", "torch.float32", load)

    build_training_data(opts, base_dir=tmp_path).cache_latents(source(), to_disk=True, batch_size=2, device="cpu")
    assert loads == [1]
    data = build_training_data(opts, base_dir=tmp_path)
    data.cache_latents(source(), to_disk=True, batch_size=2, device="cpu")
    assert loads == [1] and all(b.latents is not None for b in data.epoch_batches(0))


def test_run_with_cached_latents_does_not_load_the_vae(tmp_path, tiny_model, monkeypatch):
    from anima_plugins.anima_loader import AnimaLoader

    loads = []
    real = AnimaLoader.load_vae
    monkeypatch.setattr(AnimaLoader, "load_vae", lambda self, *a, **kw: loads.append(1) or real(self, *a, **kw))
    caching = {"cache_latents_to_disk": True, "cache_text_encoder_outputs_to_disk": True}
    assert make_run(tmp_path / "a", tiny_model, caching=caching).run().status == "finished"
    assert loads == [1]
    shutil.copytree(tmp_path / "a" / "data", tmp_path / "b" / "data")
    result = make_run(tmp_path / "b", tiny_model, caching=caching).run()
    assert result.status == "finished" and loads == [1]
    cache_events = [e for e in read_events(result.run_dir) if e["type"] == "cache"]
    phases = {e["phase"]: e for e in cache_events if e["finished"]}
    assert set(phases) == {"scan", "check latents", "latents", "check text", "text"}  # on disk: no token count
    assert phases["latents"]["reused"] == 2 and phases["latents"]["new"] == 0
    assert all({"done", "total", "rate", "eta_s"} <= set(e) for e in cache_events)


def test_reuse_check_reads_only_the_keys(tmp_path, monkeypatch):
    _folder(tmp_path, [(64, 64), (80, 48)])
    opts = _opts(tmp_path, flip_aug=True, qwen3_max_token_length=8, t5_max_token_length=6)
    data = build_training_data(opts, base_dir=tmp_path)
    data.cache_latents(FakeVAE(), to_disk=True, batch_size=2, device="cpu")
    data.cache_text(FakeTextEncoder(), to_disk=True, batch_size=2)

    import zipfile

    read = []
    real = zipfile.ZipFile.open
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, name, *a, **kw: read.append(str(name)) or real(self, name, *a, **kw))
    vae, te = FakeVAE(), FakeTextEncoder()
    again = build_training_data(opts, base_dir=tmp_path)
    again.cache_latents(vae, to_disk=True, batch_size=2, device="cpu")
    again.cache_text(te, to_disk=True, batch_size=2)
    assert vae.images_encoded == 0 and te.captions_encoded == []
    assert len(read) == 4 and all(name.startswith("anima_key") for name in read)  # the 4 JSON keys, no tensor


def test_validate_and_plan_print_the_cache_memory(tmp_path, tiny_model, capsys):
    import tomli_w

    from anima_core.cli import main
    from training_helpers import tiny_profile_data, write_images

    write_images(tmp_path / "data", count=3)
    path = tmp_path / "profile.toml"
    path.write_text(tomli_w.dumps(tiny_profile_data(tmp_path, tiny_model)))
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr()
    assert "in-memory cache for 3 images: latents" in out.out + out.err
    assert "text-encoder outputs" in out.out + out.err
    assert main(["plan", str(path), "--vram", "24"]) == 0
    assert "in-memory cache for 3 images" in capsys.readouterr().out


def test_monitor_shows_the_data_phase_until_training_starts():
    from anima_tui.run_state import RunState

    state = RunState()
    state.add([{"type": "cache", "phase": "latents", "done": 1200, "total": 20000, "reused": 200, "rate": 85.25,
                "eta_s": 220.4, "finished": False}])
    assert state.cache_progress == "latents 1200/20000 (200 reused) · 85.2/s · ETA 3m40s"
    state.add([{"type": "step", "step": 1, "loss": 0.1}])
    assert state.cache_progress == ""


def test_compaction_keeps_whatever_padding_is_not_plain_zero():
    from anima_core.data.compact import Slabs, compact_text

    states = torch.zeros(10, 4, dtype=torch.bfloat16)
    states[:3] = 1.5
    states[6, 2] = -0.0  # zero in value, not in bits: must come back as -0.0
    mask = torch.tensor([1, 1, 1] + [0] * 7)
    ids = torch.tensor([7, 8, 1] + [3] * 7)  # T5 tail filled with pad id 3
    t5_mask = torch.tensor([1, 1, 1] + [0] * 7)
    compact = compact_text(states, mask, ids, t5_mask, Slabs.of_bytes((4,), torch.bfloat16))
    assert compact.states.shape[0] == 7 and compact.t5_ids.shape[0] == 3 and compact.t5_pad == 3
    expanded = compact.expand()
    for got, want in zip(expanded, (states.float(), mask, ids, t5_mask)):
        assert got.dtype == want.dtype and torch.equal(got.view(torch.int32) if got.is_floating_point() else got,
                                                       want.view(torch.int32) if want.is_floating_point() else want)


def test_skip_cache_check_trusts_existing_files(tmp_path):
    folder = _folder(tmp_path, [(64, 64), (80, 48)])
    opts = _opts(tmp_path, qwen3_max_token_length=8, t5_max_token_length=6)
    data = build_training_data(opts, base_dir=tmp_path)
    data.cache_latents(FakeVAE(), to_disk=True, batch_size=2, device="cpu")
    data.cache_text(FakeTextEncoder(), to_disk=True, batch_size=2)
    (folder / "img0.txt").write_text("a new caption")
    vae, te = FakeVAE("another-vae"), FakeTextEncoder("another-te")
    trusted = build_training_data(opts, base_dir=tmp_path)
    trusted.cache_latents(vae, to_disk=True, batch_size=2, device="cpu", trust_existing=True)
    trusted.cache_text(te, to_disk=True, batch_size=2, trust_existing=True)
    assert vae.images_encoded == 0 and te.captions_encoded == []
    checked = build_training_data(opts, base_dir=tmp_path)
    checked.cache_latents(vae, to_disk=True, batch_size=2, device="cpu")
    checked.cache_text(te, to_disk=True, batch_size=2)
    assert vae.images_encoded == 2 and len(te.captions_encoded) == 2


def test_a_killed_caching_run_leaves_finished_files_and_its_temporaries_are_removed(tmp_path):
    from anima_core.atomic import TEMP_MARK

    folder = _folder(tmp_path, [(64, 64), (80, 48)])
    opts = _opts(tmp_path)
    build_training_data(opts, base_dir=tmp_path).cache_latents(FakeVAE(), to_disk=True, batch_size=1, device="cpu")
    # what a process killed while writing img1's cache leaves: the finished img0 file and a temporary
    (folder / "img1_0080x0048_anima.npz").unlink()
    leftover = folder / f"{TEMP_MARK}999999999.img1_0080x0048_anima.npz.x1"
    leftover.write_bytes(b"torn")
    vae = FakeVAE()
    build_training_data(opts, base_dir=tmp_path).cache_latents(vae, to_disk=True, batch_size=1, device="cpu")
    assert vae.images_encoded == 1 and not leftover.exists()


def test_loader_workers_see_the_compact_in_memory_caches(tmp_path):
    _folder(tmp_path, [(64, 64), (80, 48), (64, 64)], repeats=2)
    batches = []
    for workers in (0, 2):
        opts = _opts(tmp_path, train_batch_size=2, flip_aug=True, alpha_mask=True, caption_dropout_rate=0.5,
                     qwen3_max_token_length=8, t5_max_token_length=6, max_data_loader_n_workers=workers)
        data = build_training_data(opts, base_dir=tmp_path)
        data.cache_latents(FakeVAE(), to_disk=False, batch_size=2, device="cpu")
        data.cache_text(FakeTextEncoder(), to_disk=False, batch_size=2)
        batches.append(list(data.epoch_batches(1)))
    inline, loaded = batches
    assert len(inline) == len(loaded) > 0
    for a, b in zip(inline, loaded):
        assert a.paths == b.paths and a.captions == b.captions
        assert torch.equal(a.latents, b.latents) and torch.equal(a.alpha_masks, b.alpha_masks)
        assert all(torch.equal(x, y) for x, y in zip(a.text, b.text))


def test_a_cache_files_key_reads_back_exactly_whatever_wrote_it(tmp_path):
    """The reuse check reads a cache file's key without numpy's header parser when the key is the one-string
    .npy that we write; the key comes back exactly (captions in any script), a key numpy wrote in another
    layout still reads through numpy, and a file lacking a tensor or holding a broken key counts as not cached."""
    from anima_core.data import cache as caches

    key = {"caption": "1girl, 桜の木の下, café, 🌸 smile", "encoder": "qwen3", "qwen3_max_token_length": 512}
    outputs = (torch.zeros(2, 4), torch.ones(2, dtype=torch.int64), torch.zeros(3, dtype=torch.int64),
               torch.ones(3, dtype=torch.int64))
    ours = tmp_path / "a_anima_te.npz"
    caches.store_text(ours, key, outputs, 0.0)
    assert caches.stored_text_key(ours) == key

    arrays = dict(np.load(ours))
    big_endian = tmp_path / "b_anima_te.npz"
    np.savez(big_endian, **{**arrays, "anima_key": arrays["anima_key"].astype(">U200")})
    assert caches.stored_text_key(big_endian) == key  # not our layout: numpy reads it

    missing = tmp_path / "c_anima_te.npz"
    np.savez(missing, **{k: v for k, v in arrays.items() if k != "prompt_embeds"})
    broken = tmp_path / "d_anima_te.npz"
    np.savez(broken, **{**arrays, "anima_key": np.array('{"caption": ')})
    assert caches.stored_text_key(missing) is None and caches.stored_text_key(broken) is None
    assert caches.stored_text_key(tmp_path / "absent_anima_te.npz") is None
