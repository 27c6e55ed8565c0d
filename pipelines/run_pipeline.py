"""Launch the d2ops pipeline: download+validate -> train -> evaluate -> infer -> register.

    python pipelines/run_pipeline.py --offline --config configs/smoke.yaml --dataset-uri s3://host:port/bucket/prefix
    python pipelines/run_pipeline.py --local  --config configs/demo.yaml   # ClearML server, local steps
    python pipelines/run_pipeline.py          --config configs/demo.yaml   # controller on services, steps on queues

All logic is in d2ops.pipeline.runner; see the README for the modes.
"""

import sys

from d2ops.cli.pipeline import pipeline_main

if __name__ == "__main__":
    sys.exit(pipeline_main(prog="pipelines/run_pipeline.py"))
