"""The sink interface, as the dashboards import it: `Sink` and `Values` are defined with the
monitor that calls them (`optiscope.monitor.sink`, which describes the records), `RecordDecoder`
with the run log (`optiscope.monitor.records`); both are re-exported here, the dashboards' way to
subclass a sink and to replay a run log into one.
"""

from __future__ import annotations

from optiscope.monitor.records import RecordDecoder
from optiscope.monitor.sink import Sink, Values

__all__ = ["Sink", "Values", "RecordDecoder"]
