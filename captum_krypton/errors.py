"""What IncrementalOcclusion raises and warns, and where its warnings point."""

from __future__ import annotations

import os
import sys
import warnings

import captum


class FallbackWarning(UserWarning):
    """IncrementalOcclusion ran Captum's own Occlusion; the message says why."""


class IncrementalNotApplicable(RuntimeError):
    """engine="incremental" was asked for, but the model or arguments rule it out."""


#: Frames in these packages are not the caller's: a warning points past them.
_OWN_PACKAGES = (
    os.path.dirname(os.path.abspath(__file__)) + os.sep,
    os.path.dirname(os.path.abspath(captum.__file__)) + os.sep,
)


def caller_stacklevel() -> int:
    """The `stacklevel` for a `warnings.warn` made by the function calling this one
    that points at the first frame outside this package and Captum (the user's
    call), however deep the call came (attribute, attribute_stream, NoiseTunnel,
    the widget)."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(_OWN_PACKAGES):
        frame = frame.f_back
        level += 1
    return level


class OnceWarnings:
    """Warnings given once per message for the life of one IncrementalOcclusion."""

    def __init__(self) -> None:
        self._given: set[str] = set()

    def warn(self, message: str, category: type[Warning]) -> None:
        if message not in self._given:
            self._given.add(message)
            warnings.warn(message, category, stacklevel=caller_stacklevel())
