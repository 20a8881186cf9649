"""Progress for long work: tqdm's bar on a terminal, one plain line every ~30 s anywhere else (CI, `nohup`, a Ray
job's log), where a bar's carriage-return redraws pile up into one endless line.

    with progress_bar(total=len(todo), desc="filter", unit="shard") as bar:   # tqdm's arguments
        bar.update(1)
    # not a terminal:  filter: 12/40 (30 %), 0.41 shard/s, ETA 01:08, $0.0123 …   every LENSFORGE_PROGRESS_S s

The bars of download, filter, dedup, captioning and training are made here. The plain line is tqdm's own meter
without the bar (the same counts, rates and postfix), written with a newline, at most every `LENSFORGE_PROGRESS_S`
seconds (default 30) and once when the bar closes.
"""

from __future__ import annotations

import os
import sys
import time

from tqdm import tqdm

LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt} ({percentage:.0f} %), {rate_fmt}, ETA {remaining}{postfix}"
NO_TOTAL_FORMAT = "{desc}: {n_fmt}, {rate_fmt}, {elapsed}{postfix}"


def line_every_s() -> float:
    return float(os.environ.get("LENSFORGE_PROGRESS_S", "30"))


class LineProgress(tqdm):
    """tqdm that prints its meter as a plain line, rate-limited, instead of redrawing a bar."""

    def __init__(self, *args, every_s: float | None = None, **kwargs):
        self._every, self._last, self._closing = every_s if every_s is not None else line_every_s(), None, False
        kwargs.setdefault("bar_format", LINE_FORMAT if kwargs.get("total") else NO_TOTAL_FORMAT)
        kwargs.pop("dynamic_ncols", None)
        # tqdm decides on every update (`display` below keeps the pace): no tqdm-side interval or skipping
        kwargs.update(mininterval=0, miniters=1)
        super().__init__(*args, **kwargs)

    def display(self, msg=None, pos=None):
        now = time.monotonic()
        if not self._closing and self._last is not None and now - self._last < self._every:
            return True
        if self._last is None and not self._closing and self.n == 0:  # nothing to say yet: start the clock
            self._last = now
            return True
        self._last = now
        if self.total:  # a total that grows (batch captioning) may need the full format back
            self.bar_format = LINE_FORMAT
        self.fp.write((msg or self.__str__()).strip() + "\n")
        self.fp.flush()
        return True

    def clear(self, nolock=False):
        """Nothing to erase: a plain line stays (tqdm.write would otherwise emit carriage returns)."""

    def close(self):
        if not self.disable and not self._closing:
            self._closing = True
            self.display()
        self.disable = True  # tqdm's own close would draw once more
        super().close()


def progress_bar(*args, file=None, **kwargs) -> tqdm:
    """A tqdm bar on a terminal, a `LineProgress` otherwise (`file` default: stderr, as tqdm)."""
    file = file or sys.stderr
    isatty = getattr(file, "isatty", lambda: False)()
    return tqdm(*args, file=file, **kwargs) if isatty else LineProgress(*args, file=file, **kwargs)
