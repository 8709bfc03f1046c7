"""A wandb EventWriter that sits beside detectron2's JSONWriter and mirrors the same scalars."""

from __future__ import annotations

from detectron2.utils.events import EventWriter, get_event_storage


class WandbWriter(EventWriter):
    """Logs each scalar of the EventStorage once, at its iteration, with JSONWriter's smoothing rules."""

    def __init__(self, run, window_size: int = 20):
        """``run``: a wandb run (``wandb.init(...)``, the run directory's stable id); None writes nothing."""
        self._run = run
        self._window_size = window_size
        self._last_write = -1

    def write(self) -> None:
        if self._run is None:
            return
        storage = get_event_storage()
        by_iter: dict[int, dict[str, float]] = {}
        for key, (value, it) in storage.latest_with_smoothing_hint(self._window_size).items():
            if it > self._last_write:
                by_iter.setdefault(it, {})[key] = value
        for it in sorted(by_iter):
            self._run.log(by_iter[it], step=it)
        if by_iter:
            self._last_write = max(by_iter)
