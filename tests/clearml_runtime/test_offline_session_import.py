"""Offline sessions kept as their zip only, and no second copy of the bundle, still import into a server.

d2ops removes each offline session's folder once ClearML has zipped it (the folder is a second copy of
everything in the zip), and its register step makes the session refer to the bundle zip instead of
holding ClearML's copy of it (``d2ops.clearml.models._fix_offline_record``). Both are only right if
ClearML's own importer, ``Task.import_offline_session`` (clearml/task.py), still recreates the run on a
server: the artifacts uploaded from the zip, the model uploaded from the bundle it refers to, the
scalars replayed. The steps run offline in a fresh process (as ``run_pipeline.py --offline`` does);
the import runs here, against the server stand-in of ``fake_server.py`` and its fileserver.

What the stand-in cannot show: a real fileserver's paths and a real server's model listing; both see
the same SDK calls (``tasks.add_or_update_artifacts``, ``models.update_for_task``, the upload POSTs).
With ``clearml.output_uri`` set (here the stand-in's fileserver; on a cluster an S3 prefix, which ClearML
reaches with its boto3 driver instead) the import uploads the bundle there; with none, ClearML registers
the bundle as a local file, as it does for any model with no upload destination.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from d2ops.utils.offline_session import session_file, session_names

from .fake_server import FakeClearmlServer

REPO = Path(__file__).resolve().parents[2]

_OFFLINE_STEPS = textwrap.dedent(
    """
    import json, os, sys, zipfile
    from pathlib import Path
    from d2ops.clearml.session import enable_offline
    from d2ops.clearml.step import run_step
    from d2ops.pipeline.runner import step_parameters
    from d2ops.pipeline.steps import StepOutput

    out, output_uri = Path(sys.argv[1]), sys.argv[2]
    enable_offline(out / "clearml")
    overrides = [f"runtime.output_dir={out / 'run'}", f"registry.local_dir={out / 'registry'}",
                 f"clearml.output_uri={output_uri or 'null'}"]

    def train(ctx):
        weights = ctx.workdir / "train" / "model_final.pth"
        weights.parent.mkdir(parents=True, exist_ok=True)
        weights.write_bytes(os.urandom(2_000_000))
        for i in range(3):
            ctx.reporter.scalar("train", "total_loss", 1.0 / (i + 1), i)
        return StepOutput(files={"weights": weights})

    def register(ctx):
        bundle = ctx.workdir / "bundle" / "shapes.zip"
        bundle.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(bundle, "w") as zf:
            zf.writestr("model.pth", Path(ctx.input_path("weights")).read_bytes())
        record = ctx.runtime.register_model(
            bundle, name="shapes", tags=["smoke"], labels=["square", "circle"], metadata={"k": 1},
            publish=False, config={"MODEL": {"ROI_HEADS": {"NUM_CLASSES": 2}}}, headline="quality gate passed",
        )
        return StepOutput(values={"bundle": str(bundle), "registration": record})

    config = "configs/smoke.yaml"
    trained = run_step("train", step_parameters("train", config, overrides), mode="offline", function=train)
    inputs = {"weights": trained.artifacts["weights"]}
    registered = run_step("register", step_parameters("register", config, overrides, inputs), mode="offline",
                          function=register)
    print("RESULT " + json.dumps({"train": trained.session, "register": registered.session,
                                  "weights": trained.artifacts["weights"], "bundle": registered.values["bundle"]}))
    """
)


def _run_offline(tmp_path: Path, output_uri: str) -> dict[str, str]:
    script = tmp_path / "offline_steps.py"
    script.write_text(_OFFLINE_STEPS)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLEARML_", "TRAINS_"))}
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "out"), output_uri],
        cwd=REPO,
        env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


@pytest.mark.timeout(400)
@pytest.mark.parametrize("output_uri", ["", "the fileserver"])
def test_zip_only_sessions_import_with_artifacts_and_the_model(
    clearml_server: FakeClearmlServer, tmp_path: Path, output_uri: str
) -> None:
    run = _run_offline(tmp_path, output_uri and clearml_server.files_url)
    train, register = Path(run["train"]), Path(run["register"])
    weights, bundle = Path(run["weights"]).read_bytes(), Path(run["bundle"]).read_bytes()

    # What stays on disk: each session is its zip; the folder ClearML zipped is gone.
    for session in (train, register):
        assert session.suffix == ".zip" and zipfile.is_zipfile(session), session
        assert not session.with_suffix("").exists(), f"{session.with_suffix('')}: the session folder was kept"
    # The next step read the one copy of the weights, not a copy inside a session.
    assert Path(run["weights"]) == tmp_path / "out" / "run" / "train" / "model_final.pth"
    # The train zip holds the weights once (ClearML uploads them from it on import) ...
    stored = [name for name in session_names(train) if session_file(train, name) == weights]
    assert len(stored) == 1 and "/artifacts/weights/" in stored[0], session_names(train)
    # ... and the register zip refers to the bundle instead of holding a copy of it.
    assert not [name for name in session_names(register) if session_file(register, name) == bundle]
    record = json.loads(session_file(register, "task.json") or b"{}")
    (model,) = record["offline_output_models"]
    assert Path(model["weights"]["weights_filename"]) == Path(run["bundle"]).resolve()

    # ClearML's own importer, against the server.
    from clearml import Task

    train_id = Task.import_offline_session(str(train))
    register_id = Task.import_offline_session(str(register))

    artifacts = {a["key"]: a for a in clearml_server.tasks[train_id]["execution"]["artifacts"].values()}
    uri = artifacts["weights"]["uri"]
    assert uri.startswith(clearml_server.files_url), uri
    assert clearml_server.files[uri[len(clearml_server.files_url) :].lstrip("/")] == weights
    losses = [s for s in clearml_server.scalars(train_id) if s.get("variant") == "total_loss"]
    assert len(losses) == 3, clearml_server.scalars(train_id)

    models = [m for m in clearml_server.models.values() if m.get("task") == register_id]
    assert len(models) == 1, list(clearml_server.models.values())
    assert models[0]["name"] == "shapes" and models[0]["labels"] == {"square": 1, "circle": 2}
    model_uri = models[0]["uri"]
    if output_uri:  # clearml.output_uri set: the import uploads the bundle the record refers to, there
        assert model_uri.startswith(clearml_server.files_url), model_uri
        assert clearml_server.files[model_uri[len(clearml_server.files_url) :].lstrip("/")] == bundle
    else:  # none: ClearML registers the local file, as for any model with no upload destination
        assert model_uri == Path(run["bundle"]).resolve().as_uri()
