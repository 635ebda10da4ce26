"""The spectral report: the CLI on files (subprocess), bad input (exit 2, one line, no output folder),
and write_report's atomic output folder."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dmd_dar.spectral.report as spectral_report
from dmd_dar.errors import UserError
from dmd_dar.image_io import from_uint8_nhwc, load_images, save_images
from dmd_dar.spectral.report import write_report

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / "eval" / "spectral_report.py"
# One thread: tiny tensors on a shared 2-core machine (see tests/test_spectral.py).
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def box_blur(images: torch.Tensor) -> torch.Tensor:
    c = images.shape[1]
    kernel = torch.full((c, 1, 3, 3), 1 / 9, dtype=images.dtype)
    return F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel, groups=c)


@pytest.fixture(scope="module")
def image_sets(tmp_path_factory):
    """A sharp reference (uint8 noise with edges) as .npz, its blurred copy as a PNG folder and as a run folder."""
    root = tmp_path_factory.mktemp("sets")
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(24, 16, 16, 3), dtype=np.uint8)
    np.savez(root / "real.npz", arr_0=array)
    blurred = box_blur(from_uint8_nhwc(array))
    save_images(blurred, root / "blurred_png")
    (root / "run").mkdir()
    save_images(blurred, root / "run" / "samples.npz")
    np.savez(root / "big.npz", arr_0=rng.integers(0, 256, size=(4, 20, 20, 3), dtype=np.uint8))
    return root


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CLI), *args], capture_output=True, text=True, env=ENV, timeout=120)


def test_cli_writes_report(image_sets, tmp_path):
    out = tmp_path / "report"
    proc = run_cli(
        "--reference", str(image_sets / "real.npz"), "--reference-name", "real",
        "--candidate", f"blurred={image_sets / 'blurred_png'}",
        "--candidate", f"run={image_sets / 'run'}",
        "--candidate", f"same={image_sets / 'real.npz'}",
        "--out", str(out), "--bootstrap", "50",
    )
    assert proc.returncode == 0, proc.stderr
    for name in ("metrics.json", "report.md", "report.html", "spectra.png", "hf_retention.png"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["reference"]["name"] == "real" and metrics["reference"]["num_images"] == 24
    assert metrics["reference"]["image_shape_chw"] == [3, 16, 16]
    blurred, run, same = (metrics["candidates"][k] for k in ("blurred", "run", "same"))
    for key in ("0.125", "0.25", "0.375"):
        assert blurred["hf_retention"][key] < 0.6  # a 3x3 box blur removes most of the detail
        ci = blurred["hf_retention_ci"][key]
        assert ci["low"] <= blurred["hf_retention"][key] <= ci["high"]
        assert run["hf_retention"][key] == pytest.approx(blurred["hf_retention"][key])  # same images
        assert same["hf_retention"][key] == pytest.approx(1.0)
    assert blurred["source"] == str(image_sets / "blurred_png")
    assert same["log_spectral_distance_db"] == pytest.approx(0.0, abs=1e-9)
    assert blurred["log_spectral_distance_db"] > 1.0
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4
    assert "src='http" not in page and 'src="http' not in page  # self-contained
    assert "blurred" in (out / "report.md").read_text()
    assert "blurred: HF retention" in proc.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--candidate", "c={sets}/missing_dir"], "no such file"),
        (["--candidate", "c={sets}/big.npz"], "mismatched sizes"),
        (["--candidate", "{sets}/blurred_png"], "NAME=PATH"),
        (["--candidate", "c={sets}/run", "--cutoffs", "0.25,0.9"], "cutoffs"),
        ([], "--candidate"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_no_output(image_sets, tmp_path, args, message, capsys):
    out = tmp_path / "report"
    argv = ["--reference", str(image_sets / "real.npz"), "--out", str(out)]
    argv += [a.format(sets=image_sets) for a in args]
    spec = importlib.util.spec_from_file_location("spectral_report_cli", CLI)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:") and message in err, err
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder left behind either


def test_cli_refuses_a_foreign_out_folder_naming_the_flag(image_sets, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    spec = importlib.util.spec_from_file_location("spectral_report_cli", CLI)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--reference", str(image_sets / "real.npz"), "--candidate", f"c={image_sets / 'run'}",
                  "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--out" in err and "not a previous report" in err and "notes.txt" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_cli_subprocess_bad_input(image_sets, tmp_path):
    out = tmp_path / "report"
    proc = run_cli("--reference", str(image_sets / "nothing.npz"), "--candidate", f"c={image_sets / 'run'}",
                   "--out", str(out))
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "nothing.npz" in proc.stderr
    assert not out.exists()


def test_write_report_is_atomic_and_replaces_only_reports(image_sets, tmp_path, monkeypatch):
    # The plots are covered by test_cli_writes_report; here they are stubbed to keep the test fast.
    for plot in ("_plot_spectra", "_plot_band_ratios", "_plot_retention", "_plot_examples"):
        monkeypatch.setattr(spectral_report, plot, lambda *args, **kwargs: b"png")
    reference = load_images(image_sets / "real.npz")
    candidates = {"blurred": load_images(image_sets / "blurred_png")}
    out = tmp_path / "report"
    options = dict(num_bootstrap=20, num_examples=2)
    first = write_report(reference, candidates, out, **options)
    assert first["candidates"]["blurred"]["hf_retention"]["0.25"] < 1
    # A second report replaces the first (the folder holds only report files).
    write_report(reference, {"same": reference}, out, **options)
    assert list(json.loads((out / "metrics.json").read_text())["candidates"]) == ["same"]

    # A failure while writing leaves the previous report untouched and no temporary folder.
    def broken_plot(*args, **kwargs):
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(spectral_report, "_plot_examples", broken_plot)
    with pytest.raises(RuntimeError):
        write_report(reference, candidates, out, **options)
    assert list(json.loads((out / "metrics.json").read_text())["candidates"]) == ["same"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]

    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError):
        write_report(reference, candidates, fresh, **options)
    assert not fresh.exists()

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a previous report"):
        write_report(reference, candidates, foreign, **options)
    with pytest.raises(UserError, match="unique"):
        write_report(reference, {"reference": reference}, tmp_path / "x", **options)
    with pytest.raises(ValueError, match="NaN"):
        write_report(reference, {"bad": torch.full_like(reference, float("nan"))}, tmp_path / "x", **options)
    assert not (tmp_path / "x").exists()
