"""``d2ops export torchscript|onnx|openvino``: a bundle plus a graph for a faster runtime, checked before it is kept.

The graph is detectron2's own export path: :class:`detectron2.export.TracingAdapter` around
``GeneralizedRCNN.inference(..., do_postprocess=False)``, traced with ``torch.jit.trace`` (TorchScript) or
exported by ``torch.onnx.export(..., dynamo=False)`` (ONNX, opset 17); OpenVINO reads that ONNX graph with its
ONNX frontend (``Core.read_model``, see :func:`_convert_openvino`) and keeps its IR at f32 (``compress_to_fp16=False``).

**Variable input sizes.** The test-time resize (``ResizeShortestEdge`` to ``INPUT.MIN_SIZE_TEST`` /
``MAX_SIZE_TEST``) is done *outside* the graph, by the same :class:`~d2ops.model.detector.Detector` code
for every runtime; the graph takes the resized ``[3, H, W]`` image with ``H`` and ``W`` dynamic and does the
normalisation and the padding to the backbone's ``size_divisibility`` inside (traced from detectron2's
``ImageList.from_tensors``, which computes the padding from the input's shape while tracing). Rescaling to the
original image, the score threshold and pasting masks are done after the graph by detectron2's
``detector_postprocess``, again the same code as the PyTorch path.

**Parity gate.** Before the bundle is written, the exported graph is loaded by its runtime and run on held-out
images beside the PyTorch predictor: every detection must match (same class, boxes within
:attr:`Tolerance.box_px` pixels, scores within :attr:`Tolerance.score`, masks with IoU of at least
:attr:`Tolerance.mask_iou`), except those a rounding may keep or drop (:class:`Tolerance`: scores within the
tolerance of the score threshold, or of the lowest kept score when the top ``DETECTIONS_PER_IMAGE`` is full).
A graph the runtime cannot load or run, or one that loses parity, raises
:class:`ExportError` naming the image and the difference, and leaves nothing at ``--out``.

**Speed.** The parity check runs both predictors over the same images, one after the other, so it also
measures them: the runtime's entry in ``metadata.json`` records ``speed`` (median seconds per image of both, the
speedup over PyTorch, threads and CPUs). ``--runtime auto`` picks the bundle's fastest runtime by these
figures (:func:`d2ops.model.runtimes.available_runtimes`): which runtime wins depends on the model and the
input size (bench/RESULTS.md), so it is measured rather than assumed.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from detectron2.export import TracingAdapter

from d2ops.model.bundle import ModelBundle, ModelNotFoundError, ReferenceMismatchError, sha256_file
from d2ops.model.detector import Detection, Detector
from d2ops.model.runtimes import EXPORTED, OUTPUT_FIELDS
from d2ops.utils import jsonio
from d2ops.utils.device import machine_cpus
from d2ops.utils.files import atomic_write
from d2ops.utils.folders import OutputFolderError, written_folder

__all__ = [
    "ARTIFACTS",
    "ExportError",
    "ExportResult",
    "ImageParity",
    "Tolerance",
    "check_reference",
    "compare",
    "describe",
    "export_bundle",
    "read_image_files",
    "read_images",
]

log = logging.getLogger(__name__)

#: The file each runtime's graph is kept in (OpenVINO's IR has a ``.bin`` of weights beside its ``.xml``).
ARTIFACTS = {"torchscript": ("model.ts",), "onnx": ("model.onnx",), "openvino": ("model.xml", "model.bin")}
ONNX_OPSET = 17
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MAX_PARITY_IMAGES = 50


class ExportError(ModelNotFoundError):
    """The export cannot be made or would not give the PyTorch model's answers; nothing was written."""


@dataclass(frozen=True)
class Tolerance:
    """How close the exported graph's detections must be to PyTorch's (original-image pixels, score units).

    Detections whose PyTorch score is within ``score`` of the graph's own score threshold
    (``MODEL.ROI_HEADS.SCORE_THRESH_TEST``) may be missing on either side: a float rounding there decides
    whether they are kept at all. So may those within ``score`` of the lowest kept score when a side kept
    its full ``TEST.DETECTIONS_PER_IMAGE``: there a rounding decides which candidate makes the top k.
    """

    box_px: float = 0.5
    score: float = 0.005
    mask_iou: float = 0.98


@dataclass
class ImageParity:
    """One held-out image's comparison: detection counts and the largest differences found."""

    image: str
    pytorch: int
    exported: int
    max_box_px: float = 0.0
    max_score: float = 0.0
    min_mask_iou: float | None = None
    problems: list[str] = field(default_factory=list)
    pytorch_seconds: float = 0.0  # wall time of each side's predict on this image
    seconds: float = 0.0


@dataclass(frozen=True)
class ExportResult:
    """The exported bundle, its runtime and the parity measured on the held-out images."""

    path: Path
    runtime: str
    parity: list[ImageParity]

    def summary(self) -> dict[str, Any]:
        return _parity_summary(self.parity)

    def speed(self) -> dict[str, Any] | None:
        return measured_speed(self.parity)


def read_images(source: str | Path, limit: int = MAX_PARITY_IMAGES) -> list[tuple[str, np.ndarray]]:
    """BGR images from a folder (sorted; its image files only) or one file, at most ``limit``."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    elif path.is_file():
        files = [path]
    else:
        raise ExportError(f"--images {source} does not exist; pass a folder of held-out images (e.g. a test split)")
    if not files:
        raise ExportError(f"--images {source} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    return read_image_files(files[:limit], "--images")


def read_image_files(files: Iterable[Path], option: str) -> list[tuple[str, np.ndarray]]:
    """``(name, BGR pixels)`` of each file; one that does not decode is an error naming ``option``."""
    import cv2  # lazy: OpenCV only where images are read from disk

    images = []
    for file in files:
        pixels = cv2.imread(str(file), cv2.IMREAD_COLOR)
        if pixels is None:
            raise ExportError(f"{file} is not a readable image; remove it from {option}")
        images.append((file.name, pixels))
    return images


def export_bundle(
    source: ModelBundle | str | Path,
    runtime: str,
    out: str | Path,
    *,
    images: Sequence[tuple[str, np.ndarray]],
    tolerance: Tolerance = Tolerance(),
    force: bool = False,
) -> ExportResult:
    """Write ``out``: the bundle ``source`` plus its ``runtime`` graph, after the parity gate passes.

    ``images``: held-out BGR images (:func:`read_images`) the graph is checked on; at least one must give
    the PyTorch model a detection, or parity could not be shown. ``out`` is a new or empty folder, or (with
    ``force``) exactly an earlier d2ops export of the same model (:mod:`d2ops.utils.folders`); it is written
    beside itself and renamed into place.
    """
    if runtime not in EXPORTED:
        raise ExportError(f"cannot export to {runtime!r}; choose one of {', '.join(EXPORTED)}")
    bundle = source if isinstance(source, ModelBundle) else ModelBundle.open(source)
    bundle.verify()
    if not images:
        raise ExportError("no held-out images to check the export on; pass --images with a folder of them")
    try:
        with written_folder(out, kind=f"{runtime} export", model=bundle.version(), sources=[bundle.path],
                            force=force) as staging:  # fmt: skip
            parity = _export_checked(bundle, runtime, staging, images, tolerance)
    except OutputFolderError as err:
        raise ExportError(str(err)) from None
    except (ExportError, KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:
        # not a refusal of the gate but a failure inside the tracer or a runtime: its traceback is what a report needs
        log.warning("the %s export of %s raised", runtime, bundle.path, exc_info=err)
        raise ExportError(f"the {runtime} export of {bundle.path} failed: {type(err).__name__}: {err}") from err
    log.info("%s export of %s written to %s (parity on %d images)", runtime, bundle.path, out, len(parity))
    return ExportResult(Path(out), runtime, parity)


def _export_checked(
    bundle: ModelBundle, runtime: str, staging: Path, images: Sequence[tuple[str, np.ndarray]], tolerance: Tolerance
) -> list[ImageParity]:
    """Write ``bundle`` plus its ``runtime`` graph into ``staging``; ExportError unless it matches PyTorch."""
    reference = Detector.from_bundle(bundle, device="cpu", runtime="pytorch")
    refs = [_timed(reference, pixels) for _, pixels in images]  # before any tracing: nothing found, nothing to show
    if not any(detections for detections, _ in refs):
        raise ExportError(
            f"the model detects nothing on the {len(images)} --images given, so parity with PyTorch cannot be "
            "shown; pass held-out images with objects the model finds (e.g. the dataset's test split)"
        )
    copied = bundle.copy_to(staging)
    entry = _export_graph(reference, runtime, staging, images[0][1])
    _write_metadata(copied, bundle, runtime, entry, parity=None)
    candidate = Detector.from_bundle(copied, device="cpu", runtime=runtime)
    parity = compare(reference, candidate, images, tolerance, refs=refs)
    failures = [p for p in parity if p.problems]
    if failures:
        raise ExportError(_parity_message(runtime, failures, tolerance))
    measured = {**_parity_summary(parity), "tolerance": asdict(tolerance)}
    speed = measured_speed(parity)
    entry["speed"] = speed and {**speed, "threads": candidate.threads, "machine_cpus": machine_cpus()}
    _record_reference(reference, runtime, staging, images, parity, entry)
    _write_metadata(copied, bundle, runtime, entry, parity=measured)
    ModelBundle(staging).verify()
    return parity


def _export_graph(detector: Detector, runtime: str, staging: Path, sample: np.ndarray) -> dict[str, Any]:
    """Trace the eager model on ``sample`` and write ``runtime``'s graph into ``staging``; its metadata entry."""
    model = detector.runtime.model  # type: ignore[attr-defined]  # the reference is eager PyTorch (PyTorchRuntime)
    image = detector.model_inputs(sample)["image"]  # the detector's own resize, as at inference

    def inference(model: Any, inputs: Any) -> list[dict[str, Any]]:
        return [{"instances": model.inference(inputs, do_postprocess=False)[0]}]

    adapter = TracingAdapter(model, [{"image": image}], inference)
    with torch.no_grad():
        adapter(*adapter.flattened_inputs)  # one eager run records the outputs' schema
    fields = adapter.outputs_schema.schemas[0].schemas[0].keys  # the Instances fields, in flattened order
    outputs = [*(OUTPUT_FIELDS[f] for f in fields), "image_size"]
    entry: dict[str, Any] = {"outputs": outputs, "device": "cpu", "torch": torch.__version__}
    try:
        with torch.no_grad():
            if runtime == "torchscript":
                traced = torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)
                traced.save(str(staging / "model.ts"))
            else:
                entry["opset"] = ONNX_OPSET
                if runtime == "onnx":
                    _export_onnx(adapter, outputs, staging / "model.onnx")
                else:  # OpenVINO converts the ONNX graph; that one is not kept (an onnx export of its own may be)
                    with tempfile.TemporaryDirectory(prefix="d2ops-onnx-") as tmp:
                        _export_onnx(adapter, outputs, Path(tmp) / "model.onnx")
                        _convert_openvino(Path(tmp) / "model.onnx", staging / "model.xml")
    finally:
        model.eval()  # tracing may leave submodules in training mode
    names = ARTIFACTS[runtime]
    entry.update(file=names[0], files={name: sha256_file(staging / name) for name in names})
    return entry


def _export_onnx(adapter: TracingAdapter, outputs: list[str], path: Path) -> None:
    try:
        import onnx  # noqa: F401  # lazy: torch.onnx.export needs it; only ONNX and OpenVINO exports do
    except ImportError as err:
        raise ExportError("the onnx package is missing; install d2ops with its dependencies (make setup)") from err
    dynamic = {"image": {1: "height", 2: "width"}, **{name: {0: "detections"} for name in outputs[:-1]}}
    torch.onnx.export(
        adapter,
        adapter.flattened_inputs,
        str(path),
        dynamo=False,
        opset_version=ONNX_OPSET,
        input_names=["image"],
        output_names=outputs,
        dynamic_axes=dynamic,
    )


def _convert_openvino(onnx_path: Path, xml_path: Path) -> None:
    """The ONNX graph read by OpenVINO's ONNX frontend and saved as IR at f32.

    ``Core.read_model`` is what OpenVINO documents for an ONNX file that needs no cutting, preprocessing or
    conversion extensions. ``ov.convert_model`` would add the conversion tool's layer on top, whose telemetry
    writes ``~/intel`` and sends usage events from the user's machine (it is on unless a consent file or
    ``CI=true`` says otherwise), with nothing in it this graph needs.
    """
    import openvino as ov  # lazy: only the OpenVINO export needs it

    ov.save_model(ov.Core().read_model(str(onnx_path)), str(xml_path), compress_to_fp16=False)


def _write_metadata(
    bundle: ModelBundle, source: ModelBundle, runtime: str, entry: dict[str, Any], parity: dict[str, Any] | None
) -> None:
    meta = bundle.metadata()
    runtimes = dict(meta.get("runtimes") or {})
    runtimes[runtime] = {
        **entry,
        "exported": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "parity": parity,
    }
    meta.update(model_version=source.version(), runtimes=runtimes)
    (bundle.path / ModelBundle.METADATA).write_text(jsonio.dumps(meta, indent=2))


def _record_reference(
    reference: Detector,
    runtime: str,
    staging: Path,
    images: Sequence[tuple[str, np.ndarray]],
    parity: Sequence[ImageParity],
    entry: dict[str, Any],
) -> None:
    """Keep one held-out image the eager model detects something on, and its detections, in ``entry``
    (``reference``; the image is hashed under ``files``): :func:`check_reference` replays it when a server loads it."""
    import cv2  # lazy: OpenCV only where images are written

    name, pixels = next((img for img, p in zip(images, parity, strict=True) if p.pytorch), images[0])
    (detections,) = reference.predict([pixels])
    image = f"{runtime}-reference.png"  # one per runtime: a later export of another runtime keeps this one
    encoded, data = cv2.imencode(".png", pixels)  # lossless: the graph sees exactly these pixels again
    if not encoded:
        raise ExportError(f"could not encode the held-out image {name} as the {runtime} reference")
    with atomic_write(staging / image, "wb") as handle:
        handle.write(data.tobytes())
    entry["files"] = {**entry["files"], image: sha256_file(staging / image)}
    entry["reference"] = {
        "image": image,
        "source": name,
        "detections": [
            {"label": d.label, "class": d.category_index, "score": d.score, "box": d.box} for d in detections
        ],
    }


def check_reference(detector: Detector, bundle: ModelBundle) -> None:
    """Run the detector's exported graph on the image its export recorded and compare with the eager model's
    detections recorded then, within the export's tolerance.

    :class:`ReferenceMismatchError` when they differ: the graph's bytes changed after the export (a recorded
    sha256 only shows that the file is the one metadata.json names, not that it still is the exported model).
    A bundle exported before references were recorded has none to check, and passes.
    """
    entry = bundle.runtimes().get(detector.runtime_name)
    recorded = entry.get("reference") if entry is not None else None
    if not isinstance(recorded, dict):
        log.debug("%s has no %s reference output to check at load", bundle.path, detector.runtime_name)
        return
    import cv2  # lazy: OpenCV only where images are read from disk

    path = bundle.path / str(recorded.get("image"))
    pixels = cv2.imread(str(path), cv2.IMREAD_COLOR) if path.is_file() else None
    if pixels is None:
        raise ReferenceMismatchError(
            f"{bundle.path}: the {detector.runtime_name} reference image {path.name} is missing or unreadable; "
            f"re-export the bundle (d2ops export {detector.runtime_name}) or serve it with --runtime pytorch"
        )
    expected = [
        Detection(str(d["label"]), int(d["class"]), float(d["score"]), [float(v) for v in d["box"]])
        for d in recorded.get("detections", [])
    ]
    parity = entry.get("parity") if entry is not None else None
    tolerance = Tolerance(**parity["tolerance"]) if isinstance(parity, dict) and "tolerance" in parity else Tolerance()
    (got,) = detector.predict([pixels])
    floor, top_k = float(detector.cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST), int(detector.cfg.TEST.DETECTIONS_PER_IMAGE)
    result = _match(path.name, expected, got, floor, tolerance, top_k)
    if result.problems:
        raise ReferenceMismatchError(
            f"{bundle.path}: the {detector.runtime_name} graph ({entry['file'] if entry else '?'}) does not give the "
            f"detections recorded when it was exported ({len(expected)} vs {len(got)} detections; "
            f"{'; '.join(result.problems[:2])}): its file changed after the export. Re-export the bundle "
            f"(d2ops export {detector.runtime_name}) or serve it with --runtime pytorch"
        )


# --------------------------------------------------------------------------------------------- parity


def compare(
    reference: Detector,
    candidate: Detector,
    images: Iterable[tuple[str, np.ndarray]],
    tolerance: Tolerance,
    *,
    refs: Sequence[tuple[list[Detection], float]] | None = None,
) -> list[ImageParity]:
    """Each image through both detectors (all detections the graph keeps), matched within ``tolerance``.

    ``refs``: the reference's detections and seconds on ``images``, when they were already run."""
    floor = float(reference.cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST)
    top_k = int(reference.cfg.TEST.DETECTIONS_PER_IMAGE)
    report = []
    images = list(images)
    # Each side over all the images in turn, not image by image: a runtime's worker threads keep spinning for a
    # while after a call (ONNX Runtime's do), which slows whatever runs next and would skew the timings.
    refs = list(refs) if refs is not None else [_timed(reference, pixels) for _, pixels in images]
    gots = [_timed(candidate, pixels) for _, pixels in images]
    for (name, _), (ref, ref_s), (got, got_s) in zip(images, refs, gots, strict=True):
        parity = _match(name, ref, got, floor, tolerance, top_k)
        parity.pytorch_seconds, parity.seconds = ref_s, got_s
        report.append(parity)
    return report


def _timed(detector: Detector, pixels: np.ndarray) -> tuple[list[Detection], float]:
    started = time.perf_counter()
    (detections,) = detector.predict([pixels])
    return detections, time.perf_counter() - started


def measured_speed(parity: Sequence[ImageParity]) -> dict[str, Any] | None:
    """The exported graph's speed against PyTorch's, measured in the parity check (each over the same images, one
    after the other; the first image, a warm-up for both, is left out; the matching is not timed). ``None``
    under 2 images."""
    timed = parity[1:]
    if not timed:
        return None
    seconds = statistics.median(p.seconds for p in timed)
    pytorch = statistics.median(p.pytorch_seconds for p in timed)
    return {
        "images": len(timed),
        "seconds_per_image": seconds,
        "pytorch_seconds_per_image": pytorch,
        "speedup": pytorch / seconds if seconds > 0 else None,
    }


def _cut(detections: list[Detection], floor: float, top_k: int) -> float:
    """The score below which a detection may be absent on this side: the threshold, or the lowest kept
    score when the top ``top_k`` filled up (candidates ranked just below it were dropped)."""
    if top_k > 0 and len(detections) >= top_k:
        return max(floor, min(d.score for d in detections))
    return floor


def _match(
    name: str, ref: list[Detection], got: list[Detection], floor: float, tol: Tolerance, top_k: int = 0
) -> ImageParity:
    """Greedy one-to-one matching of PyTorch's detections (by score) to the exported graph's."""
    result = ImageParity(name, len(ref), len(got))
    ref_cut, got_cut = _cut(ref, floor, top_k), _cut(got, floor, top_k)
    unused = list(range(len(got)))
    for det in sorted(ref, key=lambda d: -d.score):
        best, best_gap = None, float("inf")
        for j in unused:
            other = got[j]
            if other.category_index != det.category_index:
                continue
            gap = max(abs(a - b) for a, b in zip(det.box, other.box, strict=True))
            if gap < best_gap:
                best, best_gap = j, gap
        forgiven = det.score < got_cut + tol.score  # at the threshold or the graph's top-k cut: rounding decides
        if best is None or best_gap > tol.box_px or abs(got[best].score - det.score) > tol.score:
            if not forgiven:
                result.problems.append(f"PyTorch's {det.label} {det.score:.3f} at {_box(det.box)} has no match")
            continue
        other = got[best]
        unused.remove(best)
        result.max_box_px = max(result.max_box_px, best_gap)
        result.max_score = max(result.max_score, abs(other.score - det.score))
        if det.mask is not None and other.mask is not None:
            iou = _mask_iou(det, other)
            result.min_mask_iou = iou if result.min_mask_iou is None else min(result.min_mask_iou, iou)
            if iou < tol.mask_iou:
                result.problems.append(f"the mask of {det.label} {det.score:.3f} at {_box(det.box)} has IoU {iou:.3f}")
    for j in unused:
        if got[j].score >= ref_cut + tol.score:
            extra = got[j]
            result.problems.append(f"an extra {extra.label} {extra.score:.3f} at {_box(extra.box)}")
    return result


def _mask_iou(a: Detection, b: Detection) -> float:
    """IoU of two detections' masks, each a crop at its own ``mask_box``, on the union of the two boxes."""
    assert a.mask is not None and b.mask is not None and a.mask_box is not None and b.mask_box is not None
    x0, y0 = min(a.mask_box[0], b.mask_box[0]), min(a.mask_box[1], b.mask_box[1])
    x1, y1 = max(a.mask_box[2], b.mask_box[2]), max(a.mask_box[3], b.mask_box[3])
    canvas = np.zeros((2, y1 - y0 + 1, x1 - x0 + 1), dtype=bool)
    for i, det in enumerate((a, b)):
        bx, by = det.mask_box[0] - x0, det.mask_box[1] - y0  # type: ignore[index]
        h, w = det.mask.shape  # type: ignore[union-attr]
        canvas[i, by : by + h, bx : bx + w] = det.mask
    union = np.logical_or(canvas[0], canvas[1]).sum()
    return 1.0 if union == 0 else float(np.logical_and(canvas[0], canvas[1]).sum() / union)


def _box(box: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.1f}" for v in box) + "]"


def _parity_summary(parity: Sequence[ImageParity]) -> dict[str, Any]:
    ious = [p.min_mask_iou for p in parity if p.min_mask_iou is not None]
    return {
        "images": len(parity),
        "detections": sum(p.pytorch for p in parity),
        "max_box_px": max((p.max_box_px for p in parity), default=0.0),
        "max_score": max((p.max_score for p in parity), default=0.0),
        "min_mask_iou": min(ious) if ious else None,
    }


def _parity_message(runtime: str, failures: Sequence[ImageParity], tol: Tolerance) -> str:
    lines = [
        f"the {runtime} graph does not give the PyTorch model's answers on {len(failures)} image(s) "
        f"(tolerance: boxes {tol.box_px} px, scores {tol.score}, mask IoU {tol.mask_iou}); nothing was written:"
    ]
    for parity in failures[:5]:
        problems = "; ".join(parity.problems[:3])
        lines.append(f"  {parity.image}: {parity.pytorch} vs {parity.exported} detections; {problems}")
    lines.append("serve this model with --runtime pytorch, or report the model's config with this message")
    return "\n".join(lines)


def describe(result: ExportResult) -> str:
    """One line for the CLI: where, which runtime, the parity and the speed measured."""
    summary = result.summary()
    masks = "" if summary["min_mask_iou"] is None else f", mask IoU >= {summary['min_mask_iou']:.4f}"
    speed = result.speed()
    speedup = f"; {speed['speedup']:.2f}x PyTorch's speed here" if speed and speed["speedup"] else ""
    return (
        f"{result.runtime} bundle written to {result.path}: parity on {summary['images']} images, "
        f"{summary['detections']} detections, boxes within {summary['max_box_px']:.4f} px, "
        f"scores within {summary['max_score']:.5f}{masks}{speedup}"
    )
