"""A sampled step's host sums as the values the monitor records: every metric at once with numpy
(`derive_all`), and scope lists that stay the same list objects from sample to sample while the
tensors and their masks do, so that the run log and the history can key their caches on them.

A scope list handed out here is never changed afterwards (consumers may keep it).
"""

from __future__ import annotations

import math

import numpy as np

from optiscope.monitor.metrics import (RANGE_QUANTITIES, RANGE_SHARES, TENSOR_METRICS, Col,
                                       derive_all)

__all__ = ["Decoder", "skip_reasons"]

_MASKS_KEPT = 64  # scope lists of partial metrics cached per keep mask, per set of tensors


class Decoder:
    """The caches of `MonitorCore._decode` (one per monitor; used by one thread at a time)."""

    GLOBAL = ["global"]  # the scopes of a global value (never changed)

    def __init__(self):
        self._groups: list[str] = []
        self._metrics: tuple = (None, ())  # (skip reasons, the metrics they leave)
        self._stepped: tuple = (None, None, [])  # (slot scopes, active, their scopes)
        # id(tensor scopes) -> (them, "global" + them, {keep mask: "global" + the kept ones})
        self._lists: dict[int, tuple[list[str], list[str], dict[bytes, list[str]]]] = {}
        self._state: tuple = (None, None, [])  # (slot scopes, per-key names, state scopes)

    def stepped(self, rows: np.ndarray, active: list[int], scopes: list[str]
                ) -> tuple[np.ndarray, list[str]]:
        """The rows and scopes of the tensors the step updated (``active``, ascending)."""
        if len(active) == len(scopes):  # all of them: the very list of the slots' names
            return rows, scopes
        key = tuple(active)
        cached_scopes, cached_key, stepped = self._stepped
        if cached_scopes is not scopes or cached_key != key:
            stepped = [scopes[i] for i in active]
            self._stepped = (scopes, key, stepped)
        return rows[active], stepped

    def tensor_values(self, rows: np.ndarray, stepped: list[str], skipped: dict
                      ) -> dict[str, tuple[list[str], np.ndarray]]:
        """``metric -> (scopes, values)`` of `TENSOR_METRICS` not in ``skipped``, ``"global"``
        first; a partial metric's tensors without a value are left out (`Metric.partial`)."""
        if self._metrics[0] is not skipped:
            metrics = tuple(m for m in TENSOR_METRICS if m.name not in skipped)
            self._metrics = (skipped, metrics)
        _, metrics = self._metrics
        out, missing, has_missing = derive_all(rows, metrics)  # [metric, global + tensors]
        _, with_global, masked = self._lists_of(stepped)
        values = {}
        for j, metric in enumerate(metrics):
            if not (metric.partial and has_missing[j]):
                if stepped:  # else no tensor stepped: a NaN global, not recorded
                    values[metric.name] = (with_global, out[j])
                continue
            kept = np.concatenate(([True], ~missing[j]))
            if kept[1:].any() or not math.isnan(out[j, 0]):
                values[metric.name] = (self._kept(with_global, masked, kept), out[j][kept])
        return values

    def state_scopes(self, scopes: list[str], per_key: dict[str, int]) -> list[str]:
        """``"global"``, the slots' names, then ``key/<state key>``: state_bytes's scopes."""
        cached_scopes, keys, names = self._state
        if cached_scopes is not scopes or keys != list(per_key):
            names = ["global", *scopes, *(f"key/{k}" for k in per_key)]
            self._state = (scopes, list(per_key), names)
        return names

    def group_scopes(self, n: int) -> list[str]:
        """``group0``, ``group1`` ...: the scopes of ``lr``."""
        if len(self._groups) != n:
            self._groups = [f"group{i}" for i in range(n)]
        return self._groups

    def _lists_of(self, stepped: list[str]) -> tuple[list[str], list[str], dict]:
        entry = self._lists.get(id(stepped))  # the entry holds ``stepped``: its id is its own
        if entry is None:
            if len(self._lists) >= 4:  # the tensors changed several times: start again
                self._lists = {}
            entry = self._lists[id(stepped)] = (stepped, ["global", *stepped], {})
        return entry

    @staticmethod
    def _kept(with_global: list[str], masked: dict, kept: np.ndarray) -> list[str]:
        key = kept.tobytes()
        names = masked.get(key)
        if names is None:
            if len(masked) >= _MASKS_KEPT:
                masked.clear()
            names = masked[key] = [s for s, k in zip(with_global, kept.tolist()) if k]
        return names


def skip_reasons(optimizer, slots: list, collector, rows: np.ndarray, freeze_probe
                 ) -> dict[str, str]:
    """The metrics an optimizer cannot have, and why, from its first sample's ``rows``."""
    reasons: dict[str, str] = {}
    cls = type(optimizer).__name__
    unread = [s for s in slots if s.param in optimizer.state and collector.layout(s) is None]
    if unread:
        keys = sorted({k for s in unread for k in optimizer.state[s.param]})
        why = (f"the state of {cls} (keys {keys}) is not a layout optiscope recognises; "
               "declare one with a `state_layouts` attribute on the optimizer")
        for name in ("moment1_norm", "moment2_norm", "moment2_drift"):
            reasons[name] = why
    else:
        if np.isnan(rows[:, Col.MOMENT1_SQ]).all():
            reasons["moment1_norm"] = f"{cls} keeps no first moment"
        if np.isnan(rows[:, Col.MOMENT2_SQ]).all():
            reasons["moment2_norm"] = f"{cls} keeps no second moment"
            reasons["moment2_drift"] = f"{cls} keeps no second moment"
    reasons.update(collector.unreadable)  # state tensors it could not read
    if freeze_probe is None:
        reasons["moment2_drift_since_freeze"] = "off: pass freeze_probe=T to compare v with v_T"
    # An optimizer that declares the column keeps the metric even when this first sample has
    # none (OneBitAdam compresses only after its freeze step).
    if (Col.QUANT_ERROR_SQ not in collector.produced
            and np.isnan(rows[:, Col.QUANT_ERROR_SQ]).all()):
        reasons["quant_error"] = collector.no_quant_error_reason(cls)
    if np.isnan(rows[:, Col.GRAD_DIAG]).all():
        why = f"{cls} does not rotate its gradients into a basis of its own (AdaDiag does)"
        reasons["grad_diagonality"] = reasons["grad_diagonality_original"] = why
    if np.isnan(rows[:, Col.TOPK_KEPT_SQ]).all() and collector.topk_density is None:
        reasons["topk_coverage"] = "off: topk_density=None"
    reasons.update(collector.compression.skip_reasons(rows, cls))
    if not collector.range_probes:
        reasons.update(dict.fromkeys((f"{q}_{fmt}_{what}" for q in RANGE_QUANTITIES
                                      for fmt, what in RANGE_SHARES), "off: range_probes=False"))
    return reasons
