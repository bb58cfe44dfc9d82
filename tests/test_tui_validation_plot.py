"""The monitor plots validation loss on the training-loss axis, from `validation` events."""

import asyncio
import json

from anima_tui.app import WatchApp
from anima_tui.run_state import RunState
from anima_tui.system_stats import SystemReading


def _events(losses, validations):
    events = [{"v": 1, "type": "run_start", "time": 1.0, "run_id": "val", "total_steps": len(losses), "device": "cpu"}]
    for n, loss in enumerate(losses, start=1):
        events.append({"v": 1, "type": "step", "time": 1.0 + n, "step": n, "loss": loss, "lr": 1e-4})
        if n in validations:
            events.append({"v": 1, "type": "validation", "time": 1.5 + n, "step": n, "loss": validations[n],
                           "by_sigma": {"0.2": validations[n]}, "images": 2, "batches": 1})
    return events


def test_validation_curve_follows_the_step_axis():
    state = RunState()
    state.add(_events([1.0] * 6, {2: 0.8, 4: 0.4}) + [{"type": "validation", "step": "x", "loss": "nan"}])
    assert state.validation_steps == [2, 4] and state.validation_losses == [0.8, 0.4]
    assert state.validation_curve() == [None, 0.8, 0.6000000000000001, 0.4, 0.4, 0.4]


def test_monitor_draws_validation_beside_the_loss(tmp_path):
    asyncio.run(_draws(tmp_path))


async def _draws(tmp_path):
    run = tmp_path / "runs" / "val"
    run.mkdir(parents=True)
    events = _events([1.0 - 0.01 * n for n in range(20)], {5: 2.0, 10: 1.5, 20: 1.2})
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    app = WatchApp(run, probe=lambda: SystemReading(ram_used=None, ram_total=None, gpus=[]))
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        plot = app.screen.query_one("#loss")
        assert "validation" in plot.title
        drawn = plot.render()
        assert any("yellow" in str(span.style) for span in drawn.spans)
        assert "2" in drawn.plain  # the axis now reaches the validation loss
