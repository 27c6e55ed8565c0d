"""The pipeline, free of ClearML.

- :mod:`~d2ops.pipeline.steps`: the five step bodies; each gets a ``StepRuntime`` (fetch, lineage, registration);
- :mod:`~d2ops.pipeline.runner`: step parameters, the offline runner, time limits and stop signals;
- :mod:`~d2ops.pipeline.preflight`: launch checks of a config's inputs, split folders and device;
- :mod:`~d2ops.pipeline.report`: ``summary.json`` and ``report.html`` of a run.
"""
