"""Batch inference on the exported runtimes: the pipeline's infer step picks ``inference.runtime``, exports the
trained model to it through ``d2ops export``'s parity gate in its own work folder, and predicts with it.

The trained model here is the tiny bundle's (seeded random weights, score threshold 0, so every image has
detections); the step gets its ``d2_config`` and ``weights`` inputs as it does after the train step.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import yaml

from d2ops.config import load_config
from d2ops.model.bundle import ModelBundle
from d2ops.model.detector import Detector
from d2ops.model.export import ExportError, Tolerance
from d2ops.pipeline.steps import StepContext, inference_detector

REPO = Path(__file__).resolve().parents[2]
LABELS = ["square", "circle", "triangle"]


def _images(folder: Path, n: int = 4) -> Path:
    import cv2

    rng = np.random.default_rng(3)
    (folder / "nested").mkdir(parents=True)
    for i in range(n):
        pixels = rng.integers(0, 255, size=(96 + 8 * i, 128, 3), dtype=np.uint8)
        cv2.imwrite(str(folder / ("nested" if i % 2 else ".") / f"{i}.png"), pixels)
    return folder


def _ctx(tmp_path: Path, bundle: Path, runtime: str, config: Path | None = None) -> StepContext:
    cfg = load_config(REPO / "configs" / "smoke.yaml", ["runtime.device=cpu", f"inference.runtime={runtime}"])
    inputs = {"d2_config": str(config or bundle / "config.yaml"), "weights": str(bundle / "model_final.pth")}
    return StepContext(cfg=cfg, workdir=tmp_path / "work", inputs=inputs)


def _eager(ctx: StepContext) -> Detector:
    return Detector.from_files(ctx.input_path("d2_config"), ctx.input_path("weights"), LABELS, "cpu")


def test_the_infer_step_predicts_on_the_runtime_it_exported_with_pytorchs_answers(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    folder = _images(tmp_path / "images")
    ctx = _ctx(tmp_path, tiny_bundle, "onnx")
    eager = _eager(ctx)
    detector = inference_detector(ctx, eager, LABELS, folder)
    assert detector.runtime_name == "onnx"
    exported = ModelBundle.open(ctx.workdir / "infer_model" / "onnx")
    entry = exported.runtimes()["onnx"]
    # the parity gate ran on the source's images, nested ones included (list_images, as batch inference reads)
    assert entry["parity"]["images"] == 4, entry["parity"]
    import cv2

    tol = Tolerance()
    for path in sorted(folder.rglob("*.png")):
        image = cv2.imread(str(path))
        (ref,), (got,) = eager.predict([image]), detector.predict([image])
        assert [d.label for d in got] == [d.label for d in ref]
        np.testing.assert_allclose([d.box for d in got], [d.box for d in ref], atol=tol.box_px)
        np.testing.assert_allclose([d.score for d in got], [d.score for d in ref], atol=tol.score)


def test_pytorch_is_the_trained_model_as_is(tiny_bundle: Path, tmp_path: Path) -> None:
    folder = _images(tmp_path / "images", 2)
    ctx = _ctx(tmp_path, tiny_bundle, "pytorch")
    eager = _eager(ctx)
    assert inference_detector(ctx, eager, LABELS, folder) is eager
    assert not (ctx.workdir / "infer_model").exists(), "nothing is exported for pytorch"


def test_auto_exports_onnx_and_openvino_and_predicts_with_the_fastest_measured(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    from d2ops.model.runtimes import available_runtimes, installed_runtimes

    assert installed_runtimes() == ["pytorch", "torchscript", "onnx", "openvino"]  # the project's dependencies
    folder = _images(tmp_path / "images", 3)
    ctx = _ctx(tmp_path, tiny_bundle, "auto")
    eager = _eager(ctx)
    detector = inference_detector(ctx, eager, LABELS, folder)
    models = ctx.workdir / "infer_model"
    bundle = ModelBundle.open(models / "openvino")  # the last export holds both graphs
    runtimes = bundle.runtimes()
    assert sorted(runtimes) == ["onnx", "openvino"], "auto exports the runtimes that optimise the graph"
    assert sorted(p.name for p in models.iterdir()) == ["openvino", "pytorch"], "the ONNX-only copy was removed"
    for name, entry in runtimes.items():
        speed = entry["speed"]
        assert speed["images"] == 2 and speed["seconds_per_image"] > 0 and speed["speedup"] > 0, (name, speed)
    fastest = available_runtimes(bundle, "cpu")[0]
    speedups = {"pytorch": 1.0} | {name: entry["speed"]["speedup"] for name, entry in runtimes.items()}
    assert speedups[fastest] == max(speedups.values()), speedups
    if fastest == "pytorch":
        assert detector is eager
    else:
        assert detector.runtime_name == fastest


@pytest.fixture
def blind_config(tiny_bundle: Path, tmp_path: Path) -> Path:
    """The tiny model's config with a score threshold no detection reaches: it finds nothing, so no export can
    show parity with it."""
    config = yaml.safe_load((tiny_bundle / "config.yaml").read_text())
    config["MODEL"]["ROI_HEADS"]["SCORE_THRESH_TEST"] = 1.0
    path = tmp_path / "blind.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_named_runtime_that_cannot_show_parity_fails_the_step_and_says_what_to_set(
    tiny_bundle: Path, tmp_path: Path, blind_config: Path
) -> None:
    folder = _images(tmp_path / "images", 2)
    ctx = _ctx(tmp_path, tiny_bundle, "openvino", blind_config)
    with pytest.raises(ExportError) as info:
        inference_detector(ctx, _eager(ctx), LABELS, folder)
    message = str(info.value)
    assert message.startswith("inference.runtime openvino: ") and "detects nothing" in message, message
    assert "inference.runtime: pytorch" in message and "inference.source" in message, message
    assert not (ctx.workdir / "infer_model" / "openvino").exists(), "no unchecked graph is left to predict with"


def test_auto_falls_back_to_eager_pytorch_with_a_warning_when_no_export_can_show_parity(
    tiny_bundle: Path, tmp_path: Path, blind_config: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = _images(tmp_path / "images", 2)
    ctx = _ctx(tmp_path, tiny_bundle, "auto", blind_config)
    eager = _eager(ctx)
    with caplog.at_level(logging.WARNING, logger="d2ops.pipeline.steps"):
        assert inference_detector(ctx, eager, LABELS, folder) is eager
    skipped = [r.getMessage() for r in caplog.records if "inference.runtime auto:" in r.getMessage()]
    assert [m.rsplit(" ", 1)[-1] for m in skipped] == ["onnx", "openvino"], caplog.text
    assert all("detects nothing" in m for m in skipped), skipped
    for runtime in ("onnx", "openvino"):
        assert not (ctx.workdir / "infer_model" / runtime).exists()


# --------------------------------------------------------------------------------------------- registry.export


def _register_ctx(tmp_path: Path, bundle: Path, config: Path | None = None) -> StepContext:
    from d2ops.data.synthetic import generate_shapes_dataset

    root = generate_shapes_dataset(tmp_path / "shapes", counts={"train": 2, "valid": 2, "test": 3})
    cfg = load_config(
        REPO / "configs" / "smoke.yaml",
        ["runtime.device=cpu", f"data.source={root}", f"data.cache_dir={tmp_path / 'cache'}"],
    )
    inputs = {"d2_config": str(config or bundle / "config.yaml"), "weights": str(bundle / "model_final.pth")}
    return StepContext(cfg=cfg, workdir=tmp_path / "work", inputs=inputs)


def test_registry_export_checks_each_runtime_on_the_eval_split_and_writes_the_registered_bundle(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    from d2ops.pipeline.steps import _with_exports

    ctx = _register_ctx(tmp_path, tiny_bundle)
    assert ctx.cfg.registry.export == ["onnx"], "demo.yaml's (smoke.yaml inherits it)"
    out = tmp_path / "work" / "bundle" / "m"
    got = _with_exports(ctx, tiny_bundle, ["onnx", "openvino"], out)
    assert got == out
    runtimes = ModelBundle.open(out).runtimes()
    assert sorted(runtimes) == ["onnx", "openvino"]
    assert all(entry["parity"]["images"] == 3 for entry in runtimes.values()), "the eval split (test): 3 images"
    assert ModelBundle.open(out).labels() == LABELS


def test_a_registry_export_that_cannot_show_parity_fails_the_step_and_writes_nothing(
    tiny_bundle: Path, tmp_path: Path, blind_config: Path
) -> None:
    from d2ops.model.bundle import build_bundle
    from d2ops.pipeline.steps import _with_exports

    blind = build_bundle(
        tmp_path / "blind_bundle",
        weights=tiny_bundle / "model_final.pth",
        d2_config=blind_config,
        labels=LABELS,
        metrics={},
        metadata={"experiment": "blind"},
    )
    ctx = _register_ctx(tmp_path, blind)
    out = tmp_path / "work" / "bundle" / "m"
    with pytest.raises(ExportError) as info:
        _with_exports(ctx, blind, ["onnx"], out)
    message = str(info.value)
    assert message.startswith("registry.export onnx: ") and "detects nothing" in message, message
    assert "Remove onnx from registry.export" in message, message
    assert not out.exists(), "no bundle is left to register"


def test_registry_export_names_each_runtime_once() -> None:
    from d2ops.config import ConfigError

    with pytest.raises(ConfigError, match=r"registry\.export names a runtime twice: \['onnx', 'onnx'\]"):
        load_config(REPO / "configs" / "smoke.yaml", ["registry.export=[onnx, onnx]"])
