"""The download step as a ClearML task script.

Fetch the dataset (and initial weights) from S3/MinIO or a path, validate it, record its identity.

An example of using the d2ops library: all logic is in d2ops.pipeline.steps.run_download.

    python tasks/download.py --config configs/smoke.yaml --offline          # no server
    python tasks/download.py --config configs/smoke.yaml                    # here, with a server
    python tasks/download.py --config configs/smoke.yaml --remote --queue Q # on a clearml-agent
"""

import sys

from d2ops.cli.steps import step_main

if __name__ == "__main__":
    sys.exit(step_main("download"))
