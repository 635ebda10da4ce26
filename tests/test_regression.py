"""DMD (v1) regression loss: LPIPS module, weights offline, teacher pairs, the loss and its script."""
import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from dmd_dar.checkpoint import OFFLINE_VARIABLES
from dmd_dar.dmd.config import RegressionConfig
from dmd_dar.dmd.family import DiTFamily
from dmd_dar.dmd.lpips_loss import LPIPSLoss, backbone_weights_file, load_lpips
from dmd_dar.dmd.regression import RegressionLoss, RegressionPairs, make_pairs
from dmd_dar.errors import UserError
from dmd_dar.models import DiT
from dmd_dar.routing import RoutingConfig

REPO = Path(__file__).resolve().parents[1]
TINY = dict(input_size=8, patch_size=4, in_channels=1, hidden_size=16, depth=2, num_heads=2, num_classes=3)


@pytest.fixture(scope="module")
def metric() -> LPIPSLoss:
    return load_lpips("squeeze", pretrained_backbone=False)


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory) -> Path:
    """A tiny DiT with non-trivial weights (at its zero init the teacher's ODE would return the noise)."""
    torch.manual_seed(0)
    model = DiT(**TINY)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("router."):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    folder = tmp_path_factory.mktemp("teacher") / "dit"
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def family(teacher_folder) -> DiTFamily:
    return DiTFamily(str(teacher_folder), torch.device("cpu"))


@pytest.fixture(scope="module")
def pairs(family) -> RegressionPairs:
    return make_pairs(family, n=5, seed=3, sampler="euler", steps=4, guidance=2.0, batch=2)


def images(n=3, channels=1, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, channels, size, size), generator=g) * 2 - 1


# ------------------------------------------------------------------------------------------- LPIPS
def test_lpips_is_zero_on_equal_images_symmetric_and_grows_with_the_perturbation(metric):
    x = images()
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    assert torch.equal(metric(x, x, reduction="none"), torch.zeros(3))
    y = (x + 0.1 * noise).clamp(-1, 1)
    d_xy, d_yx = metric(x, y, reduction="none"), metric(y, x, reduction="none")
    assert (d_xy > 0).all()
    torch.testing.assert_close(d_xy, d_yx)
    distances = [float(metric(x, (x + eps * noise).clamp(-1, 1))) for eps in (0.02, 0.1, 0.3, 1.0)]
    assert distances == sorted(distances) and distances[0] > 0, distances
    torch.testing.assert_close(metric(x, y), d_xy.mean())


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_every_backbone_works_on_mnist_sized_images(net):
    """28 px is below AlexNet's minimum input (its last max-pool fails); the module upsamples to 64 px."""
    metric = load_lpips(net, pretrained_backbone=False)
    x = images(n=2, size=28)
    assert torch.equal(metric(x, x, reduction="none"), torch.zeros(2))
    assert (metric(x, images(n=2, size=28, seed=1), reduction="none") > 0).all()


def test_lpips_takes_grey_images_as_rgb_and_rejects_other_channel_counts(metric):
    x, y = images(seed=0), images(seed=1)
    torch.testing.assert_close(metric(x, y, reduction="none"), metric(x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1), reduction="none"))
    with pytest.raises(ValueError, match="2 channels"):
        metric(images(channels=2), images(channels=2))
    with pytest.raises(ValueError, match="same shape"):
        metric(images(size=16), images(size=32))


def test_lpips_passes_gradients_to_its_inputs_not_to_itself_and_stays_in_eval(metric):
    x = images().requires_grad_(True)
    metric.train()
    assert not metric.metric.training and not any(p.requires_grad for p in metric.parameters())
    a, b = metric(x, images(seed=5)), metric(x, images(seed=5))
    assert torch.equal(a, b)  # dropout of the linear heads never active
    a.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_lpips_linear_heads_come_from_the_package(metric):
    import lpips

    heads = torch.load(Path(lpips.__file__).parent / "weights/v0.1/squeeze.pth", map_location="cpu", weights_only=True)
    state = metric.metric.state_dict()
    assert len(heads) == 7
    for key, value in heads.items():
        assert torch.equal(state[key], value), key


def test_missing_backbone_weights_offline_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert backbone_weights_file("vgg") == tmp_path / "checkpoints" / "vgg16-397923af.pth"
    with pytest.raises(UserError) as err:
        load_lpips("vgg", pretrained_backbone=True)
    msg = str(err.value)
    assert "\n" not in msg and "vgg16-397923af.pth" in msg and str(tmp_path / "checkpoints") in msg
    assert "pretrained_backbone=false" in msg


def test_failed_backbone_download_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    for variable in OFFLINE_VARIABLES:  # online: conftest switches the hub offline for every other test
        monkeypatch.delenv(variable, raising=False)

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(UserError, match=r"squeezenet1_1-b8a52dc0\.pth.*download failed.*no route to host") as err:
        load_lpips("squeeze", pretrained_backbone=True)
    assert "\n" not in str(err.value)
    assert not any((tmp_path / "checkpoints").glob("*"))  # nothing half-written left behind


def test_pretrained_backbone_is_read_from_torch_hub_cache(tmp_path, monkeypatch):
    from torchvision.models import squeezenet1_1

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(7)
    state = squeezenet1_1().state_dict()  # stands in for the ImageNet weights (no network here)
    path = backbone_weights_file("squeeze")
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    loaded = load_lpips("squeeze", pretrained_backbone=True)
    assert torch.equal(loaded.metric.net.slice1[0].weight, state["features.0.weight"])
    assert torch.equal(getattr(loaded.metric.net.slice7, "12").expand3x3.weight, state["features.12.expand3x3.weight"])


def test_unknown_lpips_net_is_a_user_error():
    with pytest.raises(UserError, match="net='resnet'"):
        load_lpips("resnet", pretrained_backbone=False)


# ------------------------------------------------------------------------------------------- pairs
def float32_error(family, pairs) -> float:
    """max |pairs - the same ODE in float64|: the float32 rounding of this computation, the yardstick of the
    comparisons between float32 runs that differ only in their order of summation (floored at 16 ulp of the
    samples' scale, and checked small: the ODE itself must not be what differs)."""
    import copy

    teacher64 = copy.deepcopy(family.teacher()).double()
    truth = family.teacher_sample(teacher64, pairs.noise.double(), pairs.ids, "euler", 4, 2.0)
    scale = float(truth.abs().max())
    error = float((pairs.samples.double() - truth).abs().max())
    assert error < 1e-4 * scale, (error, scale)
    return max(error, 16 * torch.finfo(torch.float32).eps * scale)


def test_pairs_are_the_teachers_ode_outputs_and_round_trip(family, pairs, tmp_path):
    assert pairs.noise.shape == pairs.samples.shape == (5, 1, 8, 8)
    assert pairs.ids.tolist() == [0, 1, 2, 0, 1]
    again = make_pairs(family, n=5, seed=3, sampler="euler", steps=4, guidance=2.0, batch=5)  # other batching
    torch.testing.assert_close(again.noise, pairs.noise, rtol=0, atol=0)
    # Another batching sums in another order (float32, and CPU- and thread-dependent): each float32 result is within
    # e of the float64 ODE, e measured here, so two of them agree to 2e; 4e leaves a 2x margin.
    tol = 4 * float32_error(family, pairs)
    torch.testing.assert_close(again.samples, pairs.samples, rtol=0, atol=tol)
    direct = family.teacher_sample(family.teacher(), pairs.noise[:2], pairs.ids[:2], "euler", 4, 2.0)
    torch.testing.assert_close(pairs.samples[:2], direct, rtol=0, atol=tol)
    assert not torch.allclose(pairs.samples, pairs.noise, atol=1e-2)  # the ODE did something
    assert not torch.equal(make_pairs(family, 2, seed=4, sampler="euler", steps=1, guidance=1.0).noise, pairs.noise[:2])

    path = tmp_path / "sub" / "pairs.npz"
    pairs.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["pairs.npz"]  # no temporary file left
    with np.load(path, allow_pickle=False) as raw:
        assert raw["noise"].dtype == np.float32 and raw["samples"].dtype == np.float32 and raw["ids"].dtype == np.int64
    back = RegressionPairs.load(path)
    assert torch.equal(back.noise, pairs.noise) and torch.equal(back.samples, pairs.samples)
    assert torch.equal(back.ids, pairs.ids)
    assert back.meta == {"n": 5, "seed": 3, "sampler": "euler", "steps": 4, "guidance": 2.0,
                         "sample_shape": [1, 8, 8], "num_conditions": 3}


def test_missing_or_damaged_pairs_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found.*make_regression_pairs.py"):
        RegressionPairs.load(tmp_path / "none.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="cannot read regression pairs"):
        RegressionPairs.load(tmp_path / "bad.npz")
    np.savez(tmp_path / "other.npz", arr_0=np.zeros((2, 8, 8, 1), np.uint8))
    with pytest.raises(UserError, match="no noise, ids, samples, meta"):
        RegressionPairs.load(tmp_path / "other.npz")
    with pytest.raises(UserError, match="regression.pairs="):
        RegressionLoss.from_config(RegressionConfig(enabled=True, pairs=None), None, "cpu")


def test_pairs_of_another_shape_are_a_user_error_naming_both(family, pairs, metric, tmp_path):
    other = RegressionPairs(torch.zeros(2, 3, 16, 16), torch.zeros(2, dtype=torch.long), torch.zeros(2, 3, 16, 16))
    other.save(tmp_path / "other.npz")
    cfg = RegressionConfig(enabled=True, pairs=str(tmp_path / "other.npz"))
    with pytest.raises(UserError, match=r"\[3, 16, 16\].*\[1, 8, 8\]"):
        RegressionLoss.from_config(cfg, family, "cpu", lpips=metric)
    with pytest.raises(UserError, match="condition ids 3..7 but the teacher has 3"):
        RegressionLoss(RegressionPairs(pairs.noise, torch.arange(5) + 3, pairs.samples), family, metric)


# ------------------------------------------------------------------------------------------- the loss
def replaying_student(pairs: RegressionPairs, offset: float = 0.0):
    """A fake x0 denoiser that returns the teacher's stored output for each stored noise (checking t and cond)."""

    def student_x0(x_t, t, cond):
        assert torch.equal(t, torch.ones(len(x_t)))
        rows = [int(torch.nonzero((pairs.noise == x).flatten(1).all(1))[0]) for x in x_t]
        assert cond.tolist() == pairs.ids[rows].tolist()
        return pairs.samples[rows] + offset

    return student_x0


def test_loss_is_zero_when_the_student_reproduces_the_teacher(family, pairs, metric):
    regression = RegressionLoss(pairs, family, metric, batch_size=4, seed=0)
    for step in range(3):
        assert float(regression(replaying_student(pairs), step, slice(0, 4))) == 0.0
        assert float(regression(replaying_student(pairs, offset=0.3), step, slice(0, 4))) > 0


def test_each_step_takes_one_global_batch_sliced_per_process(family, pairs, metric):
    regression = RegressionLoss(pairs, family, metric, batch_size=4, seed=1)
    for step in range(4):
        whole = regression.indices(step, slice(0, 4))
        assert torch.equal(torch.cat([regression.indices(step, slice(0, 2)), regression.indices(step, slice(2, 4))]), whole)
        assert torch.equal(RegressionLoss(pairs, family, metric, seed=1).indices(step, slice(0, 4)), whole)
    seen = torch.cat([regression.indices(s, slice(0, 4)) for s in range(5)])  # 20 draws = 4 epochs of 5 pairs
    assert sorted(seen.tolist()) == sorted(list(range(5)) * 4)
    with pytest.raises(UserError, match="batch_size"):
        RegressionLoss(pairs, family, metric).indices(0, slice(2, 4))


def test_gradients_flow_into_the_students_parameters(family, pairs, tmp_path):
    path = tmp_path / "pairs.npz"
    pairs.save(path)
    cfg = RegressionConfig(enabled=True, pairs=str(path), net="squeeze", pretrained_backbone=False)
    regression = RegressionLoss.from_config(cfg, family, "cpu", batch_size=4, seed=0)
    student = family.trainable(RoutingConfig(mode="dar", query="static_t"), lora_rank=0)
    loss = regression(family.denoiser(student), 0, slice(0, 4))
    assert loss.dim() == 0 and float(loss.detach()) > 0  # one step is not the teacher's 4-step ODE
    loss.backward()
    grads = {n: p.grad for n, p in student.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert "final_layer.linear.weight" in grads and any(n.startswith("blocks.0.") for n in grads)


# ------------------------------------------------------------------------------------------- the script
def run_script(*args):
    return subprocess.run([sys.executable, "scripts/make_regression_pairs.py", *args], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


def test_script_writes_the_pairs_and_fails_on_a_missing_teacher_with_one_line(teacher_folder, family, pairs, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(f"teacher: {teacher_folder}\ndm:\n  guidance_scale: 2.0\neval:\n  teacher_sampler: euler\n  teacher_steps: 4\n")
    out = tmp_path / "out" / "pairs.npz"
    done = run_script("--config", str(config), "--n", "5", "--seed", "3", "--batch", "2", "--out", str(out))
    assert done.returncode == 0, done.stderr
    made = RegressionPairs.load(out)
    torch.testing.assert_close(made.samples, pairs.samples, rtol=0, atol=4 * float32_error(family, pairs))  # see above
    assert made.meta["teacher"] == str(teacher_folder) and made.meta["steps"] == 4 and made.meta["backbone"] == "dit"

    missing = tmp_path / "missing.npz"
    failed = run_script("--config", str(config), f"teacher={tmp_path / 'nowhere'}", "--n", "2", "--out", str(missing))
    assert failed.returncode == 2
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: teacher") and "nowhere" in lines[0], failed.stderr
    assert not missing.exists()


def test_mse_distance_is_the_mean_squared_pixel_difference_and_needs_no_weights(family, pairs, tmp_path, monkeypatch):
    path = tmp_path / "pairs.npz"
    pairs.save(path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_hub"))  # no LPIPS weights anywhere: mse must not ask
    cfg = RegressionConfig(enabled=True, pairs=str(path), distance="mse")
    regression = RegressionLoss.from_config(cfg, family, "cpu", batch_size=4, seed=0)
    assert float(regression(replaying_student(pairs), 0, slice(0, 4))) == 0.0
    loss = float(regression(replaying_student(pairs, offset=0.3), 0, slice(0, 4)))
    target = pairs.samples[regression.indices(0, slice(0, 4))]  # DiT samples are pixels, clamped to [-1, 1] as images
    expected = float(((target + 0.3).clamp(-1, 1) - target.clamp(-1, 1)).double().pow(2).mean())
    assert 0 < loss == pytest.approx(expected, rel=1e-5)  # float32 mean of a few hundred squares


def test_unknown_regression_distance_is_a_config_error():
    with pytest.raises(UserError, match="regression.distance='l1' is unknown; use one of lpips, mse"):
        RegressionConfig(distance="l1")
