"""The one rule of kflats.torch's progress bars: shown when asked, or when long."""


def progress_bar(progress, long, *, total, desc, unit):
    """A tqdm progress bar, or None.

    Parameters
    ----------
    progress : bool or None
        ``True`` or ``False``: shown or not, as asked. ``None``: shown when
        the work is ``long``.
    long : bool
        Whether the work is long enough to show one by default.
    total : int or None
        Steps of the bar.
    desc, unit : str
        What the bar says it counts.

    Returns
    -------
    bar : tqdm.tqdm or None
        None when not shown, or when tqdm (in the torch extra) is missing.
    """
    if not (long if progress is None else bool(progress)):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the torch extra
        return None
    return tqdm(total=total, desc=desc, unit=unit)
