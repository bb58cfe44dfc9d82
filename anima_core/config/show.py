"""`anima-train show-config`: the resolved profile with every key, unset ones as comments, and a note on each key
that another key overrides."""

from __future__ import annotations

import tomllib

import tomlkit

from anima_core.config.schema import Profile

# (table, key) -> (table, key) that replaces it when set.
OVERRIDDEN_BY = {
    ("training", "max_train_steps"): ("training", "max_train_epochs"),
    ("dataset", "train_data_dir"): ("dataset", "dataset_config"),
    ("dataset", "reg_data_dir"): ("dataset", "dataset_config"),
    ("dataset", "in_json"): ("dataset", "dataset_config"),
}
# Dataset-config names of profile keys whose names differ (the rest are the same).
DATASET_CONFIG_NAMES = {"train_batch_size": "batch_size", "dataset_repeats": "num_repeats"}


def _keys_in_dataset_config(profile: Profile) -> set[str]:
    """Every key the dataset config sets anywhere; those values win over the profile's [dataset] table."""
    path = profile.dataset.dataset_config
    try:
        config = tomllib.loads(path.read_text(encoding="utf-8")) if path is not None else {}
    except (OSError, tomllib.TOMLDecodeError):
        return set()
    keys = set(config.get("general", {}))
    for dataset in config.get("datasets", []):
        keys |= {k for k in dataset if k != "subsets"}
        for subset in dataset.get("subsets", []):
            keys |= set(subset)
    return keys


def _override_note(profile: Profile, table: str, key: str, in_config: set[str]) -> str | None:
    other = OVERRIDDEN_BY.get((table, key))
    if other is not None and getattr(getattr(profile, other[0]), other[1]) is not None:
        return f"overridden by {other[0]}.{other[1]}"
    if table == "dataset" and DATASET_CONFIG_NAMES.get(key, key) in in_config:
        return f"overridden by the dataset config's {DATASET_CONFIG_NAMES.get(key, key)}"
    return None


def _without_nulls(value):
    """The tables inside a value (the entries of [[slider.pairs]]) without their unset keys: TOML has no null."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def profile_to_commented_toml(profile: Profile) -> str:
    values = profile.model_dump(mode="json")
    in_config = _keys_in_dataset_config(profile)
    document = tomlkit.document()
    for table, field in Profile.model_fields.items():
        section = tomlkit.table()
        for key, info in field.annotation.model_fields.items():
            value = values[table][key]
            if value is None:  # TOML has no null: show the key as a comment with what "unset" means
                section.add(tomlkit.comment(f"{key} = (not set): {info.description or ''}".rstrip()))
                continue
            section.add(key, _without_nulls(value))
            note = _override_note(profile, table, key, in_config)
            if note:
                section[key].comment(note)
        document.add(table, section)
    return tomlkit.dumps(document)
