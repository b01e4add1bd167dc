"""What long jobs show on the terminal: one kind of progress bar, and messages printed above it
without breaking it."""

from __future__ import annotations

from typing import Any


def progress_bar(total: int | None = None, *, desc: str, unit: str, enabled: bool = True, initial: int = 0,
                 **options: Any):
    """A tqdm bar on stderr; disabled (every method a no-op) when `enabled` is false, e.g. on ranks
    other than 0 or with `progress: false`."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True,
                mininterval=0.5, **options)


def note(message: str, progress: bool = True) -> None:
    """Print a line; with a progress bar on screen, above it."""
    if progress:
        from tqdm.auto import tqdm

        tqdm.write(message)
    else:
        print(message)
