"""What long jobs show on the terminal: one kind of progress bar, and messages printed above it
without breaking it."""

from __future__ import annotations

from typing import Any

SIGNIFICANT_DIGITS = 6  # what a printed metric keeps: float32's own precision is about 7 digits


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


def rounded(value: Any, digits: int = SIGNIFICANT_DIGITS) -> Any:
    """`value` with every float (in dicts and lists too) rounded to `digits` significant digits, for
    printing: a float32 metric shows as 0.021, not 0.020999999716877937."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, digits) for v in value]
    return value
