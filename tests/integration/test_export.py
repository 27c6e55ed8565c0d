"""``d2ops export torchscript|onnx|openvino``: real detectron2 graphs, run by their real runtimes, against PyTorch.

Every export here is traced from a real detectron2 model and run by TorchScript, ONNX Runtime 1.31 or OpenVINO
(CPU, f32), beside the eager PyTorch predictor on the same images. The fast tests use the seeded-random bundles of
``d2ops.testing`` (score threshold 0, so never empty: 100 boxes and masks per image to compare); the slow ones use
the pipeline's trained Faster R-CNN (bbox AP on the demo test split) and a trained Mask R-CNN.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from d2ops.cli.export import export_main
from d2ops.model.bundle import ModelBundle
from d2ops.model.detector import Detector
from d2ops.model.export import ExportError, Tolerance, compare, export_bundle, read_images
from d2ops.model.runtimes import RuntimeUnavailableError, available_runtimes
from d2ops.testing import build_tiny_bundle

RUNTIMES = ("torchscript", "onnx", "openvino")
SMOKE_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"


def _images(n: int = 4) -> list[tuple[str, np.ndarray]]:
    """Images of different sizes and aspect ratios (portrait, landscape, square), so the graphs' H and W vary."""
    rng = np.random.default_rng(3)
    sizes = [(120, 160), (200, 90), (128, 128), (75, 300)]
    out = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        pixels = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
        pixels[h // 4 : h // 2, w // 4 : w // 2] = (30, 200, 90)
        out.append((f"img{i}.png", pixels))
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bundle(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny_masks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bundle(tmp_path_factory.mktemp("tiny_masks"), masks=True)


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize(
    "masks",
    # Mask R-CNN: 5 s or more on 2 cores (`make test` runs it, `make test-fast` does not)
    [pytest.param(False, id="faster-rcnn"), pytest.param(True, id="mask-rcnn", marks=pytest.mark.slow)],
)
def test_an_export_runs_on_its_runtime_and_gives_pytorchs_answers(
    runtime: str, masks: bool, tiny: Path, tiny_masks: Path, tmp_path: Path
) -> None:
    source = ModelBundle.open(tiny_masks if masks else tiny)
    result = export_bundle(source, runtime, tmp_path / "out", images=_images())
    exported = ModelBundle.open(result.path)
    exported.verify()
    entry = exported.runtimes()[runtime]
    assert entry["parity"]["detections"] > 0 and entry["parity"]["max_box_px"] <= Tolerance().box_px
    assert ("masks" in entry["outputs"]) is masks
    assert exported.labels() == source.labels() and exported.version() == source.version()
    assert exported.metrics() == source.metrics()
    assert {k: v for k, v in exported.metadata().items() if k not in ("runtimes", "model_version")} == (
        source.metadata()
    )

    detector = Detector.from_bundle(exported, device="cpu", runtime=runtime)
    assert type(detector.runtime).__name__ != "PyTorchRuntime" and detector.runtime_name == runtime
    reference = Detector.from_bundle(source, device="cpu", runtime="pytorch")
    # images the export never saw, at other sizes again (the graph was traced on the first image only)
    unseen = [(n, cv2.resize(p, (p.shape[1] * 3 // 2, p.shape[0]))) for n, p in _images()]
    # A random mask head puts many pixels near probability 0.5, where the 0.5 cut flips on float rounding: masks
    # are held to IoU 0.95 here (a trained model's, in the slow test below, to the exporter's default 0.98).
    loose = Tolerance(mask_iou=0.95)
    parity = compare(reference, detector, unseen, loose)
    assert sum(p.pytorch for p in parity) >= 4 * 50, "the random model keeps 100 detections an image"
    assert not [p.problems for p in parity if p.problems]
    if masks:
        assert min(p.min_mask_iou for p in parity if p.min_mask_iou is not None) >= loose.mask_iou


def _set_speedups(bundle: Path, speedups: dict[str, float | None]) -> None:
    meta = json.loads((bundle / "metadata.json").read_text())
    for name, value in speedups.items():
        entry = meta["runtimes"][name]
        entry["speed"] = None if value is None else {**entry["speed"], "speedup": value}
    (bundle / "metadata.json").write_text(json.dumps(meta))


def test_auto_picks_the_fastest_runtime_the_bundle_has_by_its_measured_speed(tiny: Path, tmp_path: Path) -> None:
    onnx = export_bundle(tiny, "onnx", tmp_path / "onnx", images=_images(3)).path
    both = export_bundle(onnx, "torchscript", tmp_path / "both", images=_images(3)).path
    recorded = ModelBundle(both).runtimes()
    for name in ("onnx", "torchscript"):  # measured beside PyTorch during the parity check, first image left out
        speed = recorded[name]["speed"]
        assert speed["images"] == 2 and speed["threads"] >= 1, speed
        assert speed["speedup"] == pytest.approx(speed["pytorch_seconds_per_image"] / speed["seconds_per_image"])
    measured = {"pytorch": 1.0} | {name: recorded[name]["speed"]["speedup"] for name in ("onnx", "torchscript")}
    assert available_runtimes(ModelBundle(both), "cpu") == sorted(measured, key=lambda n: -measured[n])
    assert Detector.from_bundle(tiny, device="cpu").runtime_name == "pytorch"
    assert available_runtimes(ModelBundle(both), "cuda:0") == ["pytorch"], "the graphs were traced on the CPU"
    # the order follows the figures: a graph slower than PyTorch comes after it
    _set_speedups(both, {"onnx": 0.8, "torchscript": 1.3})
    assert available_runtimes(ModelBundle(both), "cpu") == ["torchscript", "pytorch", "onnx"]
    assert Detector.from_bundle(both, device="cpu").runtime_name == "torchscript"
    # a bundle exported before speeds were recorded: the fixed preference
    _set_speedups(both, {"onnx": None})
    assert available_runtimes(ModelBundle(both), "cpu") == ["onnx", "torchscript", "pytorch"]
    with pytest.raises(RuntimeUnavailableError, match=r"has no openvino model for cpu .*d2ops export openvino"):
        Detector.from_bundle(both, device="cpu", runtime="openvino")


def test_an_export_that_loses_parity_fails_and_writes_nothing(tiny: Path, tmp_path: Path) -> None:
    impossible = Tolerance(box_px=-1.0)  # no box can be closer than -1 px: the gate must refuse every detection
    with pytest.raises(ExportError, match=r"does not give the PyTorch model's answers .* nothing was written"):
        export_bundle(tiny, "onnx", tmp_path / "out", images=_images(1), tolerance=impossible)
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir()), "no staging folder left behind"


def test_an_export_with_no_detections_cannot_show_parity(tiny: Path, tmp_path: Path) -> None:
    strict = tmp_path / "strict"
    shutil.copytree(tiny, strict)
    config = (strict / "config.yaml").read_text().replace("SCORE_THRESH_TEST: 0.0", "SCORE_THRESH_TEST: 1.0")
    (strict / "config.yaml").write_text(config)
    meta = json.loads((strict / "metadata.json").read_text())
    meta.pop("files")  # the config was edited on purpose
    (strict / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ExportError, match="detects nothing on the 2 --images given"):
        export_bundle(strict, "onnx", tmp_path / "out", images=_images(2))
    assert not (tmp_path / "out").exists()


def test_the_cli_names_each_mistake(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = tmp_path / "images"
    images.mkdir()
    with pytest.raises(SystemExit) as exited:
        export_main(["onnx", "--model", str(tiny), "--out", str(tmp_path / "a")])
    assert exited.value.code == 2 and "required: --images" in capsys.readouterr().err
    assert export_main(["onnx", "--model", str(tiny), "--out", str(tmp_path / "a"), "--images", str(images)]) == 2
    assert "holds no image files" in capsys.readouterr().err
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    assert export_main(["onnx", "--model", str(tiny), "--out", str(tmp_path / "a"), "--images", str(images)]) == 2
    assert "broken.jpg is not a readable image" in capsys.readouterr().err
    (images / "broken.jpg").unlink()
    for name, pixels in _images(2):
        cv2.imwrite(str(images / name), pixels)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    assert export_main(["onnx", "--model", str(tiny), "--out", str(taken), "--images", str(images)]) == 2
    assert "holds files d2ops did not write" in capsys.readouterr().err and (taken / "notes.txt").exists()
    assert export_main(["onnx", "--model", str(tiny), "--out", str(tmp_path / "a"), "--images", str(images)]) == 0
    out = capsys.readouterr().out
    assert "onnx bundle written to" in out and "--runtime onnx" in out
    assert (tmp_path / "a" / "model.onnx").is_file()


# --------------------------------------------------------------------------------------------- trained models


def _ap(detector: Detector, root: Path, cfg: Any, tmp: Path) -> float:
    from d2ops.data.registration import register_splits
    from d2ops.evaluation.metrics import evaluate

    dataset = register_splits(root, cfg.data)
    return float(evaluate(detector, dataset.name("test"), cfg.eval, tmp).bbox["AP"])


@pytest.mark.slow
def test_the_trained_faster_rcnn_keeps_its_ap_on_every_runtime(pipeline_run: dict[str, Any], tmp_path: Path) -> None:
    """bbox AP on the demo test split, through detectron2's COCOEvaluator, within 0.5 of PyTorch's."""
    from d2ops.config import load_config

    bundle = Path(pipeline_run["summary"]["model_bundle"])
    root = pipeline_run["out"] / "dataset"
    cfg = load_config(SMOKE_CONFIG, [f"data.source={root}", "runtime.device=cpu"])
    images = read_images(root / "test")
    baseline = _ap(Detector.from_bundle(bundle, device="cpu", runtime="pytorch"), root, cfg, tmp_path / "pt")
    assert baseline > 10, "the smoke model is trained: its AP is well above zero"
    for runtime in RUNTIMES:
        exported = export_bundle(bundle, runtime, tmp_path / runtime, images=images)
        assert exported.summary()["detections"] > 0
        detector = Detector.from_bundle(exported.path, device="cpu", runtime=runtime)
        ap = _ap(detector, root, cfg, tmp_path / f"eval-{runtime}")
        assert abs(ap - baseline) <= 0.5, (runtime, ap, baseline)


@pytest.mark.slow
def test_a_trained_mask_rcnn_exports_with_its_masks(tmp_path: Path) -> None:
    from d2ops.config import load_config
    from d2ops.data.synthetic import generate_shapes_dataset
    from d2ops.model.bundle import build_bundle
    from d2ops.pipeline.steps import StepContext, run_train

    root = generate_shapes_dataset(tmp_path / "data", counts={"train": 8, "valid": 2, "test": 4})
    for coco_file in Path(root).glob("*/_annotations.coco.json"):  # a polygon per object: its box's outline
        coco = json.loads(coco_file.read_text())
        for ann in coco["annotations"]:
            x, y, w, h = ann["bbox"]
            ann["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
        coco_file.write_text(json.dumps(coco))
    cfg = load_config(
        SMOKE_CONFIG,
        [
            f"data.source={root}",
            "model.zoo_config=COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml",
            "solver.max_iter=20",
            "solver.eval_period=0",
            f"runtime.output_dir={tmp_path / 'run'}",
        ],
    )
    trained = run_train(StepContext(cfg=cfg, workdir=tmp_path / "run"))
    d2_config = Path(trained.files["d2_config"])
    # 20 iterations: keep every proposal the model scores, so the masks compared are many
    d2_config.write_text(d2_config.read_text().replace("SCORE_THRESH_TEST: 0.05", "SCORE_THRESH_TEST: 0.0"))
    bundle = build_bundle(
        tmp_path / "bundle",
        weights=Path(trained.files["weights"]),
        d2_config=d2_config,
        labels=json.loads(Path(trained.files["labels"]).read_text()),
        metrics={},
        metadata={},
    )
    for runtime in RUNTIMES:
        result = export_bundle(bundle, runtime, tmp_path / runtime, images=read_images(Path(root) / "test"))
        summary = result.summary()
        assert summary["detections"] > 0 and summary["min_mask_iou"] >= Tolerance().mask_iou, summary


def test_an_openvino_export_sends_no_telemetry(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenVINO's conversion tool (``ov.convert_model``) counts each use in ``~/intel`` and sends it to Google
    Analytics unless a consent file or ``CI=true`` says no (``openvino_telemetry``'s ``OptInChecker``); the export
    reads the ONNX graph with OpenVINO's frontend instead, which has no telemetry."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("CI", "TF_BUILD", "JENKINS_URL"):  # the variables that turn the telemetry off
        monkeypatch.delenv(name, raising=False)
    export_bundle(tiny, "openvino", tmp_path / "out", images=_images(2))
    assert not (home / "intel").exists(), sorted(p.name for p in (home / "intel").iterdir())
