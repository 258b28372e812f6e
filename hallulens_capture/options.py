"""Numeric options (model_args, environment variables, flags), checked in one place.

Every backend, judge setting and command takes numbers from text a user typed; each gets the
same checks (a number, finite, whole where it must be, at least a minimum) and the same
one-line message naming the option, raised as the caller's own error class.
"""

from __future__ import annotations

import math

from hallulens_capture.errors import CaptureConfigError, HalluLensError


def checked_number(
    name: str,
    value: object,
    *,
    minimum: float,
    integer: bool = False,
    maximum: float | None = None,
    error: type[HalluLensError] = CaptureConfigError,
) -> int | float:
    """`value` as an int (`integer`) or a finite float within [minimum, maximum]."""
    if isinstance(value, bool):
        raise error(f"{name}={value!r} is not a number")
    try:
        number = float(str(value).strip()) if isinstance(value, str) else float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        kind = "an integer" if integer else "a number"
        raise error(f"{name}={value!r} is not {kind}") from None
    if not math.isfinite(number):
        raise error(f"{name}={value!r} must be a finite number")
    if integer and not number.is_integer():
        raise error(f"{name}={value!r} is not an integer")
    if number < minimum:
        raise error(f"{name}={value!r} must be at least {minimum:g}")
    if maximum is not None and number > maximum:
        raise error(f"{name}={value!r} must be at most {maximum:g}")
    return int(number) if integer else number
