"""common/progress.py: a non-terminal gets plain rate-limited lines, never carriage-return redraws."""

import io

from common import progress


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_a_log_gets_one_plain_line_per_interval_and_one_at_the_end(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    out = io.StringIO()
    with progress.progress_bar(total=100, desc="caption", unit="caption", file=out) as bar:
        for _ in range(100):
            clock.t += 1.0  # one unit a second: 100 s in all, a line every 30 s
            bar.update(1)
            bar.set_postfix_str("$0.0100", refresh=False)
    text = out.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and "\x1b" not in text
    assert 3 <= len(lines) <= 5, lines  # ≈ at 30, 60, 90 s and the final one
    assert lines[-1].startswith("caption: 100/100 (100 %)") and "$0.0100" in lines[-1]
    assert "ETA" in lines[0]


def test_a_bar_without_total_and_a_growing_total(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    out = io.StringIO()
    bar = progress.progress_bar(total=0, desc="caption (batch)", unit="req", file=out, dynamic_ncols=True)
    bar.total += 10
    clock.t += 31
    bar.n = 4
    bar.refresh()
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("caption (batch): 4/10") and lines[-1].startswith("caption (batch): 4/10")


def test_a_terminal_gets_tqdm(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    bar = progress.progress_bar(total=3, file=Tty())
    assert not isinstance(bar, progress.LineProgress)
    bar.close()


def test_tqdm_write_between_lines_adds_no_carriage_returns(monkeypatch):
    out = io.StringIO()
    bar = progress.progress_bar(total=5, desc="train", unit="step", file=out)
    bar.update(1)
    bar.write("step 1 val: loss=0.5", file=out)
    bar.close()
    assert "\r" not in out.getvalue() and "step 1 val: loss=0.5\n" in out.getvalue()
