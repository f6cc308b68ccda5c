"""transformers and sentence-transformers kept quiet while they save or build."""

import contextlib
import logging
import sys
import warnings


@contextlib.contextmanager
def _quiet():
    """Silence transformers and sentence-transformers while they save or build.

    A compressed model is not what these libraries expect to find in the
    folder: loading it they report unexpected and missing keys, which
    :func:`load_compressed` then loads itself, strictly. Their loggers,
    progress bars and Python warnings are restored on exit (process-wide
    settings: not thread-safe, like the libraries' own switches).
    """
    loggers = [logging.getLogger("sentence_transformers")]
    levels = [lg.level for lg in loggers]
    tf_logging = hub_utils = None
    if "transformers" in sys.modules:
        from transformers.utils import logging as tf_logging
    if "huggingface_hub" in sys.modules:
        from huggingface_hub import utils as hub_utils
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        verbosity = bars = hub_bars_off = None
        if hub_utils is not None:  # before transformers' switch, which sets it too
            hub_bars_off = hub_utils.are_progress_bars_disabled()
            hub_utils.disable_progress_bars()
        if tf_logging is not None:
            verbosity = tf_logging.get_verbosity()
            bars = tf_logging.is_progress_bar_enabled()
            tf_logging.set_verbosity_error()
            tf_logging.disable_progress_bar()
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)
            if tf_logging is not None:
                tf_logging.set_verbosity(verbosity)
                if bars:
                    tf_logging.enable_progress_bar()
            if hub_utils is not None:
                if hub_bars_off:
                    hub_utils.disable_progress_bars()
                else:
                    hub_utils.enable_progress_bars()
