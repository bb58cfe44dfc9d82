"""The TUI opens fast: its modules import none of the heavy libraries (they load where they are used, in
worker threads). Timings are measured by bench/bench_startup.py, never asserted here."""

import subprocess
import sys

HEAVY = ("torch", "transformers", "diffusers", "accelerate", "safetensors")


def test_opening_the_tui_imports_no_heavy_library():
    code = ("import sys, anima_tui.app, anima_core.cli, anima_tui.plain_watch; "
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "", f"imported at start-up: {loaded}"
