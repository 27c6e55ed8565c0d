"""d2ops keeps an offline session as its zip only when that zip really holds the whole session."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

from d2ops.utils.offline_session import keep_zip_only, session_file, session_names


def _session(root: Path) -> Path:
    folder = root / "offline-abc"
    (folder / "data" / "x").mkdir(parents=True)
    (folder / "task.json").write_text('{"id": "offline-abc"}')
    (folder / "metrics.jsonl").write_text("[]\n")
    (folder / "data" / "x" / "weights.pth").write_bytes(b"w" * 1000)
    return folder


def _zip(folder: Path, skip: str = "") -> Path:
    archive = folder.with_name(folder.name + ".zip")
    with zipfile.ZipFile(archive, "w") as zf:  # as ClearML's Task.close writes it: paths relative to the folder
        for path in folder.rglob("*"):
            if path.is_file() and path.relative_to(folder).as_posix() != skip:
                zf.write(path, path.relative_to(folder).as_posix())
    return archive


def test_a_complete_zip_replaces_the_folder_and_reads_the_same(tmp_path: Path) -> None:
    folder = _session(tmp_path)
    copy = shutil.copytree(folder, tmp_path / "copy")
    archive = _zip(folder)
    assert keep_zip_only(folder) == archive and not folder.exists()
    assert session_names(archive) == session_names(copy) == ["data/x/weights.pth", "metrics.jsonl", "task.json"]
    for name in session_names(copy):
        assert session_file(archive, name) == session_file(copy, name)
    assert session_file(archive, "nope.json") is None and session_file(copy, "nope.json") is None


def test_no_zip_or_an_incomplete_one_keeps_the_folder(tmp_path: Path) -> None:
    folder = _session(tmp_path)
    assert keep_zip_only(folder) == folder and folder.is_dir()  # ClearML wrote no zip
    _zip(folder, skip="data/x/weights.pth")  # a zip ClearML could not finish
    assert keep_zip_only(folder) == folder and (folder / "data" / "x" / "weights.pth").is_file()
    folder.with_name(folder.name + ".zip").write_bytes(b"not a zip")
    assert keep_zip_only(folder) == folder
