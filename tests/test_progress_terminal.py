"""What a person at a real terminal sees: the live bar (through a pseudo-terminal) and the answers to Ctrl+C."""

from __future__ import annotations

import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time

import tomli_w
from training_helpers import tiny_profile_data, write_images

from anima_core.training.control import StopRequests

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")


class Terminal:
    """``anima-train`` on the slave side of a pseudo-terminal 160 columns wide; the test reads the master."""

    def __init__(self, args: list[str], cwd):
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
        env = {**os.environ, "TERM": "xterm-256color", "OMP_NUM_THREADS": "1", "COLUMNS": "160"}
        self.process = subprocess.Popen([sys.executable, "-m", "anima_core.cli", *args], stdin=slave, stdout=slave,
                                        stderr=slave, cwd=cwd, env=env, close_fds=True)
        os.close(slave)
        self.master = master
        self.raw = b""

    @property
    def text(self) -> str:
        return ANSI.sub("", self.raw.decode(errors="replace"))

    def read_until(self, pattern: str, timeout: float = 120) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.text)
            if found:
                return found
            ready, _, _ = select.select([self.master], [], [], 0.2)
            if ready:
                try:
                    self.raw += os.read(self.master, 65536)
                except OSError:  # the child closed the terminal
                    break
        raise AssertionError(f"{pattern!r} never appeared; the terminal showed:\n{self.text[-3000:]}")

    def finish(self, timeout: float = 120) -> int:
        try:
            self.read_until(r"run directory: \S+", timeout)
        finally:
            code = self.process.wait(timeout)
            os.close(self.master)
        return code


def test_live_bar_shows_the_real_total_and_ctrl_c_is_acknowledged_at_once(tmp_path, tiny_model):
    write_images(tmp_path / "data")
    data = tiny_profile_data(tmp_path, tiny_model, training={"max_train_steps": 500},
                             logging={"run_name": "run", "progress": "auto"})
    (tmp_path / "p.toml").write_text(tomli_w.dumps(data))
    terminal = Terminal(["run", "p.toml"], cwd=tmp_path)
    bar = terminal.read_until(r"step\s+([2-9]|\d\d+)/500 .*?epoch (\d+) \| loss [\d.]+ \| avg [\d.]+ \| lr 1\.00e-03 \| "
                              r"[\d.]+ (it/s|s/it) \| ETA \d+m\d\ds")
    assert int(bar.group(2)) >= 1
    terminal.process.send_signal(signal.SIGINT)
    terminal.read_until("stopping after this step .*Ctrl\\+C again to quit at once", timeout=10)
    assert terminal.finish() == 0
    assert "step 1/1" not in terminal.text and "/1 " not in terminal.text
    stopped = re.search(r"stopped: LoRA (\S+lora-step\d+\.safetensors)", terminal.text)
    assert stopped and os.path.isfile(stopped.group(1))


def test_a_second_signal_says_what_it_leaves_on_disk(tmp_path, monkeypatch, capfd):
    requests = StopRequests(tmp_path)
    requests.training = True
    requests.on_disk = lambda: "On disk: the last LoRA saved is out/x-step00000004.safetensors; no resumable state."
    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    requests._on_signal(signal.SIGINT, None)
    assert requests.stop_reason == "signal SIGINT" and exits == []
    requests._on_signal(signal.SIGTERM, None)
    assert exits == [128 + signal.SIGTERM]
    err = capfd.readouterr().err
    assert "stopping after this step" in err and "Ctrl+C again" in err
    assert "quitting now. On disk: the last LoRA saved is out/x-step00000004.safetensors" in err
    assert "nothing half-written" in err
