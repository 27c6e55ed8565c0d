"""End to end: local S3 -> offline pipeline (download, validate, train, evaluate, infer, register).

Every assertion here reads what the run really left on disk: the summary, the model bundle and
the ClearML offline sessions.
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest

from d2ops.utils.offline_session import session_file, session_names

pytestmark = pytest.mark.slow

SCHEMAS = Path(__file__).resolve().parents[2] / "docs" / "schemas"


def _session(run: dict[str, Any], step: str) -> Path:
    session = run["summary"]["clearml_sessions"][step]
    assert session, f"no offline session recorded for {step}"
    return Path(session)


def _task(session: Path) -> dict[str, Any]:
    return json.loads(session_file(session, "task.json") or b"{}")


def _matching(session: Path, pattern: str) -> list[str]:
    return [name for name in session_names(session) if re.fullmatch(pattern, name)]


def _events(session: Path) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    for line in (session_file(session, "metrics.jsonl") or b"").decode().splitlines():
        events.extend(json.loads(line))
    return events


def test_quality_on_held_out_images(pipeline_run: dict[str, Any]) -> None:
    summary = pipeline_run["summary_file"]
    assert summary["bbox"]["AP50"] >= 90.0, summary["bbox"]
    assert set(summary["bbox"]["per_class"]) == {"square", "circle", "triangle"}
    assert 0.0 < summary["f2"] <= 1.0
    assert summary["quality_gate"]["passed"] is True
    # The run's own offline registry had no champion: the candidate became production.
    assert summary["champion_gate"]["promote"] is True
    assert summary["champion_gate"]["champion_id"] is None
    for key in ("AP", "AP50", "AP75"):
        assert key in summary["bbox"]
    assert summary["segm"] is None, "a box model has no mask AP"


def _strict_json(path: Path) -> Any:
    """Parse as jq or a browser's JSON.parse would: NaN, Infinity and -Infinity are refused."""

    def refuse(constant: str) -> Any:
        raise ValueError(f"{path}: {constant} is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_every_output_is_strict_json(pipeline_run: dict[str, Any]) -> None:
    """The smoke shapes are at most 64 px a side: COCO's APl (area > 96 px squared) is not measured, and
    comes out null, not NaN. Every JSON file d2ops wrote parses strictly (detectron2's own train/
    metrics.json, JSON lines, and ClearML's session files are theirs)."""
    out = pipeline_run["out"]
    summary = _strict_json(out / "summary.json")
    assert "APl" in summary["bbox"] and summary["bbox"]["APl"] is None
    metrics = _strict_json(out / "run" / "evaluate" / "metrics.json")
    assert metrics["bbox"]["APl"] is None
    # what a consumer checks them with: the published JSON Schemas (docs/schemas), by jsonschema's validator
    for data, name in ((summary, "summary.schema.json"), (metrics, "metrics.schema.json")):
        jsonschema.validate(data, json.loads((SCHEMAS / name).read_text()))
    written = [
        path for path in sorted((out / "run").rglob("*.json")) if "train" not in path.relative_to(out / "run").parts[:1]
    ]
    written += sorted((out / "registry").rglob("*.json"))
    assert any(p.name == "metadata.json" for p in written) and any(p.name == "record.json" for p in written)
    for path in written:
        _strict_json(path)


class _ReportParser(HTMLParser):
    """What report.html shows: the tables' rows, the PR polylines, the embedded images."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.polylines: list[str] = []
        self.images: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "polyline":
            self.polylines.append(str(values["data-series"]))
        elif tag == "img":
            self.images.append(str(values["alt"]))
            assert str(values["src"]).startswith("data:image/jpeg;base64,"), "the report is one file"

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell))
            self._cell = None


def test_report_html_shows_the_figures_clearml_received(pipeline_run: dict[str, Any]) -> None:
    """report.html is built from the evaluate and infer sessions' own events: the same per-class AP,
    PR curves, confusion matrix and debug images a ClearML server would have shown."""
    parser = _ReportParser()
    parser.feed((pipeline_run["out"] / "report.html").read_text())
    summary = pipeline_run["summary_file"]
    metrics = _strict_json(pipeline_run["out"] / "run" / "evaluate" / "metrics.json")
    classes = list(summary["bbox"]["per_class"])
    headline, per_class, confusion = parser.tables
    assert headline[0] == ["bbox AP / AP50 / AP75", f"{summary['bbox']['AP']:.1f} / {summary['bbox']['AP50']:.1f} / "
                           f"{summary['bbox']['AP75']:.1f}"]  # fmt: skip
    assert per_class[1:] == [[name, f"{ap:.1f}"] for name, ap in summary["bbox"]["per_class"].items()]
    assert sorted(parser.polylines) == sorted(classes)
    assert confusion[0][1:] == metrics["confusion_labels"]
    assert [[int(v) for v in row[1:]] for row in confusion[1:]] == metrics["confusion_matrix"]
    shown = {alt.rpartition(" ")[0] for alt in parser.images}
    assert len(shown) == 4 and len(parser.images) == 8, "smoke.yaml's debug_images: raw beside predictions"


def test_every_step_left_an_offline_session(pipeline_run: dict[str, Any]) -> None:
    sessions = pipeline_run["summary"]["clearml_sessions"]
    assert list(sessions) == ["download", "train", "evaluate", "infer", "register"]
    for session in map(Path, sessions.values()):
        # the importable zip is the session; the folder ClearML zipped would be a second copy of it
        assert session.suffix == ".zip" and session_file(session, "task.json") is not None, session
        assert not session.with_suffix("").exists(), f"{session.with_suffix('')}: session folder kept"


def test_train_session_has_losses_config_and_periodic_ap(pipeline_run: dict[str, Any]) -> None:
    session = _session(pipeline_run, "train")
    scalars = {(e["metric"], e["variant"]) for e in _events(session) if e["type"] == "training_stats_scalar"}
    for series in ("total_loss", "loss_cls", "loss_box_reg", "loss_rpn_cls", "lr", "data_time", "time"):
        assert ("train", series) in scalars, f"{series} not reported; got {sorted(scalars)[:20]}"
    assert ("bbox", "AP50") in scalars, "periodic evaluation AP did not reach ClearML"
    task = _task(session)
    d2_config = task["configuration"]["detectron2"]["value"]
    assert "RESNETS:" in d2_config and "DEPTH: 18" in d2_config
    assert "experiment" in task["configuration"]
    params = task["hyperparams"]["General"]
    assert params["config"]["value"].endswith("smoke.yaml")


def test_evaluate_session_has_metrics_plots_and_artifact(pipeline_run: dict[str, Any]) -> None:
    session = _session(pipeline_run, "evaluate")
    events = _events(session)
    singles = {e["variant"]: e["value"] for e in events if e.get("metric") == "Summary"}
    assert singles["bbox/AP50"] >= 90.0
    assert {"f2", "precision", "recall", "bbox/AP-circle"} <= set(singles)
    plots = {json.loads(e["plot_str"])["layout"]["title"] for e in events if e["type"] == "plot"}
    assert any("PR curve" in str(t) for t in plots), plots
    assert any("confusion" in str(t) for t in plots), plots
    metrics_files = _matching(session, r"data/.*/artifacts/metrics/[^/]*\.json")
    assert metrics_files, "metrics JSON artifact missing"
    metrics = json.loads(session_file(session, metrics_files[0]) or b"{}")
    assert metrics["bbox"]["AP50"] == pytest.approx(singles["bbox/AP50"])


def test_infer_session_has_debug_images_and_coco_results(pipeline_run: dict[str, Any]) -> None:
    session = _session(pipeline_run, "infer")
    images = _matching(session, r"data/.*/metrics/.*\.(jpeg|png)")
    assert len(images) >= 2, "raw and predicted debug images expected"
    results = _matching(session, r"data/.*/artifacts/coco_results/[^/]*\.json")
    assert results and json.loads(session_file(session, results[0]) or b"[]"), "COCO results artifact missing or empty"


def test_bundle_reloads_and_predicts_the_same_boxes(pipeline_run: dict[str, Any]) -> None:
    from detectron2.data.detection_utils import read_image

    from d2ops.model.detector import Detector
    from d2ops.model.export import Tolerance

    bundle = Path(pipeline_run["summary"]["model_bundle"])
    for name in ("model_final.pth", "config.yaml", "labels.json", "metrics.json", "metadata.json"):
        assert (bundle / name).is_file(), name
    meta = json.loads((bundle / "metadata.json").read_text())
    assert meta["dataset_identity"] and meta["code_version"] and meta["config_hash"]
    # registry.export: [onnx] (demo.yaml): the promoted model is registered with its ONNX graph, checked on the
    # eval split's images and timed beside PyTorch; what `d2ops serve --runtime auto` then runs
    from d2ops.evaluation.inference import list_images

    test_images = len(list_images(pipeline_run["out"] / "dataset" / "test"))
    onnx = meta["runtimes"]["onnx"]
    assert (bundle / onnx["file"]).is_file() and onnx["parity"]["images"] == min(test_images, 50), onnx
    assert onnx["speed"]["images"] == onnx["parity"]["images"] - 1 and onnx["speed"]["speedup"] > 0, onnx
    assert Detector.from_bundle(bundle, device="cpu").runtime_name in ("onnx", "pytorch")

    predictions = json.loads(Path(pipeline_run["summary"]["predictions"]).read_text())
    folder = pipeline_run["out"] / "dataset" / "test"
    detector = Detector.from_bundle(bundle, device="cpu", runtime="pytorch")
    # Batch inference ran on inference.runtime (default pytorch: the same model, to 0.05 px); an exported runtime
    # is held to the export's parity tolerance (tests/integration/test_infer_runtime.py).
    runtime = pipeline_run["summary"]["inference_runtime"]
    assert runtime == "pytorch", pipeline_run["summary"]
    atol = Tolerance().box_px if runtime != "pytorch" else 0.05
    checked = 0
    for image in predictions["images"][:5]:
        expected = [a for a in predictions["annotations"] if a["image_id"] == image["id"]]
        got = detector.predict([read_image(str(folder / image["file_name"]), format="BGR")], 0.5)[0]
        assert len(got) == len(expected)
        for det, ann in zip(
            sorted(got, key=lambda d: -d.score), sorted(expected, key=lambda a: -a["score"]), strict=True
        ):
            x, y, w, h = ann["bbox"]
            np.testing.assert_allclose(det.box, [x, y, x + w, y + h], atol=atol)
            assert det.label == predictions["categories"][ann["category_id"] - 1]["name"]
        checked += 1
    assert checked == 5


def test_register_session_records_the_model(pipeline_run: dict[str, Any]) -> None:
    session = _session(pipeline_run, "register")
    task = _task(session)
    models = task["offline_output_models"]
    assert len(models) == 1
    init = models[0]["init"]
    assert init["name"] == "d2ops-shapes-smoke"
    assert init["label_enumeration"] == {"square": 1, "circle": 2, "triangle": 3}
    assert "smoke" in init["tags"]
    assert init["config_dict"]["MODEL"]["ROI_HEADS"]["NUM_CLASSES"] == 3, "the detectron2 config is the model's"
    assert '"dataset_identity"' in init["comment"] and "quality gate passed" in init["comment"]
    bundle = Path(pipeline_run["summary"]["model_bundle"])
    # the session refers to the bundle zip d2ops keeps (ClearML's import uploads it from there)
    assert Path(models[0]["weights"]["weights_filename"]) == bundle.with_name(bundle.name + ".zip").resolve()
    assert models[0]["weights"]["is_package"] is True


def test_sessions_hold_one_copy_of_the_weights_and_none_of_the_bundle(pipeline_run: dict[str, Any]) -> None:
    """Each file is kept once: the sessions (zips only) hold the trained weights once, for import,
    and no copy of the bundle, which the register session refers to instead."""
    sessions = [Path(s) for s in pipeline_run["summary"]["clearml_sessions"].values()]
    bundle = Path(pipeline_run["summary"]["model_bundle"])
    weights = (bundle / "model_final.pth").stat().st_size
    big = [(s.name, n) for s in sessions for n in session_names(s) if len(session_file(s, n) or b"") > weights // 2]
    assert len(big) == 1 and big[0][1].endswith("/artifacts/weights/model_final.pth"), big
    import torch

    saved = torch.load(bundle / "model_final.pth", map_location="cpu", weights_only=False)
    assert set(saved) == {"model", "iteration"}, "the model alone: no optimizer or scheduler state"
    checkpoint = Path(pipeline_run["out"]) / "run" / "train" / "model_final.pth"
    assert weights < 0.6 * checkpoint.stat().st_size, "about half of the resumable checkpoint"
    on_disk = sum(s.stat().st_size for s in sessions)
    # before: each session folder beside its zip, and the bundle in the register session twice (as an
    # artifact and as the model's weights): about 5.4 times the weights (593 MB for the demo's 110 MB)
    assert on_disk < 1.5 * weights, f"sessions take {on_disk} bytes for {weights} bytes of weights"
