"""The optional lycoris-lora package: the module classes of the algorithms we train, or an error naming the extra."""

from __future__ import annotations

from anima_core.errors import AnimaError

INSTALL_HINT = "pip install 'anima-train[lycoris]'"
MISSING = (
    "network.module = 'lycoris' needs the lycoris-lora package, which is not installed. Install the extra with "
    f"{INSTALL_HINT} (or pip install lycoris-lora), or use network.module = 'lora_anima'."
)


class MissingLycorisError(AnimaError):
    """lycoris-lora is not installed."""


def module_classes() -> dict[str, type]:
    """algo -> LyCORIS module class. The top package is imported first, so a blocked ``lycoris`` fails here."""
    try:
        import lycoris  # noqa: F401
        from lycoris.modules.full import FullModule
        from lycoris.modules.locon import LoConModule
        from lycoris.modules.loha import LohaModule
        from lycoris.modules.lokr import LokrModule
    except ImportError as err:
        raise MissingLycorisError(f"{MISSING} ({err})") from None
    return {"lora": LoConModule, "locon": LoConModule, "loha": LohaModule, "lokr": LokrModule, "full": FullModule}


def missing_problem() -> str | None:
    try:
        module_classes()
    except MissingLycorisError as err:
        return str(err)
    return None
