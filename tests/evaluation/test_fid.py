"""FID: agreement with the closed form, ordering on real features, validation and the registry."""

import importlib

import pytest
import torch
from torch import Tensor, nn

from obsdiff.evaluation.features import EfficientNetLite0FeatureNet
from obsdiff.evaluation.fid import FEATURE_NETS, fid, get_feature_net, inception_feature_net


class ChannelMeans(nn.Module):
    """Features = per-channel means (3-d), so the FID has an easy closed form."""

    def forward(self, images: Tensor) -> Tensor:
        return images.mean(dim=(2, 3))


def _images(n: int, seed: int, brightness: float = 0.5, size: int = 32) -> Tensor:
    """Smooth random images: 4x4 noise upsampled, centred on ``brightness``."""
    g = torch.Generator().manual_seed(seed)
    coarse = brightness + 0.25 * (torch.rand(n, 3, 4, 4, generator=g) - 0.5)
    return nn.functional.interpolate(coarse, size=(size, size), mode="bilinear").clamp(0, 1)


def _frechet(x: Tensor, y: Tensor) -> float:
    """Reference Fréchet distance between Gaussians fitted to feature rows of x and y."""
    mu_x, mu_y = x.mean(0), y.mean(0)
    s_x, s_y = torch.cov(x.T), torch.cov(y.T)
    vals, vecs = torch.linalg.eigh(s_x)
    root_x = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(root_x @ s_y @ root_x).clamp(min=0).sqrt().sum()
    return float((mu_x - mu_y).square().sum() + s_x.trace() + s_y.trace() - 2 * cross)


@pytest.fixture(scope="module")
def lite0() -> nn.Module:
    return get_feature_net("efficientnet_lite0")


def test_matches_closed_form_for_any_batch_size():
    real, fake = _images(10, seed=0), _images(7, seed=1, brightness=0.6)
    net = ChannelMeans()
    expected = _frechet(net(real).double(), net(fake).double())
    assert expected > 0
    assert fid(real, fake, net, batch_size=3) == pytest.approx(expected, rel=1e-4)
    assert fid(real, fake, net, batch_size=64) == pytest.approx(expected, rel=1e-4)


@pytest.mark.slow  # seconds on an idle CPU, tens under load
def test_lite0_fid_is_zero_on_itself_and_orders_shifts(lite0):
    real = _images(6, seed=0)
    similar = _images(6, seed=1)
    different = 1 - _images(6, seed=2, brightness=0.15)  # bright, inverted-looking set
    same = fid(real, real, lite0)
    near = fid(real, similar, lite0)
    far = fid(real, different, lite0)
    assert abs(same) < 1e-3 * far
    assert 0 < near < far


def test_rejects_too_few_or_malformed_images():
    net = ChannelMeans()
    with pytest.raises(ValueError, match="at least 2 fake"):
        fid(_images(4, 0), _images(1, 1), net)
    with pytest.raises(ValueError, match="at least 2 real"):
        fid(_images(1, 0), _images(4, 1), net)
    with pytest.raises(ValueError, match="float"):
        fid((_images(4, 0) * 255).byte(), _images(4, 1), net)


def test_registry_builds_known_nets_and_lists_them_on_unknown_names(lite0):
    assert set(FEATURE_NETS) == {"efficientnet_lite0", "inception_v3"}
    assert isinstance(lite0, EfficientNetLite0FeatureNet)
    with pytest.raises(KeyError, match="efficientnet_lite0.*inception_v3"):
        get_feature_net("resnet50")


def test_inception_without_torch_fidelity_says_how_to_install(monkeypatch):
    # The package re-exports the function `fid`, which shadows the submodule attribute.
    fid_module = importlib.import_module("obsdiff.evaluation.fid")
    monkeypatch.setattr(fid_module, "_TORCH_FIDELITY_AVAILABLE", False)
    with pytest.raises(ImportError, match=r"obsdiff\[coco\]"):
        inception_feature_net()
