"""The infer step as a ClearML task script.

Batch inference over a folder or S3 prefix: COCO results JSON and debug images.

An example of using the d2ops library: all logic is in d2ops.pipeline.steps.run_infer.

    python tasks/infer.py --config configs/smoke.yaml --offline          # no server
    python tasks/infer.py --config configs/smoke.yaml                    # here, with a server
    python tasks/infer.py --config configs/smoke.yaml --remote --queue Q # on a clearml-agent
"""

import sys

from d2ops.cli.steps import step_main

if __name__ == "__main__":
    sys.exit(step_main("infer"))
