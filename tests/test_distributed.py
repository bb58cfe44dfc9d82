"""Data-parallel training on the CPU with 2 gloo processes, started the ways a user starts them.

Two images with two repeats make one bucket of 4 samples. One process with batch 2 and two processes with
batch 1 each both train global batches of 2, so they must train the same LoRA (up to the order in which the
all-reduce adds gradients), and a stopped 2-process run resumes exactly.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomli_w
import torch
from safetensors.torch import load_file
from training_helpers import make_run, read_events, tiny_profile_data, write_images

from anima_core.runctl import launch_detached, run_info

TWO = {"train_batch_size": 1}
TWO_PROCESSES = {"num_processes": 2, "num_cpu_threads_per_process": 1}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
RUN_TIMEOUT = 300


def write_profile(root, tiny_model, name, **tables):
    tables["dataset"] = {**TWO, **tables.get("dataset", {})}
    data = tiny_profile_data(root, tiny_model, **tables)
    data["training"].update(TWO_PROCESSES)
    data["logging"]["run_name"] = name
    path = root / f"{name}.toml"
    path.write_text(tomli_w.dumps(data))
    return path


def anima_train(*args, check=True):
    done = subprocess.run([sys.executable, "-m", "anima_core.cli", *map(str, args)], env=ENV, capture_output=True,
                          text=True, timeout=RUN_TIMEOUT)
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def one_process_reference(root, tiny_model, steps):
    """1 process × batch 2, in this process."""
    return make_run(root / "ref", tiny_model, training={"max_train_steps": steps}, logging={"run_name": "ref"},
                    saving={"output_dir": str(root / "ref" / "out")}).run()


def assert_close_lora(path, reference, tolerance=1e-5):
    """‖a − b‖ / ‖b‖ over the whole LoRA. (Per tensor, AdamW's division by √v turns rounding-sized gradient
    differences of near-zero gradients into visible ones: up to ~1e-4 of a tensor after a few steps.)"""
    left, right = load_file(path), load_file(reference)
    assert left.keys() == right.keys()
    difference = sum(float((left[k].double() - right[k].double()).pow(2).sum()) for k in left) ** 0.5
    size = sum(float(right[k].double().pow(2).sum()) for k in left) ** 0.5
    assert difference <= tolerance * size, f"relative difference {difference / size:.3g} from the 1-process LoRA"


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def events_of(run_dir):
    path = run_dir / "events.jsonl"
    return read_events(run_dir) if path.exists() else []


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    write_images(root / "data", count=2)
    write_images(root / "ref" / "data", count=2)
    return root


def test_detached_two_process_run_trains_the_one_process_lora(dataset, tiny_model):
    """Launched the way the TUI launches runs, watched through its files to its end."""
    root = dataset
    profile = write_profile(root, tiny_model, "detached", training={"max_train_steps": 4},
                            caching={"cache_latents_to_disk": True})
    launch = launch_detached(profile)
    try:
        wait_for(lambda: run_info(launch.run_dir).status not in ("starting", "running"), RUN_TIMEOUT, "the run's end")
        exit_status = launch.process.wait(timeout=60)
    finally:
        if launch.process.poll() is None:
            launch.process.kill()
    log = (launch.run_dir / "launch.log").read_text()
    info = run_info(launch.run_dir)
    assert info.status == "finished" and info.step == 4, log
    assert exit_status == 0, log
    events = read_events(launch.run_dir)
    start = events[0]
    assert start["type"] == "run_start" and start["num_processes"] == 2 and start["total_steps"] == 4
    assert start["process_group"] == "gloo"
    steps = [e for e in events if e["type"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4]
    assert all(len(e["processes"]) == 2 for e in steps)
    # one process writes: one run_start, one save of each kind, one line per step
    assert sum(e["type"] == "run_start" for e in events) == 1
    assert sum(e["type"] == "run_end" for e in events) == 1
    # the main process encoded its share of the 2 latent caches, then found both on disk
    latents = [(e["new"], e["reused"]) for e in events if e["type"] == "cache" and e["phase"] == "latents" and e["finished"]]
    assert latents == [(1, 1), (0, 2)], latents
    log_lines = [e["message"] for e in events if e["type"] == "log"]
    assert any("batch size 2 (1 per process × 2 processes)" in line for line in log_lines)

    reference = one_process_reference(root, tiny_model, 4)
    assert reference.status == "finished"
    lora = root / "out" / "lora.safetensors"
    assert_close_lora(lora, reference.lora_path)
    metadata = json.loads(json.dumps(__import__("safetensors").safe_open(lora, "pt").metadata()))
    assert metadata["ss_total_batch_size"] == "2" and metadata["ss_num_batches_per_epoch"] == "2"


def test_stop_through_ctl_then_resume_is_exact_and_needs_the_same_process_count(dataset, tiny_model):
    root = dataset
    profile = write_profile(root, tiny_model, "stopped", training={"max_train_steps": 100000},
                            saving={"output_dir": str(root / "out2")})
    run_dir = root / "out2" / "runs" / "stopped"
    process = subprocess.Popen([sys.executable, "-m", "anima_core.cli", "run", str(profile)], env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: any(e["type"] == "step" for e in events_of(run_dir)), RUN_TIMEOUT, "the first step")
        anima_train("ctl", run_dir, "stop")
        output, _ = process.communicate(timeout=RUN_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    events = read_events(run_dir)
    # in-memory caches (the tiny profile's): each process encoded one of the 2 images and captions, and
    # the main process reports both
    finished = [(e["phase"], e["new"], e["total"], e["new_by_process"]) for e in events
                if e["type"] == "cache" and e["phase"] in ("latents", "text") and e["finished"]]
    assert finished == [("latents", 2, 2, [1, 1]), ("text", 2, 2, [1, 1])], finished
    end = events[-1]
    assert end["type"] == "run_end" and end["status"] == "stopped" and "control file" in end["reason"], output
    stopped_at = end["step"]
    state = sorted((run_dir / "state").glob("step-*"))[-1]
    assert json.loads((state / "progress.json").read_text())["num_processes"] == 2

    refused = anima_train("run", profile, "--resume", run_dir, "--set", "training.num_processes=1", "--set", 'logging.run_name="refused"', check=False)
    assert refused.returncode != 0
    assert "2 process(es); this run has 1" in refused.stdout + refused.stderr

    total = stopped_at + 2
    anima_train("run", profile, "--resume", run_dir, "--set", f"training.max_train_steps={total}",
                "--set", 'logging.run_name="resumed"')
    resumed = read_events(root / "out2" / "runs" / "resumed")
    assert resumed[-1]["status"] == "finished" and resumed[-1]["step"] == total
    write_images(root / "long" / "data", count=2)
    reference = make_run(root / "long", tiny_model, training={"max_train_steps": total},
                         saving={"output_dir": str(root / "long" / "out")}).run()
    assert_close_lora(root / "out2" / "lora.safetensors", reference.lora_path)


@pytest.mark.parametrize("how, named", [
    ("raise", ["process 1 of 2 failed", "weighting failed on purpose"]),  # the main process writes the end
    ("exit", ["process 0 exited with 3"]),  # the main process is gone: the launcher writes it
])
def test_a_failing_process_fails_the_run_naming_it(dataset, tiny_model, tmp_path, how, named):
    """A loss weighting that fails on one process at its third step: the run ends as failed, naming the
    process and the cause, and no process waits for the others."""
    profile = write_profile(tmp_path, tiny_model, "failing", training={"max_train_steps": 50,
                                                                       "loss_weighting": "fails_on_purpose"},
                            dataset={"train_data_dir": str(dataset / "data")})
    tests = str(Path(__file__).parent)
    env = {**ENV, "PYTHONPATH": os.pathsep.join(filter(None, [tests, ENV.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "distributed_worker", str(profile), how], env=env,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert done.returncode != 0
    events = read_events(tmp_path / "out" / "runs" / "failing")
    end = events[-1]
    assert end["type"] == "run_end" and end["status"] == "failed", done.stdout + done.stderr
    for text in named:
        assert text in end["reason"], end["reason"]
    assert sum(e["type"] == "run_end" for e in events) == 1
    assert [e["step"] for e in events if e["type"] == "step"] == [1, 2]


def test_an_image_another_process_finds_broken_while_caching_is_reported_by_the_main_process(tmp_path, tiny_model):
    """Process 1 finds img1 broken while caching its share in memory: both processes skip it, the main
    process reports it, and the run trains on img0 alone."""
    write_images(tmp_path / "data", count=2)
    profile = write_profile(tmp_path, tiny_model, "broken", training={"max_train_steps": 1},
                            model={"loader": "breaks_img1"})
    tests = str(Path(__file__).parent)
    env = {**ENV, "PYTHONPATH": os.pathsep.join(filter(None, [tests, ENV.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "distributed_worker", str(profile), "break"], env=env,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT)
    events = read_events(tmp_path / "out" / "runs" / "broken")
    assert done.returncode == 0 and events[-1]["status"] == "finished", done.stdout + done.stderr
    warnings = [e["message"] for e in events if e["type"] == "warning" and "img1.png" in e["message"]]
    assert len(warnings) == 1 and "skipped, cannot be loaded for latent caching" in warnings[0], warnings
    latents = next(e for e in events if e["type"] == "cache" and e["phase"] == "latents" and e["finished"])
    assert latents["new_by_process"] == [1, 1]
    (step,) = [e for e in events if e["type"] == "step"]
    assert step["step"] == 1


def test_a_samples_draws_depend_on_its_place_not_on_its_batch():
    """σ and noise of the sample at place 1 of a step are the same in a batch of two and alone (as process 1's
    slice, or as a second micro-batch of one), and differ at another step or another place."""
    from anima_core.config.schema import TrainingTable
    from anima_core.training.flow import TIMESTEP_SAMPLERS
    from anima_core.training.step import sample_generators

    cfg = TrainingTable()

    def draws(step, places):
        return [(TIMESTEP_SAMPLERS["logit_normal"](1, cfg, g, (8, 8)), torch.randn(16, 8, 8, generator=g))
                for g in sample_generators(7, step, places)]

    together, alone = draws(3, [0, 1])[1], draws(3, [1])[0]
    assert torch.equal(together[0], alone[0]) and torch.equal(together[1], alone[1])
    assert not torch.equal(draws(4, [1])[0][1], alone[1]) and not torch.equal(draws(3, [2])[0][1], alone[1])


def test_validate_refuses_what_several_processes_cannot_do(tmp_path, tiny_model):
    from anima_core.config import profile_from_dict
    from anima_core.errors import ProfileError

    write_images(tmp_path / "data", count=1)
    data = tiny_profile_data(tmp_path, tiny_model, training={"num_processes": 2, "device": "cuda:1"},
                             optimizer={"optimizer_type": "Adafactor", "fused_backward_pass": True})
    with pytest.raises(ProfileError) as refused:
        profile_from_dict(data)
    assert "optimizer.fused_backward_pass: updates each weight inside backward" in str(refused.value)
    assert "training.device: 'cuda:1' names one device" in str(refused.value)
    data["training"].update(num_processes=1)
    profile_from_dict(data)  # one process: both fine


def test_a_trainer_built_in_python_does_not_ignore_num_processes(tmp_path, tiny_model):
    from anima_core.training.distributed import LaunchError

    with pytest.raises(LaunchError, match="not started by a launcher"):
        make_run(tmp_path, tiny_model, training={"num_processes": 2}).run()


def test_prior_preservation_trains_the_one_process_lora_and_reports_its_prior_loss(dataset, tiny_model, tmp_path):
    """Regularisation images trained toward the base model's prediction (training/prior.py): 2 processes × batch 1
    train the LoRA and report the prior losses of 1 process × batch 2, whose batches mix the two kinds."""
    write_images(tmp_path / "reg", count=2, repeats=1)
    prior = {"reg_data_dir": str(tmp_path / "reg"), "reg_prior_preservation": True}
    profile = write_profile(dataset, tiny_model, "prior", dataset=prior, training={"max_train_steps": 4},
                            saving={"output_dir": str(tmp_path / "out")})
    anima_train("run", profile)
    write_images(tmp_path / "ref" / "data", count=2)
    reference = make_run(tmp_path / "ref", tiny_model, dataset=prior, training={"max_train_steps": 4},
                         logging={"run_name": "ref"}, saving={"output_dir": str(tmp_path / "ref" / "out")}).run()
    assert_close_lora(tmp_path / "out" / "lora.safetensors", reference.lora_path)
    two, one = ([e.get("prior_loss") for e in read_events(run) if e["type"] == "step"]
                for run in (tmp_path / "out" / "runs" / "prior", reference.run_dir))
    assert [v is None for v in two] == [v is None for v in one] and any(v for v in one)
    assert two == pytest.approx(one, rel=1e-4, abs=1e-9)
