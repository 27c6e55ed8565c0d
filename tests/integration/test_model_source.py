"""Model references: bundle folders and zips, S3 prefixes and zips, ClearML forms, clear errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from d2ops.model.source import ModelNotFoundError, parse_model_ref, resolve_model


def test_parse_forms() -> None:
    assert parse_model_ref("outputs/bundle").kind == "path"
    assert parse_model_ref("s3://127.0.0.1:9000/models/shapes/").kind == "s3"
    assert parse_model_ref("0123456789abcdef0123456789abcdef").kind == "clearml_id"
    ref = parse_model_ref("clearml://d2ops/demo/d2ops-shapes@production")
    assert (ref.kind, ref.project, ref.name, ref.tag) == ("clearml_query", "d2ops/demo", "d2ops-shapes", "production")
    assert parse_model_ref("clearml://d2ops/demo/d2ops-shapes").tag is None
    with pytest.raises(ModelNotFoundError, match="clearml://<project>/<name>"):
        parse_model_ref("clearml://just-a-name")


def test_folder_and_zip(tiny_bundle: Path, tmp_path: Path) -> None:
    assert resolve_model(str(tiny_bundle), tmp_path / "cache") == tiny_bundle
    archive = Path(shutil.make_archive(str(tmp_path / "bundle"), "zip", root_dir=tiny_bundle))
    extracted = resolve_model(str(archive), tmp_path / "cache")
    assert (extracted / "model_final.pth").is_file() and (extracted / "labels.json").is_file()
    assert resolve_model(str(archive), tmp_path / "cache") == extracted, "the same zip is extracted once"


def test_s3_prefix_and_zip(tiny_bundle: Path, tmp_path: Path) -> None:
    from d2ops.storage import s3 as storage
    from d2ops.storage.local_s3 import local_s3_endpoint

    archive = Path(shutil.make_archive(str(tmp_path / "bundle"), "zip", root_dir=tiny_bundle))
    with local_s3_endpoint() as s3:
        storage.upload(tiny_bundle, s3.uri("models", "shapes/"), create_bucket=True, progress=False)
        storage.upload(archive, s3.uri("models", "zips/"), progress=False)
        folder = resolve_model(s3.uri("models", "shapes/"), tmp_path / "cache")
        assert (folder / "config.yaml").read_text() == (tiny_bundle / "config.yaml").read_text()
        unzipped = resolve_model(s3.uri("models", "zips/bundle.zip"), tmp_path / "cache")
        assert (unzipped / "labels.json").read_text() == (tiny_bundle / "labels.json").read_text()


def test_errors_say_what_is_accepted(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"), tmp_path / "cache")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.yaml").write_text("MODEL: {}")
    with pytest.raises(ModelNotFoundError, match=r"missing model_final\.pth, labels\.json.*s3://"):
        resolve_model(str(tmp_path / "half"), tmp_path / "cache")
    (tmp_path / "broken.zip").write_bytes(b"PK not really")
    with pytest.raises(ModelNotFoundError, match="not a readable bundle zip"):
        resolve_model(str(tmp_path / "broken.zip"), tmp_path / "cache")
    assert not list((tmp_path / "cache").glob(".extract-*")), "no half-extracted folder is left behind"
