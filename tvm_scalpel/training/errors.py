"""The training side's error type."""

from ..errors import ScalpelError


class TrainingError(ScalpelError, ValueError):
    """A pruning configuration, model or lifecycle call that the training side cannot honour."""
