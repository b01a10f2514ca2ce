"""Typed errors of the moepath library.

Every error a user can cause derives from :class:`MoepathError`. Messages name
the offending thing and the fix; ``cli/main.py`` prints them as one line on
stderr with exit code 1 (``MOEPATH_DEBUG=1`` shows the traceback).
"""


class MoepathError(Exception):
    """Base class: a failure the user can act on (bad input, bad option, bad trace)."""


class InputError(MoepathError):
    """A samples file or option is unusable (missing, malformed, empty, duplicates)."""


class ModelError(MoepathError):
    """A model folder is missing, is not a model, or has no MoE layers moepath can trace."""


class TraceFormatError(MoepathError):
    """A trace directory is missing, corrupted, incomplete, or of an unsupported version."""


class MetricError(MoepathError):
    """A metric cannot be computed on the data (group of one, bad tau, missing source)."""


class CaptureError(MoepathError):
    """Routing capture failed inside the engine or recorded nothing for a traced request."""


class TrainingError(MoepathError):
    """The grokking testbed's training process failed (``moepath demo``)."""


class TrackerError(MoepathError):
    """A tracker (TensorBoard, W&B, MLflow) cannot be logged to: its client is missing, or
    it raised while ``compare`` logged to it."""


class ClusterError(MoepathError):
    """Tracing on a Ray cluster cannot go on: Ray is missing or unreachable, the cluster
    has no room for an engine, or its engine actors were lost."""
