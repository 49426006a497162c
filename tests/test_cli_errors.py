"""Bad input: exit code 2, one line on stderr naming what is wrong, no traceback, nothing
overwritten (DESIGN §3, issue 2 "Bad input")."""

from __future__ import annotations

import datetime
import subprocess
import sys
from pathlib import Path

import pytest
from smoke import smoke_config_dict, snapshot, write_config

from edge_stn.cli import main


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = main(argv)
    err = capsys.readouterr().err
    return rc, err


def assert_one_error_line(err: str, *fragments: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("edge-stn: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    """An output folder holding a file that a refused command must leave alone."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious\n")
    return out


# ---------------------------------------------------------------- training config


def test_missing_config_file(tmp_path: Path, out_dir: Path, capsys) -> None:
    before = snapshot(out_dir)
    rc, err = run_main(
        ["train", "--config", str(tmp_path / "nope.yaml"), "--out", str(out_dir)], capsys
    )
    assert rc == 2
    assert_one_error_line(err, "nope.yaml", "no such file")
    assert snapshot(out_dir) == before


@pytest.mark.parametrize(
    "text,fragments",
    [
        ("data: [1, 2\nseed: 0\n", ("not valid YAML",)),
        ("name: a\n  bad indent: 1\n", ("not valid YAML",)),
        ("- just\n- a list\n", ("mapping",)),
        ("model:\n  widthz: [8, 16, 32]\n", ("model.widthz",)),
        ("optim:\n  epochs: many\n", ("optim.epochs",)),
        ("optim:\n  lr: -1\n", ("optim.lr",)),
        ("dataset: imagenet\n", ("dataset",)),
        ("data:\n  passes_per_epoch: 0\n", ("data.passes_per_epoch",)),
        ("dataset: folder\n", ("data.folder",)),
    ],
    ids=[
        "unclosed",
        "indent",
        "list",
        "unknown-key",
        "wrong-type",
        "negative-lr",
        "bad-dataset",
        "zero-passes",
        "folder-without-root",
    ],
)
def test_bad_config(
    text: str, fragments: tuple[str, ...], tmp_path: Path, out_dir: Path, capsys
) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    before = snapshot(out_dir)
    rc, err = run_main(["train", "--config", str(cfg), "--out", str(out_dir)], capsys)
    assert rc == 2
    assert_one_error_line(err, "bad.yaml", *fragments)
    assert snapshot(out_dir) == before


def test_the_key_path_names_the_nested_field(tmp_path: Path, capsys) -> None:
    doc = smoke_config_dict(tmp_path / "out")
    doc["model"]["loc_channels"] = [8, "wide"]
    rc, err = run_main(["train", "--config", str(write_config(tmp_path / "c.yaml", doc))], capsys)
    assert rc == 2
    assert_one_error_line(err, "model.loc_channels.1")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["train"],
        ["train", "--config", "x.yaml", "--arch", "resnet"],
        ["evaluate"],
        ["evaluate", "--model", "m.pt", "--passes", "ten"],
        ["frobnicate"],
        [],
    ],
    ids=["no-config", "bad-arch", "no-model", "bad-passes", "unknown-command", "nothing"],
)
def test_bad_arguments(argv: list[str], capsys) -> None:
    rc, err = run_main(argv, capsys)
    assert rc == 2
    assert_one_error_line(err)


def test_the_installed_command_exits_2_without_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "edge_stn.cli", "train", "--config", str(tmp_path / "nope.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr, "no such file")
    assert proc.stdout == ""


# ---------------------------------------------------------------- model files for evaluate


def evaluate_argv(model: Path, *extra: str) -> list[str]:
    return ["evaluate", "--model", str(model), "--dataset", "rts", "--passes", "1", *extra]


def test_missing_model_file(tmp_path: Path, capsys) -> None:
    rc, err = run_main(evaluate_argv(tmp_path / "missing.pt"), capsys)
    assert rc == 2
    assert_one_error_line(err, "missing.pt", "no such model file")
    assert list(tmp_path.iterdir()) == []


def _truncated(real: Path, dst: Path) -> None:
    data = real.read_bytes()
    dst.write_bytes(data[: len(data) // 2])


def _empty(real: Path, dst: Path) -> None:
    dst.write_bytes(b"")


def _foreign(real: Path, dst: Path) -> None:
    import torch

    torch.save({"a": 1}, dst)


def _unsafe_pickle(real: Path, dst: Path) -> None:
    import torch

    torch.save({"when": datetime.date(2015, 6, 5)}, dst)  # weights_only refuses the class


def _other_format_version(real: Path, dst: Path) -> None:
    import torch

    doc = torch.load(real, map_location="cpu", weights_only=True)
    torch.save({**doc, "format_version": 99}, dst)


def _wrong_weights(real: Path, dst: Path) -> None:
    import torch

    doc = torch.load(real, map_location="cpu", weights_only=True)
    doc["spec"]["arch"] = "cnn"  # stcnn weights under a cnn spec
    torch.save(doc, dst)


@pytest.mark.slow
@pytest.mark.parametrize(
    "damage,fragment",
    [
        (_truncated, "truncated or corrupt"),
        (_empty, "truncated or corrupt"),
        (_foreign, "not an edge-stn checkpoint"),
        (_unsafe_pickle, "not a readable PyTorch checkpoint"),
        (_other_format_version, "format version 99"),
        (_wrong_weights, "weights do not fit"),
    ],
    ids=["truncated", "empty", "foreign", "unsafe-pickle", "format-version", "wrong-weights"],
)
def test_bad_checkpoint(
    damage, fragment: str, smoke_checkpoint: Path, tmp_path: Path, capsys
) -> None:
    bad = tmp_path / "model.pt"
    damage(smoke_checkpoint, bad)
    before = snapshot(tmp_path)
    rc, err = run_main(evaluate_argv(bad), capsys)
    assert rc == 2
    assert_one_error_line(err, "model.pt", fragment)
    assert snapshot(tmp_path) == before  # no figure, nothing rewritten


@pytest.mark.slow
def test_text_file_as_checkpoint(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "notes.pt"
    bad.write_text("hello, this is not a checkpoint\n")
    rc, err = run_main(evaluate_argv(bad), capsys)
    assert rc == 2
    assert_one_error_line(err, "notes.pt")


@pytest.mark.slow
def test_truncated_checkpoint_through_the_installed_command(
    smoke_checkpoint: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "half.pt"
    _truncated(smoke_checkpoint, bad)
    proc = subprocess.run(
        [sys.executable, "-m", "edge_stn.cli", *evaluate_argv(bad)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr, "half.pt")


# ---------------------------------------------------------------- data sets for evaluate


@pytest.mark.slow
@pytest.mark.parametrize(
    "dataset,fragment",
    [("bogus", "unknown dataset 'bogus'"), ("tc", "42x42")],
    ids=["bogus", "size-mismatch"],
)
def test_bad_dataset(dataset: str, fragment: str, smoke_run, tmp_path: Path, capsys) -> None:
    before = snapshot(smoke_run.out_dir)
    figure = tmp_path / "f.png"
    argv = [
        "evaluate",
        "--model",
        str(smoke_run.best),
        "--dataset",
        dataset,
        "--passes",
        "1",
        "--figure",
        str(figure),
    ]
    rc, err = run_main(argv, capsys)
    assert rc == 2
    assert_one_error_line(err, fragment)
    assert not figure.exists()
    assert snapshot(smoke_run.out_dir) == before


@pytest.mark.slow
def test_zero_passes(smoke_checkpoint: Path, capsys) -> None:
    argv = ["evaluate", "--model", str(smoke_checkpoint), "--dataset", "rts", "--passes", "0"]
    rc, err = run_main([*argv, "--no-figure"], capsys)
    assert rc == 2
    assert_one_error_line(err, "passes")
