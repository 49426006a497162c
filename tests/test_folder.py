"""Users' image folders: layout errors are clear user errors, splits are by file and fixed."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_stn import cli
from edge_stn.data.base import draw_passes
from edge_stn.data.folder import FolderSource, scan_folder
from edge_stn.errors import DataError


def _make(root: Path, classes: dict[str, int]) -> Path:
    rng = np.random.default_rng(0)
    for name, count in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            img = rng.integers(0, 256, size=(30, 40), dtype=np.uint8)
            cv2.imwrite(str(root / name / f"{i:03d}.png"), img)
    return root


def test_scan_lists_classes_in_order(tmp_path: Path) -> None:
    scan = scan_folder(_make(tmp_path / "d", {"nut": 3, "bolt": 4}))
    assert scan.classes == ["bolt", "nut"]
    assert len(scan.files) == 7


@pytest.mark.parametrize(
    "layout, message",
    [
        ({}, "no class subfolders"),
        ({"only": 3}, "only one class"),
        ({"a": 3, "b": 1}, "needs at least 2"),
    ],
)
def test_bad_layouts_are_data_errors(tmp_path: Path, layout: dict[str, int], message: str) -> None:
    root = tmp_path / "d"
    root.mkdir()
    _make(root, layout)
    with pytest.raises(DataError, match=message):
        scan_folder(root)


def test_stray_file_at_the_top_is_named(tmp_path: Path) -> None:
    root = _make(tmp_path / "d", {"a": 2, "b": 2})
    (root / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"notes\.txt"):
        scan_folder(root)


def test_corrupt_image_is_named(tmp_path: Path) -> None:
    root = _make(tmp_path / "d", {"a": 3, "b": 3})
    bad = root / "b" / "001.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"001\.png"):
        FolderSource(scan_folder(root), split="train", size=(24, 24), channels=1)


def test_splits_are_disjoint_by_file_and_fixed(tmp_path: Path) -> None:
    scan = scan_folder(_make(tmp_path / "d", {"a": 10, "b": 10}))
    kw = {"size": (24, 24), "channels": 1, "test_fraction": 0.2, "seed": 3}
    train = FolderSource(scan, split="train", **kw)
    test = FolderSource(scan, split="test", **kw)
    assert train.num_items() == 16 and test.num_items() == 4
    train_bytes = {im.tobytes() for im in train.images}
    assert not any(im.tobytes() in train_bytes for im in test.images)
    again = FolderSource(scan, split="test", **kw)
    np.testing.assert_array_equal(again.images, test.images)
    s1, s2 = draw_passes(train, 1, seed=9), draw_passes(train, 1, seed=9)
    np.testing.assert_array_equal(s1.images, s2.images)
    assert s1.images.shape == (16, 1, 24, 24)


def test_train_on_an_empty_folder_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "empty"
    root.mkdir()
    cfg = tmp_path / "f.yaml"
    cfg.write_text(
        f"dataset: folder\nout: {tmp_path / 'run'}\ndata:\n  folder:\n    root: {root}\n"
    )
    assert cli.main(["train", "--config", str(cfg), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no class subfolders" in err[0]
    assert not (tmp_path / "run").exists()
