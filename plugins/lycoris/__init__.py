"""Built-in network plugin ``lycoris`` (alias ``lycoris.kohya``, the sd-scripts module name): LoKr, LoHa,
LoCon and DoRA from the optional lycoris-lora package (``pip install 'anima-train[lycoris]'``).

Importing this package never imports lycoris-lora; a missing package is a ``validate`` problem naming the extra.
"""

from __future__ import annotations

from anima_core.errors import AnimaError
from anima_core.hookspecs import hookimpl

from .args import DEFAULT_ALGO, DROPOUT_REFUSED, arg_help, parse_lycoris_args
from .package import missing_problem


class LycorisNetworkPlugin:
    """The registered object: ``create(network_cfg, ...)`` by calling it, ``validate(profile)`` for validate."""

    def __call__(self, network_cfg, *, dit, text_encoder, train_text_encoder: bool):
        from .network import create_network

        return create_network(network_cfg, dit=dit, text_encoder=text_encoder, train_text_encoder=train_text_encoder)

    @staticmethod
    def validate(profile) -> list[str]:
        problems = []
        missing = missing_problem()
        if missing:
            problems.append(f"network.module: {missing}")
        try:
            args = parse_lycoris_args(profile.network.args)
        except AnimaError as err:
            problems.append(f"network.args: {err}")
            args = None
        if profile.network.dropout and not (args and args.bypass_mode):
            problems.append(f"network.dropout: {DROPOUT_REFUSED}")
        if getattr(profile.optimizer, "scale_weight_norms", None) and args and args.algo == "full":
            problems.append("optimizer.scale_weight_norms: LyCORIS has no max-norm for algo=full (a full weight "
                            "difference has no factors to scale); remove scale_weight_norms or use another algo")
        return problems

    @staticmethod
    def switch_off_problem(network_cfg) -> str | None:
        """Why these modules at multiplier 0 are not the base model (prior preservation needs them to be), or None."""
        try:
            args = parse_lycoris_args(network_cfg.args)
        except AnimaError:
            return None  # validate reports the args themselves
        if args.dora_wd:
            return ("network.args.dora_wd: LyCORIS's DoRA at multiplier 0 keeps the trained direction W + ΔW and "
                    "returns only its magnitude, so it cannot give the base model's prediction that prior "
                    "preservation trains toward; turn dora_wd off, or remove prior_preservation")
        return None

    @staticmethod
    def arg_help(args: dict) -> dict[str, str]:
        """Help per network arg for the algorithm ``args`` name (all args when it names none we know)."""
        return arg_help(str(args.get("algo", DEFAULT_ALGO)).strip().lower())


@hookimpl
def register_networks(register):
    register("lycoris", LycorisNetworkPlugin(), aliases=["lycoris.kohya"])
