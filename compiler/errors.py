"""Error kinds and their exit codes.

User-facing failures are exceptions carrying one line that names the problem
and the fix; the CLI prints that line and exits with the class's code.
Anything else is an internal bug and keeps its full traceback.
"""

from __future__ import annotations


class InfcError(Exception):
    """Base of every error the CLI reports as one line."""

    exit_code = 1
    label = "error"

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = " ".join(self.problem.split())
        if self.fix:
            text += f" ({' '.join(self.fix.split())})"
        return text


class UserError(InfcError):
    """Bad input: unknown model or target, malformed file, bad option value."""

    exit_code = 2


class MissingDependency(InfcError):
    """A library, a device or a download the request needs is not available."""

    exit_code = 3
    label = "missing dependency"


class VerificationFailed(InfcError):
    """An artifact was produced but failed one of its checks."""

    exit_code = 4
    label = "verification failed"


class UnsupportedModel(InfcError):
    """The model uses an operator a stage cannot translate."""

    exit_code = 5
    label = "unsupported model"


class OutputLocked(InfcError):
    """Another infc process is writing the same output directory."""

    exit_code = 6
    label = "busy"


class AccuracyBudgetMissed(InfcError):
    """A reduced-precision artifact lost more accuracy than the budget allows."""

    exit_code = 7
    label = "accuracy budget missed"

    def __init__(self, problem: str, fix: str | None = None, table: str = ""):
        super().__init__(problem, fix)
        # The per-artifact accuracy table, printed below the one-line message.
        self.table = table


EXIT_INTERRUPTED = 130
EXIT_INTERNAL = 70

EXIT_CODES = {
    0: "success",
    UserError.exit_code: "bad input (model, target, option, file)",
    MissingDependency.exit_code: "missing dependency (library, GPU, TensorRT, weights download)",
    VerificationFailed.exit_code: "an artifact failed verification",
    UnsupportedModel.exit_code: "the model uses an operator a stage cannot translate",
    OutputLocked.exit_code: "another infc process is building into the same directory",
    AccuracyBudgetMissed.exit_code: "reduced precision missed the accuracy budget",
    EXIT_INTERNAL: "internal error (a bug: the traceback is printed)",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C); the previous build is intact",
}
