"""Everything d2ops does with ClearML, and the only package that imports it.

- :mod:`~d2ops.clearml.session`: offline mode, agent detection, the task this process runs in;
- :mod:`~d2ops.clearml.hyperparams`: the experiment as flat, typed, editable hyperparameters;
- :mod:`~d2ops.clearml.step`: a pipeline step as a ClearML task (the step runtime, time limits, SIGTERM);
- :mod:`~d2ops.clearml.controller`: the PipelineController, its callbacks, and what keeps it alive;
- :mod:`~d2ops.clearml.models`: model registration, the champion store, model references;
- :mod:`~d2ops.clearml.datasets`: ClearML Datasets of S3 links;
- :mod:`~d2ops.clearml.schedules`: cron schedules and dataset triggers that clone a pipeline;
- :mod:`~d2ops.clearml.cluster`: step templates, agent packages, launch preflight;
- :mod:`~d2ops.clearml.secrets`: credentials kept out of recorded git diffs.

Lower layers never import this package. Where they need ClearML (ClearML model references,
the S3 credentials in clearml.conf), :func:`install` plugs it in; the ``d2ops`` command calls it.
"""

from __future__ import annotations

__all__ = ["install"]


def install() -> None:
    """Plug ClearML into the layers below: ClearML model references (``clearml://``, model ids)."""
    from d2ops.clearml.models import ClearMLModelRegistry
    from d2ops.model_source import use_model_registry

    use_model_registry(ClearMLModelRegistry())
