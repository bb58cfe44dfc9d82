"""Built-in network plugin ``lora_anima`` (alias ``networks.lora_anima``, the sd-scripts module name)."""

from anima_core.hookspecs import hookimpl

from .inference import AppliedLoRAs, SelfCheckResult, apply_lora_files, lora_info, self_check
from .network import AnimaLoRANetwork, create_network

__all__ = [
    "AnimaLoRANetwork",
    "AppliedLoRAs",
    "SelfCheckResult",
    "apply_lora_files",
    "create_network",
    "lora_info",
    "self_check",
]


@hookimpl
def register_networks(register):
    register("lora_anima", create_network, aliases=["networks.lora_anima"])
