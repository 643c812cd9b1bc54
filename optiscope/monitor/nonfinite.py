"""``on_nonfinite="raise"``: the exception that stops a run at its first non-finite gradient."""

from __future__ import annotations

__all__ = ["NonFiniteGradientError", "nonfinite_message"]


class NonFiniteGradientError(RuntimeError):
    """A sampled step's gradient had NaN or infinite entries (``on_nonfinite="raise"``).

    Attributes:
        step: the optimizer step.
        tensors: the names of the tensors whose gradient had non-finite entries.
    """

    def __init__(self, message: str, step: int, tensors: list[str]):
        super().__init__(message)
        self.step = step
        self.tensors = list(tensors)


def nonfinite_message(step: int, bad: list[tuple[str, float]], *, applied: bool) -> str:
    """The message of the error: the step, each tensor with its count, and whether the update
    of that step was applied."""
    listing = ", ".join(f"{name} ({int(count)} entries)" for name, count in bad[:8])
    more = f" and {len(bad) - 8} more" if len(bad) > 8 else ""
    what = ("the optimizer computes the gradient statistics in its update, so that update was "
            "applied" if applied else "the update of this step was not applied")
    return (f"step {step}: non-finite gradient in {len(bad)} tensor(s): {listing}{more}; "
            f"training stopped (on_nonfinite='raise'); {what}")
