"""Progress bars that cost nothing (not even the tqdm import) when they are switched off."""

from __future__ import annotations

__all__ = ["progress_bar"]


class _NoBar:
    """The part of tqdm's interface stemgpu uses, doing nothing."""

    def update(self, n=1):
        return None

    def set_postfix_str(self, s="", refresh=True):
        return None

    def close(self):
        return None


def progress_bar(enabled: bool, **kwargs):
    """A ``tqdm.auto.tqdm(**kwargs)`` bar when ``enabled``, otherwise a do-nothing stand-in.

    tqdm is imported only for a bar that is shown, so the library runs where tqdm is not
    installed (e.g. a bare GPU test machine) as long as no bar is asked for.

    Examples
    --------
    >>> from stemgpu._progress import progress_bar
    >>> bar = progress_bar(False, total=3)
    >>> bar.update(1); bar.close()
    """
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(**kwargs)
