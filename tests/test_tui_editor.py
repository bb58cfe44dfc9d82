"""The profile editor: inline validation per field, saving with the file's comments kept after a confirmed diff."""

import asyncio

from textual import events
from textual.widgets import Input, Select, Switch

from anima_tui.app import AnimaApp
from anima_tui.dialogs import ConfirmScreen
from anima_tui.profile_draft import EMPTY, REMOVE, ProfileDraft, field_specs, parse, sort_problems
from anima_tui.widgets.field_row import FieldRow

PROFILE = """\
# My character LoRA: keep this comment.
[training]
max_train_steps = 1600  # about ten epochs
loss_type = "l2"

[network]
dim = 16
"""


async def row(pilot, table, key) -> FieldRow:
    """The field's row, after choosing its table the way the table list does."""
    pilot.app.screen.show_table(table)
    for _ in range(100):
        if pilot.app.screen.query(f"#field-{table}-{key} .field-input"):
            break
        await pilot.pause()
    return pilot.app.screen.query_one(f"#field-{table}-{key}", FieldRow)


async def checked(pilot) -> None:
    """Wait until the editor's debounced, threaded validation has seen the latest edit."""
    for _ in range(300):
        await pilot.pause(0.05)
        if pilot.app.screen.problems_known:
            return
    raise AssertionError("validation did not finish")


def error_text(field: FieldRow) -> str:
    error = field.query_one(".field-error")
    return str(error.content) if error.display else ""


def test_edit_validate_and_save_keeps_comments(tmp_path):
    asyncio.run(_edit_validate_and_save_keeps_comments(tmp_path))


async def _edit_validate_and_save_keeps_comments(tmp_path):
    path = tmp_path / "char.toml"
    path.write_text(PROFILE)
    app = AnimaApp(path)
    async with app.run_test(size=(100, 40)) as pilot:
        await pilot.pause()
        steps = await row(pilot, "training", "max_train_steps")
        assert steps.query_one(Input).value == "1600"
        assert error_text(steps) == ""
        steps.query_one(Input).value = "lots"
        await checked(pilot)
        assert "valid integer" in error_text(steps)
        assert steps.has_class("has-error")
        steps.query_one(Input).value = "2000"
        await checked(pilot)
        assert error_text(steps) == ""

        (await row(pilot, "training", "loss_type")).query_one(Select).value = "huber"
        (await row(pilot, "memory", "gradient_checkpointing")).query_one(Switch).value = True
        await pilot.pause()
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen)
        assert "+max_train_steps = 2000" in app.screen.diff and "-loss_type = \"l2\"" in app.screen.diff
        assert path.read_text() == PROFILE, "nothing is written before the diff is confirmed"
        await pilot.press("y")
        await pilot.pause()
    text = path.read_text()
    assert text.startswith("# My character LoRA: keep this comment.\n[training]\n")
    assert "max_train_steps = 2000  # about ten epochs" in text
    assert 'loss_type = "huber"' in text
    assert "[memory]\ngradient_checkpointing = true" in text
    assert "dim = 16" in text


def test_unsaved_changes_are_not_written_when_declined(tmp_path):
    asyncio.run(_declined(tmp_path))


async def _declined(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(PROFILE)
    app = AnimaApp(path)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        (await row(pilot, "network", "dim")).query_one(Input).value = "32"
        await pilot.pause()
        await pilot.press("ctrl+s")
        await pilot.pause()
        await pilot.press("n")
        await pilot.pause()
        assert path.read_text() == PROFILE
        # Keyboard only: the table list, down to "caching", Enter moves into its first field.
        await pilot.press("ctrl+t", "down", "down", "enter")
        for _ in range(50):
            if isinstance(app.focused, Switch):
                break
            await pilot.pause()
        assert app.focused.parent.parent.id == "field-caching-cache_latents"
        assert "modified" in str(app.screen.query_one("#title").content)


def test_problems_are_sorted_to_fields_tables_and_the_rest():
    by_field, by_table, general = sort_problems([
        "training.loss_type: Input should be 'l2'",
        "dataset.resolution.0: bad",
        "training.bogus: unknown key; did you mean 'training.seed'?",
        "dataset: set dataset_config or train_data_dir",
        "validation could not finish: boom",
    ])
    assert by_field == {"training.loss_type": ["Input should be 'l2'"], "dataset.resolution": ["dataset.resolution.0: bad"]}
    assert by_table == {"training": ["training.bogus: unknown key; did you mean 'training.seed'?"],
                        "dataset": ["dataset: set dataset_config or train_data_dir"]}
    assert general == ["validation could not finish: boom"]


def test_inputs_parse_by_field_type(tmp_path):
    specs = {s.name: s for s in field_specs("dataset")}
    assert parse("[768, 512]", specs["resolution"]) == [768, 512]
    assert parse("", specs["resolution"]) is EMPTY
    assert parse("12", specs["train_batch_size"]) == 12
    assert parse("twelve", specs["train_batch_size"]) == "twelve"
    assert parse("a, b", specs["caption_prefix"]) == "a, b"
    network = {s.name: s for s in field_specs("network")}
    assert parse('{ mlp_dim = 8, verbose = true }', network["args"]) == {"mlp_dim": 8, "verbose": True}
    draft = ProfileDraft(tmp_path / "new.toml", "")
    assert draft.set("network", "dim", 4) and not draft.set("network", "dim", 4)
    assert draft.set("network", "dim", REMOVE) and "dim" not in draft.text()


def test_a_field_cleared_and_retyped_keeps_its_comment_and_place(tmp_path):
    asyncio.run(_cleared_and_retyped(tmp_path))


async def _cleared_and_retyped(tmp_path):
    text = "[network]\nalpha = 2\ndim = 4  # rank\ndropout = 0.1\n"
    path = tmp_path / "p.toml"
    path.write_text(text)
    app = AnimaApp(path)
    async with app.run_test(size=(80, 24)) as pilot:
        dim = await row(pilot, "network", "dim")
        dim.query_one(Input).focus()
        await pilot.press("end", "backspace")
        await checked(pilot)
        assert dim.query_one(Input).value == ""
        assert "empty; type a value, or press ctrl+d" in error_text(dim)
        await pilot.press("ctrl+s")  # an emptied key cannot be written: refused, nothing asked
        await pilot.pause()
        assert not isinstance(app.screen, ConfirmScreen) and path.read_text() == text
        await pilot.press("4")
        await checked(pilot)
        assert app.screen.draft.text() == text and not app.screen.draft.modified
        await pilot.press("backspace", "8", "ctrl+s")
        await pilot.pause()
        assert "-dim = 4  # rank\n+dim = 8  # rank\n" in app.screen.diff
        await pilot.press("y")
        await pilot.pause()
        assert path.read_text() == text.replace("4  # rank", "8  # rank")
        # Removing a key is done on purpose, with ctrl+d: then it leaves the file and the default shows.
        await pilot.press("ctrl+d")
        await checked(pilot)
        assert dim.query_one(Input).value == "" and error_text(dim) == ""
        assert app.screen.draft.text() == "[network]\nalpha = 2\ndropout = 0.1\n"


def test_a_burst_of_keys_ends_in_the_typed_value(tmp_path):
    asyncio.run(_burst(tmp_path))


async def _burst(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text("[optimizer]\nlearning_rate = 1e-4  # peak\n")
    app = AnimaApp(path)
    keys = ["end", *["backspace"] * 10, *"0.002"]
    async with app.run_test(size=(80, 24)) as pilot:
        lr = await row(pilot, "optimizer", "learning_rate")
        lr.query_one(Input).focus()
        await pilot.pause()
        # All keys queued before the first is handled, as a terminal delivers them over a laggy link.
        for key in keys:
            app.post_message(events.Key(key, key if len(key) == 1 else None))
        await checked(pilot)
        assert lr.query_one(Input).value == "0.002"
        assert "learning_rate = 0.002  # peak" in app.screen.draft.text()
        await pilot.press("home", "shift+end", *"3e-4")  # typing over a selection: through Pilot's press
        await checked(pilot)
        assert lr.query_one(Input).value == "3e-4"
        await pilot.press(*keys)
        await checked(pilot)
        assert lr.query_one(Input).value == "0.002"
