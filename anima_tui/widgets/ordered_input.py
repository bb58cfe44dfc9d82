"""An Input whose editing keys act in the order they were typed, even when they arrive in one burst.

Textual's Input inserts a printable character as soon as the key reaches it, but runs its key bindings
(Backspace, Delete, End, arrows...) only after the key has bubbled back up to the app. When a terminal
delivers several keys at once (a laggy SSH link, a paste-like burst), the characters land first and the
Backspaces that came before them then delete them: `End`, 10×Backspace, `0.002` leaves an empty field.
Here the Input's own bindings run on the spot, in the Input's queue, so every key keeps its place.
"""

from __future__ import annotations

from textual import events
from textual.widgets import Input


class OrderedInput(Input):
    async def _on_key(self, event: events.Key) -> None:
        bindings = self._bindings.key_to_bindings.get(event.key)
        if not bindings or event.is_printable:
            return  # Input's own handler (and bubbling to screen and app bindings) does the rest
        event.stop()
        event.prevent_default()
        await self.run_action(bindings[0].action)
