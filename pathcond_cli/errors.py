"""The user-facing error types and the exit codes they map to.

A :class:`PathcondError` is a mistake or a limit the user can act on: the CLI prints its message and
exits with its code, without a traceback. Anything else is a bug: the CLI prints its traceback and
exits with ``EXIT_INTERNAL``.
"""

from __future__ import annotations

from dataclasses import dataclass

EXIT_OK = 0
EXIT_VERIFICATION_FAILED = 1
EXIT_USAGE = 2
EXIT_UNSUPPORTED = 3
EXIT_INTERNAL = 4  # a bug in pathcond (not 1, which scripts read as "verification failed")
EXIT_INTERRUPTED = 130  # SIGINT (Ctrl-C), the shell's 128 + 2; nothing written
EXIT_TERMINATED = 143  # SIGTERM (kill, a CI runner's timeout), the shell's 128 + 15; nothing written


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised by the CLI's handler: a KeyboardInterrupt, so that every path that cleans up after
    Ctrl-C (staged files removed, committed ones taken back) does so after SIGTERM too."""


class PathcondError(Exception):
    """Base class of errors caused by the input or the options, not by pathcond itself."""

    exit_code = EXIT_USAGE


class UsageError(PathcondError):
    """Bad options, an unreadable input, or an output that may not be written."""

    exit_code = EXIT_USAGE


@dataclass(frozen=True)
class Offender:
    """One node that keeps a model from being treated as a ReLU network. ``opaque_ok``: whether
    ``--partial`` may keep it unchanged as an opaque op (False for a :class:`HardRefusal`)."""

    node: str
    op: str
    why: str
    opaque_ok: bool = True


class Refusal(Exception):
    """Raised by a front end's translation of one node: this node is not supported, because <message>.

    Front ends catch it node by node and collect each as an :class:`Offender` (the node, its op, the
    message) into the offenders table of one :class:`UnsupportedModelError`, so that a run names every
    unsupported node at once. It is not a :class:`PathcondError`: one that escapes a front end is a bug."""


class HardRefusal(Refusal):
    """A :class:`Refusal` that ``--partial`` cannot absorb either: the node draws random values (Dropout in
    training mode, a random generator), so the model's outputs are not a function of its inputs and no
    rescaled copy can be verified against it, whether the node is translated or kept opaque. The front
    ends record it as an :class:`Offender` with ``opaque_ok=False``, and refuse the model in both modes
    (:func:`pathcond_cli.segments.hard_refusal`)."""


class UnsupportedModelError(PathcondError):
    """The model is not a positively homogeneous (ReLU) network, or uses ops pathcond does not know."""

    exit_code = EXIT_UNSUPPORTED

    def __init__(self, message: str, offenders: list[Offender] | None = None, partial_graph=None):
        super().__init__(message)
        self.offenders = list(offenders or [])
        # the IR graph with the offenders kept as opaque, when the front end could build it: what
        # --partial would rescale (pathcond_cli.segments.with_partial_hint says how much)
        self.partial_graph = partial_graph


class VerificationError(PathcondError):
    """The rescaled model does not compute the same function as the original, within tolerance."""

    exit_code = EXIT_VERIFICATION_FAILED

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report


class NumericalError(PathcondError):
    """A statistic or a rescaling factor came out non-finite; nothing is written."""

    exit_code = EXIT_UNSUPPORTED

