"""TensorBoard and W&B sinks on a tiny run, read back with each tool's own reader; profile checks for them."""

from __future__ import annotations

import json
import struct
import sys
import time

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from training_helpers import make_run, read_events, tiny_profile_data, write_images
from wandb.proto import wandb_internal_pb2

from anima_core.config import profile_from_dict
from anima_core.errors import ProfileError
from anima_core.plugins import build_plugins

SECRET = "0123456789abcdef-not-a-real-key-0123456789"


def wandb_records(path):
    """The records of a W&B transaction log (.wandb): a 7-byte file header, then LevelDB-style chunks of
    (CRC32, length, type) headers in 32 KiB blocks; each record is a wandb_internal_pb2.Record."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if (kind == 0 and length == 0) or pos + 7 + length > len(data):  # zero fill, or still being written
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def finished_wandb_records(path, wait_s: float = 60.0):
    """The records once W&B's writer (a separate process) has written the run's exit record."""
    deadline = time.monotonic() + wait_s
    while True:
        records = list(wandb_records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_API_KEY", SECRET)


def test_tensorboard_and_wandb_get_every_step_validation_previews_and_config(tmp_path, tiny_model, offline_wandb):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("1girl, tag0 --w 64 --h 64 --s 2 --d 5\n")
    write_images(tmp_path / "data", count=6)
    result = make_run(
        tmp_path, tiny_model, dataset={"validation_split": 0.34},
        training={"max_train_steps": 5},
        sampling={"sample_prompts": str(prompts), "sample_every_n_steps": 4},
        logging={"log_with": ["tensorboard", "wandb"], "validate_every_n_steps": 2, "log_config": True,
                 "log_prefix": "tb-", "wandb_run_name": "tiny wandb run"},
    ).run()
    assert result.status == "finished"
    events = read_events(result.run_dir)
    losses = {e["step"]: e["loss"] for e in events if e["type"] == "step"}
    validation = {e["step"]: e["loss"] for e in events if e["type"] == "validation"}
    assert list(losses) == [1, 2, 3, 4, 5] and list(validation) == [2, 4]
    folder = result.run_dir / "logs" / "tb-run"

    board = EventAccumulator(str(folder / "network_train"), size_guidance={"scalars": 0, "images": 0})
    board.Reload()
    tags = board.Tags()
    scalars = {tag: {e.step: e.value for e in board.Scalars(tag)} for tag in tags["scalars"]}
    assert scalars["loss/current"] == pytest.approx(losses)
    assert scalars["loss/validation"] == pytest.approx(validation)
    assert set(scalars["loss/validation/sigma_0.2"]) == {2, 4}
    for tag in ("loss/average", "grad_norm", "time/s_per_step", "lr/self_attn", "lr/mod"):
        assert sorted(scalars[tag]) == [1, 2, 3, 4, 5], tag
    assert "samples/00" in tags["images"] and [e.step for e in board.Images("samples/00")] == [4, 5]  # and the final render
    [config_text] = board.Tensors("config/text_summary")
    assert b"max_train_steps = 5" in config_text.tensor_proto.string_val[0]

    [log] = folder.glob("wandb/offline-run-*/run-*.wandb")
    history, config = {}, {}
    for record in finished_wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[row["_step"]] = row
        elif kind == "run":
            assert record.run.display_name == "tiny wandb run"
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
    assert {step: row["loss/current"] for step, row in history.items()} == pytest.approx(losses)
    assert {s: row["loss/validation"] for s, row in history.items() if "loss/validation" in row} == pytest.approx(validation)
    assert history[4]["samples/00/_type"] == "image-file" and history[4]["samples/00/caption"] == "1girl, tag0"
    assert config["training"]["max_train_steps"] == 5

    # The API key reaches W&B through its environment only; nothing of the run holds it.
    for path in result.run_dir.rglob("*"):
        try:
            content = path.read_bytes() if path.is_file() else b""
        except FileNotFoundError:  # a temporary file W&B removed after the listing
            continue
        assert SECRET.encode() not in content, path


def _problems(tmp_path, tiny_model, **tables) -> list[str]:
    write_images(tmp_path / "data")
    try:
        profile_from_dict(tiny_profile_data(tmp_path, tiny_model, **tables), plugins=build_plugins(entry_points=False))
    except ProfileError as exc:
        return exc.problems
    return []


def test_a_missing_tracker_package_names_the_extra(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # find_spec answers None: not installed
    problems = _problems(tmp_path, tiny_model, logging={"log_with": ["wandb", "tensorbord"]})
    assert any("pip install 'anima-train[wandb]'" in p for p in problems)
    assert any("'tensorbord' is not an event sink" in p for p in problems)


def test_tracker_config_refuses_credentials_and_unknown_tables(tmp_path, tiny_model):
    config = tmp_path / "trackers.toml"
    config.write_text('[wandb]\nentity = "me"\n[wandb.settings]\napi_key = "x"\n[mlflow]\nuri = "y"\n')
    problems = _problems(tmp_path, tiny_model, logging={"log_with": ["tensorboard", "wandb"], "log_tracker_config": str(config)})
    assert sum("wandb.settings.api_key looks like a credential" in p for p in problems) == 1
    assert sum("unknown table [mlflow]" in p for p in problems) == 1


def test_validation_cadence_without_a_split_is_refused(tmp_path, tiny_model):
    problems = _problems(tmp_path, tiny_model, logging={"validate_every_n_steps": 10})
    assert any("logging.validate_every_n_steps: validation loss needs held-out images" in p for p in problems)


def test_tracker_config_reaches_the_writer(tmp_path, tiny_model):
    config = tmp_path / "trackers.toml"
    config.write_text('[tensorboard]\nfilename_suffix = ".from-config"\n')
    result = make_run(tmp_path, tiny_model, training={"max_train_steps": 1},
                      logging={"log_with": ["tensorboard"], "log_tracker_name": "mine", "logging_dir": str(tmp_path / "tb"),
                               "log_tracker_config": str(config)}).run()
    [events_file] = (tmp_path / "tb" / "run" / "mine").iterdir()
    assert events_file.name.endswith(".from-config")
    assert not (result.run_dir / "logs").exists()
