"""The train step as a ClearML task script.

Train the detectron2 model; metrics, config and checkpoints go to ClearML / output_uri.

An example of using the d2ops library: all logic is in d2ops.pipeline.steps.run_train.

    python tasks/train.py --config configs/smoke.yaml --offline          # no server
    python tasks/train.py --config configs/smoke.yaml                    # here, with a server
    python tasks/train.py --config configs/smoke.yaml --remote --queue Q # on a clearml-agent
"""

import sys

from d2ops.cli.steps import step_main

if __name__ == "__main__":
    sys.exit(step_main("train"))
