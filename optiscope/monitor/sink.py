"""What every sink consumes: a run's records, live from a monitor or replayed from a run log.

A sink sees the kinds of record the run log holds (``optiscope.monitor.runlog``):

* ``on_meta(changes)``: the run's metadata; first the whole of it, later keys learnt during the
  run (``skipped_metrics``, ``steps_taken``);
* ``on_sample(step, time, values)``: one sampled step, ``values[metric] = (scopes, numbers)``
  with ``"global"`` first for the monitor's metrics, user scalars such as ``loss`` as
  ``(["global"], [x])``, ``lr`` as ``(["group0", ...], [...])`` and ``state_bytes`` with
  ``"global"``, then one scope per tensor, then ``"key/<state key>"`` scopes;
* ``on_alert(alert)``: an `Alert`;
* ``on_histograms(step, histograms)``: after a sample, its log2 histograms of g, θ⁺ − θ⁻ and v
  (``optiscope.monitor.ranges``), ``{quantity: (scopes, counts [n, HIST_BINS])}``.

The monitor calls its sinks after each decoded sample; `RecordDecoder`
(``optiscope.monitor.records``, which checks each record against the run-log schema) feeds a sink
the records of a run log, so ``optiscope watch`` and ``optiscope report`` show what the live views
showed.
Sinks only consume: they never reach back into the optimizer or the monitor.
"""

from __future__ import annotations

from collections.abc import Sequence

from optiscope.monitor.history import Alert

__all__ = ["Sink", "Values"]

Values = dict[str, tuple[Sequence[str], Sequence[float]]]


class Sink:
    """Base class of the dashboards: every method is a no-op here."""

    def on_meta(self, changes: dict) -> None:
        """Run metadata: the whole of it first, then keys added or replaced during the run."""

    def on_sample(self, step: int, time: float, values: Values) -> None:
        """One sampled step (see the module docstring for ``values``)."""

    def on_alert(self, alert: Alert) -> None:
        """An alert, after the sample that raised it."""

    def on_histograms(self, step: int, histograms: dict) -> None:
        """A sampled step's log2 histograms, after its sample: ``{quantity: (scopes, counts)}``
        (``optiscope.monitor.ranges``; counts a ``[len(scopes), HIST_BINS]`` array)."""

    def on_resume(self, step: int) -> None:
        """The run continues at ``step + 1`` from a checkpoint: what this sink was given for
        later steps (by an attempt that went on past the checkpoint) is superseded."""

    def close(self) -> None:
        """The run is over (or the viewer stops): flush and release what the sink holds."""
