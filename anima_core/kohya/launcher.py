"""The launcher part of a pasted command: `accelerate launch [options]` (or `torchrun [options]`).

Its process count and CPU threads become training.num_processes and training.num_cpu_threads_per_process,
`--use_fsdp` training.fsdp (the sharding of a full fine-tune; accelerate's other --fsdp_* options are its ways
of doing it and are named in the note); the rest (machines, ports, its own mixed precision, `python`) is named in a note, since the profile runs on
one machine and the sd-scripts flags already say the precision.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# launcher option -> profile key under [training]
TARGETS = {
    "--num_processes": "num_processes", "--num-processes": "num_processes",
    "--nproc_per_node": "num_processes", "--nproc-per-node": "num_processes",
    "--num_cpu_threads_per_process": "num_cpu_threads_per_process",
}
FSDP_SWITCHES = {"--use_fsdp", "--use-fsdp"}
SWITCHES = {"--multi_gpu", "--multi-gpu", "--cpu", "--standalone", "--use_deepspeed", "--debug", *FSDP_SWITCHES}


@dataclass
class LauncherOptions:
    values: dict[str, int | bool] = field(default_factory=dict)  # training key -> value
    written: dict[str, str] = field(default_factory=dict)  # training key -> the option as written
    left_out: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def read_launcher(tokens: list[str]) -> LauncherOptions:
    found = LauncherOptions()
    index = 0
    while index < len(tokens):
        token = tokens[index]
        index += 1
        if not token.startswith("-"):
            if token not in ("accelerate", "launch", "torchrun", "python", "python3") and not token.endswith(("python", "python.exe")):
                found.left_out.append(token)
            continue
        name, equals, value = token.partition("=")
        takes_value = name not in SWITCHES and not equals and index < len(tokens) and not tokens[index].startswith("-")
        if takes_value:
            value = tokens[index]
            index += 1
        if name in FSDP_SWITCHES:
            found.values["fsdp"], found.written["fsdp"] = True, name
            continue
        key = TARGETS.get(name)
        if key is None:
            found.left_out.append(f"{name} {value}".strip() if (equals or takes_value) else name)
            continue
        try:
            number = int(value)
        except ValueError:
            found.problems.append(f"launcher {name}: expected a whole number, got {value!r}")
            continue
        found.values[key] = number
        found.written[key] = f"{name} {value}"
    return found
