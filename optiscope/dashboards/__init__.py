"""The views of a run: sinks that consume the monitor's records, live or replayed from a run log.

* `ConsoleDashboard`: the live terminal dashboard (rich), or one line per sample off a terminal;
* `TensorBoardSink`: TensorBoard events, with a custom-scalars layout, text and hyperparameters
  (`export_tensorboard` writes them from a run log);
* `write_report`: the self-contained HTML report (plotly) of one run or several overlaid;
* `write_png`: the trends as a PNG (matplotlib, Agg);
* `watch`: the terminal dashboard following a run log that another process writes;
* `MLflowSink`, `WandbSink`: the run in MLflow or Weights & Biases (optional extras);
* `export_run`: a run log as a long table (CSV, Parquet).

The heavy libraries (TensorBoard, plotly, matplotlib, MLflow, wandb, pyarrow) are imported when
first used.
"""

from optiscope.dashboards.sink import RecordDecoder, Sink

__all__ = ["ConsoleDashboard", "MLflowSink", "RecordDecoder", "Sink", "TensorBoardSink",
           "WandbSink", "export_run", "export_tensorboard", "watch", "write_png", "write_report"]

_LAZY = {
    "ConsoleDashboard": "optiscope.dashboards.console",
    "TensorBoardSink": "optiscope.dashboards.tensorboard",
    "export_tensorboard": "optiscope.dashboards.tensorboard",
    "write_report": "optiscope.dashboards.report",
    "write_png": "optiscope.dashboards.png",
    "watch": "optiscope.dashboards.follow",
    "MLflowSink": "optiscope.dashboards.mlflow",
    "WandbSink": "optiscope.dashboards.wandb",
    "export_run": "optiscope.dashboards.export",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'optiscope.dashboards' has no attribute {name!r}")
