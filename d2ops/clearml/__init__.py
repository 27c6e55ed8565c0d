"""Everything d2ops does with ClearML, and the only package that imports it.

- :mod:`~d2ops.clearml.session`: offline mode, agent detection, the task this process runs in;
- :mod:`~d2ops.clearml.hyperparams`: the experiment as flat, typed, editable hyperparameters;
- :mod:`~d2ops.clearml.step`: a pipeline step as a ClearML task (the step runtime, time limits, SIGTERM);
- :mod:`~d2ops.clearml.controller`: the PipelineController, its callbacks, and what keeps it alive;
- :mod:`~d2ops.clearml.models`: model registration, the champion store, ``clearml://`` model references;
- :mod:`~d2ops.clearml.datasets`: ClearML Datasets of S3 links;
- :mod:`~d2ops.clearml.schedules`: cron schedules and dataset triggers that clone a pipeline;
- :mod:`~d2ops.clearml.cluster`: step templates, agent packages, launch preflight;
- :mod:`~d2ops.clearml.secrets`: credentials kept out of recorded git diffs.

Lower layers never import this package. Where they need ClearML, :func:`install` plugs it in:
clearml.conf's S3 credentials for :mod:`d2ops.storage.s3`, and ClearML model references for
:mod:`d2ops.model.source`. Importing this package installs them, so every process that uses
ClearML through d2ops has them; the ``d2ops`` command calls :func:`install` for the others.
"""

from __future__ import annotations

from typing import Any

__all__ = ["install"]


def _s3_credential_entries() -> list[Any]:
    """clearml.conf's ``sdk.aws.s3.credentials``, read by ClearML's own loader (``CLEARML_CONFIG_FILE``...)."""
    from clearml.config import config_obj

    return list(config_obj.get("sdk.aws.s3.credentials", []) or [])


def install() -> None:
    """Plug ClearML into the layers below: clearml.conf's S3 credentials and ClearML model references."""
    # lazy: circular otherwise: these modules import d2ops.clearml, whose import runs install()
    from d2ops.clearml.models import ClearMLModelRegistry
    from d2ops.model.source import use_model_registry
    from d2ops.storage.credentials import use_conf_credentials

    use_conf_credentials(_s3_credential_entries)
    use_model_registry(ClearMLModelRegistry())


install()
