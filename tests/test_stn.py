"""The STN building blocks (edge_stn/nn/stn.py) and the two models (edge_stn/nn/models.py)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional
nn = torch.nn

from edge_stn.nn import (  # noqa: E402
    STCNN,
    BilinearSampler,
    Classifier,
    GridGenerator,
    LocalizationNet,
    ModelSpec,
    PlainCNN,
    SpatialTransformer,
    build_model,
    count_flops,
)


@pytest.fixture(autouse=True)
def _one_thread_and_seed() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)


def numpy_bilinear(image: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Reference sampler: image (C, H, W), grid (h, w, 2) normalized (x, y); zeros padding,
    align_corners=False (pixel i's centre at (2i+1)/n - 1)."""
    c, h, w = image.shape
    out = np.zeros((c, *grid.shape[:2]), dtype=np.float64)
    for r in range(grid.shape[0]):
        for q in range(grid.shape[1]):
            x = ((grid[r, q, 0] + 1) * w - 1) / 2  # pixel coordinates, centre of pixel i at i
            y = ((grid[r, q, 1] + 1) * h - 1) / 2
            x0, y0 = int(np.floor(x)), int(np.floor(y))
            fx, fy = x - x0, y - y0
            for dy, wy in ((0, 1 - fy), (1, fy)):
                for dx, wx in ((0, 1 - fx), (1, fx)):
                    yy, xx = y0 + dy, x0 + dx
                    if 0 <= yy < h and 0 <= xx < w:  # taps outside the image read zero
                        out[:, r, q] += wy * wx * image[:, yy, xx]
    return out


def random_thetas(n: int, generator: torch.Generator) -> torch.Tensor:
    eye = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    return eye + 0.4 * torch.randn(n, 2, 3, generator=generator, dtype=torch.float64)


# ---------------------------------------------------------------- localization net


def test_fresh_localization_net_outputs_identity() -> None:
    loc = LocalizationNet(1, (32, 40), downsample=2)
    theta = loc(torch.rand(4, 1, 32, 40))
    expected = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(4, 2, 3)
    torch.testing.assert_close(theta, expected, atol=0, rtol=0)


def test_localization_net_rejects_too_small_input() -> None:
    with pytest.raises(ValueError):
        LocalizationNet(1, (6, 6), downsample=2)


@pytest.mark.parametrize("size", [(28, 28), (42, 42), (30, 50)])
def test_identity_init_is_an_identity_warp(size: tuple[int, int]) -> None:
    st = SpatialTransformer(1, size, size)
    st.train()  # the identity holds whatever the mode and batch statistics
    x = torch.rand(3, 1, *size)
    canonical, theta = st(x)
    # Exact up to float32 rounding of the pixel centres (2i+1)/n - 1 in the stored base grid.
    torch.testing.assert_close(canonical, x, atol=1e-5, rtol=0)
    assert theta.shape == (3, 2, 3)


# ---------------------------------------------------------------- grid generator and sampler


@pytest.mark.parametrize("out_size", [(1, 1), (7, 5), (21, 21), (28, 40)])
def test_grid_equals_affine_grid(out_size: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(out_size[0] * 1000 + out_size[1])
    theta = torch.randn(6, 2, 3, generator=gen)
    ours = GridGenerator(out_size)(theta)
    ref = F.affine_grid(theta, [6, 1, *out_size], align_corners=False)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


def test_grid_generator_follows_theta_dtype() -> None:
    theta = random_thetas(2, torch.Generator().manual_seed(1))
    grid = GridGenerator((4, 6))(theta)
    assert grid.dtype == torch.float64
    ref = F.affine_grid(theta, [2, 1, 4, 6], align_corners=False)
    # The stored base grid is float32, so float64 grids are float32-exact, not float64-exact.
    torch.testing.assert_close(grid, ref, atol=1e-6, rtol=0)


def test_grid_generator_buffer_is_not_in_the_state_dict() -> None:
    # The base grid is derived from the output size, never a weight to save or load.
    assert "base_grid" not in GridGenerator((5, 5)).state_dict()


def test_sampler_matches_numpy_bilinear_reference() -> None:
    gen = torch.Generator().manual_seed(2)
    image = torch.rand(2, 3, 9, 13, generator=gen, dtype=torch.float64)
    theta = random_thetas(2, gen)
    theta[1, :, 2] += 0.8  # push part of the grid outside the image: zeros padding matters
    grid = GridGenerator((6, 11))(theta)
    ours = BilinearSampler("zeros")(image, grid)
    assert ours.shape == (2, 3, 6, 11)
    for i in range(2):
        ref = numpy_bilinear(image[i].numpy(), grid[i].numpy())
        np.testing.assert_allclose(ours[i].numpy(), ref, atol=1e-10)
    assert (grid.abs() > 1).any()


def test_sampler_reads_zero_outside_the_image() -> None:
    image = torch.ones(1, 1, 4, 4)
    far = torch.full((1, 2, 2, 2), 3.0)
    assert BilinearSampler("zeros")(image, far).abs().max() == 0
    assert BilinearSampler("border")(image, far).min() == 1


def test_output_size_may_differ_from_input_size() -> None:
    st = SpatialTransformer(1, (60, 60), (28, 20))
    canonical, theta = st(torch.rand(2, 1, 60, 60))
    assert canonical.shape == (2, 1, 28, 20)
    assert theta.shape == (2, 2, 3)
    # At the identity a smaller output resamples the whole input: a constant stays constant.
    canonical, _ = st(torch.full((1, 1, 60, 60), 0.5))
    torch.testing.assert_close(canonical, torch.full((1, 1, 28, 20), 0.5))


def test_warp_with_given_theta_matches_grid_sample() -> None:
    st = SpatialTransformer(1, (20, 20), (10, 12))
    x = torch.rand(3, 1, 20, 20)
    theta = random_thetas(3, torch.Generator().manual_seed(3)).float()
    ref = F.grid_sample(
        x, F.affine_grid(theta, [3, 1, 10, 12], align_corners=False), align_corners=False
    )
    torch.testing.assert_close(st.warp(x, theta), ref, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- gradients


def _tiny_transformer() -> SpatialTransformer:
    st = SpatialTransformer(
        1, (8, 8), (5, 6), loc_downsample=1, loc_channels=(2, 3), loc_hidden=6
    ).double()
    with torch.no_grad():  # leave the identity, so every path carries gradient
        st.localization.regress.weight.normal_(0.0, 0.2)
        st.localization.regress.bias.add_(0.2 * torch.randn(6, dtype=torch.float64))
    return st.eval()


def test_gradcheck_through_the_transformer() -> None:
    st = _tiny_transformer()
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    w = st.localization.regress.weight.detach().clone().requires_grad_(True)
    b = st.localization.regress.bias.detach().clone().requires_grad_(True)

    def f(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        params = {"localization.regress.weight": w, "localization.regress.bias": b}
        canonical, _theta = torch.func.functional_call(st, params, (x,))
        return canonical

    assert torch.autograd.gradcheck(f, (x, w, b), eps=1e-6, atol=1e-5, rtol=1e-3)


def test_gradcheck_sampler_and_grid_wrt_theta() -> None:
    x = torch.rand(2, 2, 7, 9, dtype=torch.float64, requires_grad=True)
    theta = random_thetas(2, torch.Generator().manual_seed(4)).requires_grad_(True)
    grid_gen, sampler = GridGenerator((4, 5)), BilinearSampler()
    assert torch.autograd.gradcheck(
        lambda x, t: sampler(x, grid_gen(t)), (x, theta), eps=1e-6, atol=1e-5, rtol=1e-3
    )


def test_loss_gradient_reaches_the_localization_net_from_identity_init() -> None:
    model = STCNN(ModelSpec(in_size=(42, 42), stn_out=(21, 21), widths=(8, 16, 32)))
    x, y = torch.rand(8, 1, 42, 42), torch.randint(0, 10, (8,))
    loss = F.cross_entropy(model(x).logits, y)
    loss.backward()
    regress = model.transformer.localization.regress
    assert regress.weight.grad is not None and regress.weight.grad.abs().sum() > 0
    assert regress.bias.grad is not None and regress.bias.grad.abs().sum() > 0


# ---------------------------------------------------------------- models


def test_stcnn_and_plain_cnn_share_the_classifier() -> None:
    st = STCNN(ModelSpec(arch="stcnn"))
    cnn = PlainCNN(ModelSpec(arch="cnn"))
    assert type(st.classifier) is Classifier and type(cnn.classifier) is Classifier
    st_shapes = {k: v.shape for k, v in st.classifier.state_dict().items()}
    cnn_shapes = {k: v.shape for k, v in cnn.classifier.state_dict().items()}
    assert st_shapes == cnn_shapes
    # The CNN is the classifier alone: no transformer parameters anywhere.
    assert all(k.startswith("classifier.") for k in cnn.state_dict())


def test_model_outputs() -> None:
    spec = ModelSpec(in_size=(60, 60), stn_out=(28, 28), widths=(8, 16, 32))
    out = STCNN(spec).eval()(torch.rand(3, 1, 60, 60))
    assert out.logits.shape == (3, 10)
    assert out.theta is not None and out.theta.shape == (3, 2, 3)
    assert out.canonical is not None and out.canonical.shape == (3, 1, 28, 28)
    plain = PlainCNN(ModelSpec(arch="cnn", in_size=(60, 60), widths=(8, 16, 32))).eval()
    out = plain(torch.rand(3, 1, 60, 60))
    assert out.logits.shape == (3, 10) and out.theta is None and out.canonical is None


def test_stcnn_costs_at_most_half_the_cnn_flops_on_60x60() -> None:
    st = count_flops(build_model(ModelSpec(arch="stcnn", in_size=(60, 60))), 1, (60, 60))
    cnn = count_flops(build_model(ModelSpec(arch="cnn", in_size=(60, 60))), 1, (60, 60))
    assert 0 < st <= 0.5 * cnn


def test_count_flops_counts_multiply_accumulates() -> None:
    conv = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(2 * 16, 5))
    assert count_flops(conv, 1, (4, 4)) == 2 * 16 * 9 + 5 * 32
    st = SpatialTransformer(1, (8, 8), (3, 4), loc_downsample=1, loc_channels=(2, 2), loc_hidden=6)
    loc = 2 * 64 * 25 * 1 + 2 * 16 * 25 * 2 + 6 * 8 + 6 * 6  # 2 convs, 2 linears
    assert count_flops(st, 1, (8, 8)) == loc + 12 * 4  # + 4 taps per sampled value


def test_model_spec_round_trips_and_rejects_unknown_fields() -> None:
    from edge_stn.errors import CheckpointError

    spec = ModelSpec(arch="cnn", in_size=(42, 42), widths=(8, 16, 32))
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(CheckpointError):
        ModelSpec.from_dict({**spec.to_dict(), "bogus": 1})
    with pytest.raises(CheckpointError):
        ModelSpec.from_dict({**spec.to_dict(), "arch": "resnet"})


def test_count_flops_runs_on_the_models_own_device() -> None:
    # Training counts FLOPs after moving the model to its device; a CPU probe input broke CUDA
    # training (found on a lent H200). The meta device stands in for a GPU here.
    spec = ModelSpec(arch="stcnn", in_size=(60, 60))
    on_cpu = count_flops(build_model(spec), 1, (60, 60))
    assert count_flops(build_model(spec).to("meta"), 1, (60, 60)) == on_cpu
