"""Network args of the ``lycoris`` network: the LyCORIS algorithm's own args, plus the target-selection args
it shares with ``lora_anima`` (parsed by that plugin, so both networks pick the same layers).

Values arrive typed from a TOML profile or as sd-scripts ``key=value`` strings (``--network_args``), so
every parser takes both forms. ``ARG_HELP`` is what the profile editor shows for each arg.
"""

from __future__ import annotations

from dataclasses import dataclass

from anima_plugins.lora.args import SELECTION_ARGS
from anima_plugins.lora.args import NetworkArgs, NetworkArgsError, arg_error, as_bool, parse_network_args

ALGORITHMS = ("lokr", "loha", "locon", "lora", "full")  # lora is LyCORIS's name for LoCon on Linear layers
DEFAULT_ALGO = "lora"  # LyCORIS's own default
RANK_ALGORITHMS = ("lokr", "loha", "locon", "lora")  # those with network_dim / alpha, DoRA and use_scalar

# arg -> (algorithms it applies to, help text)
ALGO_ARGS: dict[str, tuple[tuple[str, ...], str]] = {
    "algo": (ALGORITHMS, "LyCORIS algorithm: lokr (Kronecker product), loha (Hadamard product), locon/lora "
             "(low rank, LoCon), full (a full weight difference per layer)."),
    "factor": (("lokr",), "LoKr: split each weight into a (factor x factor)-sized Kronecker half; -1 picks the "
               "most square split. A larger factor gives a smaller file."),
    "decompose_both": (("lokr",), "LoKr: also factor the small Kronecker half into two rank-dim matrices."),
    "full_matrix": (("lokr",), "LoKr: keep the large Kronecker half as a full matrix (network_dim is then unused)."),
    "unbalanced_factorization": (("lokr",), "LoKr: swap the output split, so the large half gets the larger side."),
    "use_scalar": (RANK_ALGORITHMS, "Train one extra scalar per module (both factors start non-zero); the file "
                   "folds it into the weights."),
    "dora_wd": (RANK_ALGORITHMS, "DoRA weight decomposition: also train each input column's magnitude "
                "(saved as dora_scale)."),
    "wd_on_output": (RANK_ALGORITHMS, "DoRA axis. Only false is accepted: ComfyUI rebuilds output-axis DoRA with "
                     "the untrained weight's norm, so such a file would not load as it was trained."),
    "rs_lora": (RANK_ALGORITHMS, "Rank-stabilised scale alpha/sqrt(dim) instead of alpha/dim."),
    "rank_dropout_scale": (RANK_ALGORITHMS + ("full",), "Rescale the rows kept by rank_dropout by their mean."),
    "bypass_mode": (RANK_ALGORITHMS, "Run x through the factors instead of rebuilding the weight difference every "
                    "step (less memory and time; not with DoRA). network.dropout then applies to the module output."),
}

# Selection args shared with lora_anima, with what they do here.
SELECTION_HELP = {
    "target_preset": "Which layers get a module by default: guide (first release) or sd-scripts (current).",
    "train_block_indices": "DiT blocks that get modules: all, none or ranges like 0-5,10.",
    "train_llm_adapter": "Also adapt the LLM adapter's blocks.",
    "include_patterns": "Regexes of module paths that always get a module (override every exclusion).",
    "exclude_patterns": "Regexes of module paths that get no module.",
    "rank_dropout": "LyCORIS rank dropout: drops rows of the weight difference while training.",
    "module_dropout": "Skip a whole module for a step with this probability while training.",
    "loraplus_lr_ratio": "LoRA+ (locon/lora only): the up matrix trains at this multiple of the rate.",
    "loraplus_unet_lr_ratio": "LoRA+ ratio for the DiT modules only (locon/lora).",
    "loraplus_text_encoder_lr_ratio": "LoRA+ ratio for the Qwen3 modules only (locon/lora).",
    "network_reg_lrs": "Learning rate by module-path regex: 'regex=lr,regex=lr'.",
    "verbose": "List every module and every skipped layer at start.",
    "self_attn_dim": "Rank of the self-attention modules (default network_dim); 0 leaves them out.",
    "cross_attn_dim": "Rank of the cross-attention modules (default network_dim); 0 leaves them out.",
    "mlp_dim": "Rank of the MLP modules (default network_dim); 0 leaves them out.",
    "mod_dim": "Rank of the AdaLN modulation modules; > 0 adds them under either preset.",
    "llm_adapter_dim": "Rank of the LLM adapter modules (with train_llm_adapter).",
    "emb_dims": "Ranks of x_embedder, t_embedder, final_layer, e.g. [8,4,8]; 0 leaves one out.",
    "network_reg_dims": "Rank by module-path regex: 'regex=rank,regex=rank' (first match wins).",
}
# LyCORIS args anima-train does not take, and why.
REFUSED = {
    "conv_dim": "Anima's adapted layers are all Linear; there is no convolution for conv_dim to act on",
    "conv_alpha": "Anima's adapted layers are all Linear; there is no convolution for conv_alpha to act on",
    "use_tucker": "Tucker decomposition applies to convolution kernels only; Anima's adapted layers are Linear",
    "use_cp": "Tucker (CP) decomposition applies to convolution kernels only; Anima's adapted layers are Linear",
    "use_conv_cp": "Tucker (CP) decomposition applies to convolution kernels only; Anima's adapted layers are Linear",
    "disable_conv_cp": "Tucker (CP) decomposition applies to convolution kernels only; Anima's adapted layers are Linear",
    "preset": "anima-train selects layers with target_preset, include_patterns and exclude_patterns (the same "
              "selection as lora_anima); LyCORIS presets name module classes of other models",
    "train_norm": "norm-layer modules are saved in a form ComfyUI does not load as a LoRA",
    "dropout": "the module-output dropout is network.dropout (network_dropout), with bypass_mode = true",
}
DROPOUT_REFUSED = (
    "LyCORIS modules apply network_dropout only with bypass_mode = true (rebuilding the weight difference leaves "
    "no activation to drop), so here it would do nothing; set bypass_mode = true in the network args, or remove it "
    "and use rank_dropout / module_dropout."
)


def arg_help(algo: str | None = None) -> dict[str, str]:
    """Help text per network arg, only those that apply to ``algo`` when it names an algorithm we train."""
    if algo not in ALGORITHMS:
        algo = None
    texts = {name: text for name, (algos, text) in ALGO_ARGS.items() if algo is None or algo in algos}
    texts.update(SELECTION_HELP)
    if algo not in (None, "locon", "lora"):
        for name in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"):
            texts.pop(name)
    return texts


@dataclass(frozen=True)
class LycorisArgs:
    algo: str
    selection: NetworkArgs
    factor: int = -1
    decompose_both: bool = False
    full_matrix: bool = False
    unbalanced_factorization: bool = False
    use_scalar: bool = False
    dora_wd: bool = False
    rs_lora: bool = False
    rank_dropout_scale: bool = False
    bypass_mode: bool = False

    def module_kwargs(self) -> dict:
        """Keyword args for the LyCORIS module class of ``algo``."""
        kwargs = {
            "rank_dropout": self.selection.rank_dropout or 0.0,
            "module_dropout": self.selection.module_dropout or 0.0,
            "rank_dropout_scale": self.rank_dropout_scale,
        }
        if self.algo in RANK_ALGORITHMS:
            kwargs.update(use_scalar=self.use_scalar, weight_decompose=self.dora_wd, wd_on_out=False,
                          rs_lora=self.rs_lora, bypass_mode=self.bypass_mode)
        if self.algo == "lokr":
            kwargs.update(factor=self.factor, decompose_both=self.decompose_both, full_matrix=self.full_matrix,
                          unbalanced_factorization=self.unbalanced_factorization)
        return kwargs


def _int(name: str, value: object) -> int:
    try:
        number = int(str(value).strip()) if not isinstance(value, (bool, float)) else int(value)
    except ValueError:
        raise arg_error(name, value, "a whole number") from None
    if isinstance(value, bool) or (isinstance(value, float) and value != number) or (number < 1 and number != -1):
        raise arg_error(name, value, "a whole number >= 1, or -1")
    return number


def parse_lycoris_args(raw: dict[str, object] | None) -> LycorisArgs:
    """Check every arg; the first problem raises NetworkArgsError naming the arg and what to do."""
    raw = dict(raw or {})
    algo = str(raw.pop("algo", DEFAULT_ALGO)).strip().lower()
    if algo not in ALGORITHMS:
        raise NetworkArgsError(
            f"network arg algo={algo!r} is not supported. anima-train trains {', '.join(ALGORITHMS)}: the formats "
            "ComfyUI rebuilds and the post-save self-check verifies. Set algo to one of them."
        )
    for name in raw:
        if name in REFUSED:
            raise NetworkArgsError(f"network arg {name} is not taken by the lycoris network: {REFUSED[name]}. "
                                   "Remove it from the [network] args.")
    unknown = sorted(set(raw) - set(ALGO_ARGS) - set(SELECTION_ARGS))
    if unknown:
        known = sorted(set(ALGO_ARGS) | set(SELECTION_HELP))
        raise NetworkArgsError(
            f"unknown network arg(s) {', '.join(unknown)} for lycoris. Known args: {', '.join(known)}. "
            "Remove or rename them in the [network] args of the profile."
        )
    wrong_algo = [name for name in raw if name in ALGO_ARGS and algo not in ALGO_ARGS[name][0]]
    if wrong_algo:
        raise NetworkArgsError(
            f"network arg(s) {', '.join(sorted(wrong_algo))} do nothing for algo={algo}; they apply to "
            + "; ".join(f"{n}: {', '.join(ALGO_ARGS[n][0])}" for n in sorted(wrong_algo))
            + ". Remove them or change algo."
        )
    if "wd_on_output" in raw and as_bool("wd_on_output", raw.pop("wd_on_output")):
        raise arg_error("wd_on_output", True, f"false. {ALGO_ARGS['wd_on_output'][1]}")
    if as_bool("bypass_mode", raw.get("bypass_mode", False)) and as_bool("dora_wd", raw.get("dora_wd", False)):
        raise NetworkArgsError(
            "network args bypass_mode=true and dora_wd=true cannot be combined: LyCORIS's bypass forward skips the "
            "DoRA decomposition, so the run would not train what the file says. Remove bypass_mode."
        )
    loraplus = [n for n in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio") if n in raw]
    if loraplus and algo not in ("locon", "lora"):
        raise NetworkArgsError(
            f"network arg(s) {', '.join(loraplus)}: LoRA+ speeds up the zero-initialised up matrix of a low-rank "
            f"pair; algo={algo} has no such matrix (LyCORIS's own sd-scripts network leaves it at the base rate). "
            "Remove them or use algo=locon."
        )
    own = {name: raw.pop(name) for name in list(raw) if name in ALGO_ARGS}
    selection = parse_network_args(raw)
    return LycorisArgs(
        algo=algo,
        selection=selection,
        factor=_int("factor", own["factor"]) if "factor" in own else -1,
        **{name: as_bool(name, own[name]) for name in (
            "decompose_both", "full_matrix", "unbalanced_factorization", "use_scalar", "dora_wd", "rs_lora",
            "rank_dropout_scale", "bypass_mode") if name in own},
    )
