"""Exports never delete what d2ops did not write: every command that writes at a user-given ``--out``.

Each case runs the real command (``d2ops export ...``, ``d2ops demo``) on a real bundle and checks the folder in
the way byte for byte afterwards. The rule itself is :mod:`d2ops.utils.folders`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import pytest

from d2ops.cli import main as cli_main
from d2ops.model.export import ExportError, Tolerance, export_bundle
from d2ops.serving.nuclio import ExportError as NuclioExportError
from d2ops.serving.nuclio import export_nuclio
from d2ops.testing import build_tiny_bundle
from d2ops.utils.folders import MANIFEST, read_manifest

from .test_export import _images


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes: what a refused command must leave exactly as it was."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _leftovers(parent: Path) -> list[str]:
    """Temporary folders an export left beside its --out (staging or moved-aside copies)."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("parity-images")
    for name, pixels in _images(2):
        cv2.imwrite(str(folder / name), pixels)
    return folder


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle of this module's own: tests here put folders around it."""
    return build_tiny_bundle(tmp_path_factory.mktemp("model") / "shapes")


@pytest.fixture(scope="module")
def exported(model: Path, images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real earlier TorchScript export of ``model``, written by the CLI."""
    out = tmp_path_factory.mktemp("earlier") / "export"
    assert cli_main(["export", "torchscript", "--model", str(model), "--out", str(out), "--images", str(images)]) == 0
    return out


def _export(model: Path, out: Path, images: Path, *extra: str) -> int:
    command = ["export", "torchscript", "--model", str(model), "--out", str(out), "--images", str(images)]
    return cli_main([*command, *extra])


def test_an_export_records_what_it_wrote(exported: Path, model: Path) -> None:
    manifest = read_manifest(exported)
    assert manifest is not None and manifest["kind"] == "torchscript export"
    assert set(manifest["files"]) == set(_snapshot(exported)) - {MANIFEST}
    assert {"model_final.pth", "model.ts", "metadata.json"} <= set(manifest["files"]), manifest["files"]


@pytest.mark.parametrize("force", [[], ["--force"]], ids=["plain", "force"])
def test_a_training_folder_is_never_an_export_target(
    model: Path, images: Path, tmp_path: Path, force: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    train = tmp_path / "outputs" / "train"
    train.mkdir(parents=True)
    shutil.copy(model / "model_final.pth", train / "model_final.pth")
    (train / "model_0004999.pth").write_bytes(b"an intermediate checkpoint")
    (train / "last_checkpoint").write_text("model_final.pth")
    (train / "events.out.tfevents.1765000000.host").write_bytes(b"tensorboard events")
    before = _snapshot(train)
    assert _export(model, train, images, *force) == 2
    assert "holds files d2ops did not write" in capsys.readouterr().err
    assert _snapshot(train) == before and _leftovers(train.parent) == []


@pytest.mark.parametrize("force", [[], ["--force"]], ids=["plain", "force"])
def test_another_models_export_is_not_replaced(
    exported: Path, images: Path, tmp_path: Path, force: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    other = build_tiny_bundle(tmp_path / "other", seed=1)
    out = tmp_path / "export"
    shutil.copytree(exported, out)
    before = _snapshot(out)
    assert _export(other, out, images, *force) == 2
    assert "not the torchscript export of model" in capsys.readouterr().err
    assert _snapshot(out) == before and _leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "change", ["added", "edited", "missing"], ids=["a-file-added", "a-file-edited", "a-file-removed"]
)
def test_an_export_changed_since_d2ops_wrote_it_is_not_replaced(
    model: Path, exported: Path, images: Path, tmp_path: Path, change: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "export"
    shutil.copytree(exported, out)
    if change == "added":
        (out / "notes.txt").write_text("the user's notes")
    elif change == "edited":
        (out / "labels.json").write_text('["edited"]')
    else:
        (out / "model.ts").unlink()
    before = _snapshot(out)
    assert _export(model, out, images, "--force") == 2
    assert f"({change})" in capsys.readouterr().err
    assert _snapshot(out) == before


@pytest.mark.slow  # a second real export: over 5 s on 2 cores
def test_the_same_models_export_is_replaced_only_with_force(
    model: Path, exported: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "export"
    shutil.copytree(exported, out)
    before = _snapshot(out)
    assert _export(model, out, images) == 2
    assert "holds an earlier torchscript export of this model; pass --force" in capsys.readouterr().err
    assert _snapshot(out) == before
    assert _export(model, out, images, "--force") == 0
    manifest = read_manifest(out)
    assert manifest is not None and set(manifest["files"]) == set(_snapshot(out)) - {MANIFEST}
    assert _leftovers(tmp_path) == [], "the old export moved aside is removed once the new one is in place"


@pytest.mark.slow  # a real export up to its parity gate: over 5 s on 2 cores
def test_a_failed_replacement_leaves_the_old_export_in_place(
    model: Path, exported: Path, images: Path, tmp_path: Path
) -> None:
    out = tmp_path / "export"
    shutil.copytree(exported, out)
    before = _snapshot(out)
    impossible = Tolerance(box_px=-1.0)  # the parity gate refuses every detection, after the graph was written
    with pytest.raises(ExportError, match="does not give the PyTorch model's answers"):
        export_bundle(model, "torchscript", out, images=_images(1), tolerance=impossible, force=True)
    assert _snapshot(out) == before and _leftovers(tmp_path) == []


@pytest.mark.parametrize("target", ["torchscript", "triton", "nuclio"])
@pytest.mark.parametrize("where", ["is", "is inside", "holds"])
def test_out_never_overlaps_the_model(
    model: Path, images: Path, tmp_path: Path, target: str, where: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue's case: ``d2ops export triton --model D/shapes --out D`` deleted the bundle."""
    bundle = tmp_path / "D" / "shapes"
    shutil.copytree(model, bundle)
    out = {"is": bundle, "is inside": bundle / "export", "holds": bundle.parent}[where]
    before = _snapshot(tmp_path)
    extra = ["--images", str(images)] if target == "torchscript" else []
    assert cli_main(["export", target, "--model", str(bundle), "--out", str(out), "--force", *extra]) == 2
    assert f"--out {out} {where} the model" in capsys.readouterr().err
    assert _snapshot(tmp_path) == before


def test_a_zipped_model_is_not_written_over(
    model: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    archive = Path(shutil.make_archive(str(tmp_path / "models" / "shapes"), "zip", model))
    before = _snapshot(tmp_path)
    args = ["--images", str(images), "--cache-dir", str(tmp_path / "cache")]
    assert cli_main(["export", "onnx", "--model", str(archive), "--out", str(archive.parent), "--force", *args]) == 2
    assert "holds the model" in capsys.readouterr().err
    assert {k: v for k, v in _snapshot(tmp_path).items() if not k.startswith("cache/")} == before


def test_nuclio_replaces_only_its_own_export_of_the_same_model(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "fn"
    export_nuclio(model, out, name="first")
    with pytest.raises(NuclioExportError, match="earlier nuclio function of this model; pass --force"):
        export_nuclio(model, out, name="second")
    export_nuclio(model, out, name="second", force=True)
    assert "name: second" in (out / "cpu" / "function.yaml").read_text()
    assert _leftovers(tmp_path) == []
    other = build_tiny_bundle(tmp_path / "other", seed=1)
    with pytest.raises(NuclioExportError, match="not the nuclio function of model"):
        export_nuclio(other, out, force=True)

    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("keep me")
    for force in (False, True):
        with pytest.raises(NuclioExportError, match="holds files d2ops did not write"):
            export_nuclio(model, occupied, force=force)
    assert _snapshot(occupied) == {"notes.txt": b"keep me"}


def test_the_demo_never_writes_over_a_users_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mine = tmp_path / "mine"
    (mine / "run").mkdir(parents=True)
    (mine / "run" / "results.csv").write_text("the user's results")
    before = _snapshot(mine)
    assert cli_main(["demo", "--out", str(mine)]) == 2
    assert "holds files the demo did not write" in capsys.readouterr().err
    assert _snapshot(mine) == before


def test_the_demo_reruns_in_its_own_folder(tmp_path: Path) -> None:
    from d2ops.cli.demo import DEMO_MARKER, claim_demo_folder

    out = tmp_path / "demo"
    claim_demo_folder(out)  # a new folder
    (out / "run").mkdir()
    (out / "summary.json").write_text("{}")
    claim_demo_folder(out)  # its own earlier output, marked: accepted again
    assert (out / DEMO_MARKER).is_file() and (out / "summary.json").exists()
