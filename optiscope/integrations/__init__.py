"""Callbacks that attach an `OptimizerMonitor` inside the trainers people use.

* `optiscope.integrations.huggingface.OptimizerMonitorCallback`: the Hugging Face ``Trainer``;
* `optiscope.integrations.lightning.OptimizerMonitorCallback`: Lightning's ``Trainer``.

Each module imports its library when it is imported; ``import optiscope`` imports neither. An
Accelerate loop needs no callback: `OptimizerMonitor` unwraps ``accelerator.prepare``'s optimizer.
"""
