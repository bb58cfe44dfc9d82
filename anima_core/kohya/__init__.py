"""`anima-train import-kohya`: an sd-scripts `anima_train_network.py` command line → a commented profile."""

from anima_core.kohya.importer import CommandLineError, ImportResult, UnknownFlagError, import_command_line

__all__ = ["CommandLineError", "ImportResult", "UnknownFlagError", "import_command_line"]
