"""The progress bar: every item passes through, and nothing is drawn unless stderr is a terminal."""

from __future__ import annotations

import io
import sys

from releq_tvm.progress import progress_bar


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal and keeps what was drawn on it."""

    def isatty(self) -> bool:
        return True


def test_bar_yields_every_item_in_order_and_is_silent_off_a_terminal(capsys):
    items = [3, 1, 4, 1, 5, 9, 2, 6]
    assert list(progress_bar(items, "digits")) == items
    assert list(progress_bar(iter(items), "a generator, no length")) == items
    assert list(progress_bar([], "nothing")) == []
    assert capsys.readouterr() == ("", "")  # pytest's captured stderr is not a terminal


def test_bar_draws_on_a_terminal_and_still_yields_every_item(monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert list(progress_bar(range(5), "counting", unit="step")) == [0, 1, 2, 3, 4]
    drawn = terminal.getvalue()
    assert "counting" in drawn and "/5 " in drawn  # redraws are throttled: the last one need not be 5/5
