"""Reading the engines' FP_SCAND_* settings (strings from the config file) into values.

Every key and its default is documented in docs/scand-settings.md. A bad value is a
configuration mistake: ValueError naming the key, so the daemon can refuse to start.
"""

import re


def number(settings, key, default, minimum=0, kind=int):
    """settings[key] as an int (or float), default if unset or empty."""
    text = settings.get(key, "").strip()
    if not text:
        return default
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(f"{key}={text!r} is not a number") from None
    if value < minimum:
        raise ValueError(f"{key}={text!r} is below {minimum}")
    return value


def words(settings, key):
    """settings[key] split on commas and white space (empty items dropped)."""
    return [w for w in re.split(r"[\s,]+", settings.get(key, "")) if w]
