"""Profiles: the TOML file a run is made from."""

from anima_core.config.load import (
    apply_overrides,
    load_profile,
    profile_from_dict,
    profile_to_dict,
    profile_to_toml,
)
from anima_core.config.schema import TABLES, Profile

__all__ = [
    "Profile",
    "TABLES",
    "apply_overrides",
    "load_profile",
    "profile_from_dict",
    "profile_to_dict",
    "profile_to_toml",
]
