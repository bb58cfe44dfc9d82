"""`--network_module=lycoris.kohya`: the LyCORIS network of sd-scripts, imported as `network.module = "lycoris"`.

LyCORIS's sd-scripts network adapts, with its default preset ``full``, every Linear of the Anima blocks,
the patch and timestep embedders and the final layer (the adapter's blocks with train_llm_adapter, Qwen3's
attention and MLP when the text encoder trains); anima-train's selection says the same with
``include_patterns = [".*"]``. LyCORIS args anima-train does not take are left out, each with its reason.
"""

from __future__ import annotations

from typing import Any

LYCORIS_MODULE = "lycoris.kohya"
EVERY_LINEAR = [".*"]


def lycoris_network_rules(data: dict[str, dict[str, Any]], comments: dict, warn, written_module: str) -> None:
    """Rewrite the imported [network] table of a lycoris.kohya command line in place."""
    from anima_plugins.lycoris.args import DROPOUT_REFUSED, REFUSED

    network = data.setdefault("network", {})
    args = network.setdefault("args", {})
    network["module"] = "lycoris"
    comments[("network", "module")] = f"{written_module}: LyCORIS's sd-scripts network"
    preset = args.pop("preset", "full")
    if str(preset) != "full":
        warn(f"network arg preset={preset}: left out; LyCORIS presets name module classes, anima-train selects "
             "layers with target_preset / include_patterns / exclude_patterns. Imported with the layers of LyCORIS's "
             "default preset full (every Linear); narrow them with exclude_patterns.")
    if "include_patterns" not in args:
        args["include_patterns"] = EVERY_LINEAR
        comments[("network.args", "include_patterns")] = (
            "LyCORIS's preset full: every Linear of the blocks, embedders and final layer")
    for name in [n for n in args if n in REFUSED and n != "preset"]:
        args.pop(name)
        warn(f"network arg {name}: left out; {REFUSED[name]}.")
    if args.get("dora_wd") in (True, "true", "True") and "wd_on_output" not in args:
        warn("network arg dora_wd: LyCORIS decomposes on the output axis by default, which ComfyUI rebuilds with the "
             "untrained weight's norm; anima-train trains the input-axis DoRA that ComfyUI rebuilds exactly.")
    if args.get("wd_on_output") in (True, "true", "True"):
        args.pop("wd_on_output")
        warn("network arg wd_on_output=True: left out; ComfyUI rebuilds output-axis DoRA with the untrained weight's "
             "norm, so anima-train trains the input-axis form.")
    if network.get("dropout") and args.get("bypass_mode") not in (True, "true", "True"):
        network.pop("dropout")
        warn(f"--network_dropout: left out; {DROPOUT_REFUSED}")
