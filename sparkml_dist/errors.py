"""One error hierarchy for the whole project; pure standard library (ranks and the driver import it).

``SparkmlDistError`` is the base. Under it:

- ``UserError``: the input, the config or a path is wrong. Retrying cannot help; a job prints the message
  (what, where, the fix) on one or a few lines and exits with ``EXIT_USER_ERROR``.
- ``InfraError``: the infrastructure failed (a lost or stalled process, a broken collective, an
  unreachable service). Retrying may help; the launcher retries on this type, never on message text.

User errors also subclass ``ValueError`` and infrastructure errors ``RuntimeError``, so callers that
caught those before keep working.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2
"""Exit code of a job that stopped on a ``UserError`` (as argparse uses for bad arguments)."""
EXIT_INFRA_ERROR = 3
"""Exit code of a job that stopped on an ``InfraError`` (retrying the job may succeed)."""


class SparkmlDistError(Exception):
    """Base of every error this project raises on purpose."""

    retryable: bool = False


class UserError(SparkmlDistError, ValueError):
    """Bad input, config or paths: never retried; the message names the bad value and the fix."""

    retryable = False


class InfraError(SparkmlDistError, RuntimeError):
    """The infrastructure failed; running again may succeed."""

    retryable = True


class OutputPathError(UserError):
    """An output path would overwrite, delete or overlap data this job did not write."""


def exit_code_of(exc: BaseException) -> int:
    """The job exit code for ``exc``: 2 for user errors, 3 for infrastructure errors, 1 otherwise."""
    if isinstance(exc, UserError):
        return EXIT_USER_ERROR
    if isinstance(exc, InfraError):
        return EXIT_INFRA_ERROR
    return 1
