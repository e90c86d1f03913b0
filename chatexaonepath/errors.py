"""The package's exception types: user mistakes carry one actionable sentence.

The CLI catches `ChatEXAONEPathError`, prints its message and exits with code 2;
anything else is a bug and keeps its traceback.
"""


class ChatEXAONEPathError(Exception):
    """Base class for errors caused by the user's input or environment, not by a bug."""


class SlideError(ChatEXAONEPathError):
    """A slide file is missing, corrupt, truncated, unsupported or unreadable."""


class MissingMppError(SlideError):
    """A slide does not say how many micrometres one pixel spans, and no override was given."""


class NoTissueError(SlideError):
    """Tissue segmentation found no tissue on a slide."""


class EncoderError(ChatEXAONEPathError):
    """A patch encoder is unknown, or its weights are missing or do not match the architecture."""


class FeaturesError(ChatEXAONEPathError):
    """A features file is missing, malformed or was written with other settings."""


class BudgetExceededError(SlideError):
    """An input is bigger than a configured budget (pixels, patches, zip members, disk); the message names both."""


class OutsideReferenceError(SlideError):
    """A slide names a file outside its own folder (a `.vms` image, a MIRAX data file, a linked DICOM file)."""


class ServerBusyError(ChatEXAONEPathError):
    """The app is at its limit of live sessions or of requests per minute; try again later."""
