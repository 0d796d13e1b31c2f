"""EfficientNet-Lite0 port: strict weight loading, feature contract, and a real photo."""

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from obsdiff.evaluation.features import (
    EfficientNetLite0FeatureNet,
    load_efficientnet_lite0,
    packaged_weights_path,
)

# "Chelsea" the cat (scikit-image sample data, CC0), 96x64 JPEG. ImageNet cats are classes 281-285.
CHELSEA_JPEG_B64 = (
    "/9j/4AAQSkZJRgABAQAAAQABAAD/2wBDAA0JCgsKCA0LCgsODg0PEyAVExISEyccHhcgLikxMC4pLSwzOko+MzZGNywtQFdBRkxO"
    "UlNSMj5aYVpQYEpRUk//2wBDAQ4ODhMREyYVFSZPNS01T09PT09PT09PT09PT09PT09PT09PT09PT09PT09PT09PT09PT09PT09P"
    "T09PT09PT0//wAARCABAAGADASIAAhEBAxEB/8QAGQAAAwEBAQAAAAAAAAAAAAAAAgQFAwYB/8QALRAAAgEDAwMEAQQCAwAAAAAA"
    "AQIDAAQREiExBRNBIlFhcRQjMlKBBpFCweH/xAAYAQEBAQEBAAAAAAAAAAAAAAACAwEEAP/EAB4RAAMAAgMAAwAAAAAAAAAAAAAB"
    "EQJBAxIhEzFR/9oADAMBAAIRAxEAPwBu5hEKs6nYDNQ+5JPKqgHbYseK6fqNuq2cx5yp2qJaxdkaXIJxsDzXPyeHVxm6OIVECLkj"
    "f6pWSYs2kEsTyo2x8UTjThVAy3jHIrzsMY9EQ9TbVNsaFHCKSzkI3nBzj4phMaHQhhkEZ5FYPFIgVyBkNgnyDTF2WSBCDpZmAz5r"
    "1Mgl2S9hburdwxghmYYIFDbGVGLozdrGnB33HB/6p+7iaOWPTqXvxFWx4I3zS8cZlEEIdtEko3X2C5x/uttMg5ZP3uW0kHemJGAJ"
    "XO45yawtlVVdgCWU75HzRTaEYySNlSPT81uLf0apsldSP5TBAP01Ofs+9TzZL/GrC6JOK97I9qpGBv8AToerzKtoQWwTwK5u5uQh"
    "CtgynhRzmitmlvVaS4fJbO2eKasLKDAdfW/lic4qebrFioha3julYCa4bD742IpnqEl1bfjw27xBpmI1sucADNbXylcBFBA3HwaU"
    "eRp40jchZY31RMeM43B+6nseibf9QvbOdEFwsjsM6WUcZxT9ncr1Hto69uaEhnTkEe4qb1C0tvz0ubmV4WUboyEk/WNjRdKuVf8A"
    "yBHVWVHQp6vbxTiyRPFtP06GfTMcOMMoOk+2dqJIIookJGDG2oH5obqPDkj4op5QIs86ULY+hR2MzUxxT3DM6ojHbUcVqsKyBQ+G"
    "XwQciuUtO7edUuGuwSqg6mb9oHP9bV03S7Nks4FMpVWUHSRTSjQL2VMeoRxWihkxS8EokXJ2qte9GN0oxLx81Om6VeW6+gahVgJG"
    "FtE0KYU6tOBk+aNGltrsmE4EgzpPBo7NwZSH2DDGDW91bZXY4xuDnioTZVMVu7u5f0GFlPv7VmJMDMmgY9qYhlbV25nXI4Oeab/G"
    "jdMFFoyiotBO6jQpDD+LDNTr6N0u0uFA7isCKqyRxxkBTgjfB2paaJJ0Y+rIyMEHeptwSGoZ++AXIJxvih6qrQ2mVz+ouk48DNSr"
    "CXRM0ZYYB2qn1OXXZRKrb5AI/uim6a0jAWlupJluJp1GG7ZAUE+M45rSW6md9bHAHAHAoEjeTf8AaF2aqUdjBcRgK2D5FdHHjSOT"
    "hM/NuVbUkjY9qYS+6k4BC5X6pq56dHEFIO2aoQhAgUKOKtGTpykLmG5VsrkHH9V0SqJYhkZBqDAqzaXwf7FdDbkdsAVLF6KMSuLI"
    "OuwUEcEjihtZHjISc6sf8guBVFwCOM0rKgJyd8VsPUxupAQQ3afIx618UNkih2OkBSeA+R/rxXsi6gc53pR1kU+k5+6n8fo+3gh1"
    "2wjsZFurYqInbDq2+n69qPp1vJMgubh2WJRlFyfV/wCVrLbyXKhJMFMgkeDTJjZQA0mAPAptIzs14a20aLASTkMcnYiii0pI0kZb"
    "UeBmjgt3mAVDhPOaow2sUCbLk+5rcVCbdJ8t0bho48EMDkg1UhUhBnmo4u4Yupsmglm2GKqCSbkoqj5NVQT/2Q=="
)
CAT_CLASSES = range(281, 286)


@pytest.fixture(scope="module")
def net() -> EfficientNetLite0FeatureNet:
    return load_efficientnet_lite0()


def _chelsea() -> torch.Tensor:
    image = Image.open(io.BytesIO(base64.b64decode(CHELSEA_JPEG_B64))).convert("RGB")
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255  # (1, 3, 64, 96)


def test_packaged_state_dict_matches_parameter_names_exactly():
    state_dict = torch.load(packaged_weights_path(), map_location="cpu", weights_only=True)
    model_keys = set(EfficientNetLite0FeatureNet().state_dict())
    assert set(state_dict) == model_keys
    result = EfficientNetLite0FeatureNet().load_state_dict(state_dict, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_real_photo_is_classified_as_a_cat(net):
    probs = net.logits(_chelsea()).softmax(dim=-1)[0]
    assert int(probs.argmax()) in CAT_CLASSES
    assert float(probs[list(CAT_CLASSES)].sum()) > 0.8


@pytest.mark.slow  # seconds on an idle CPU, tens under load
def test_features_shape_dtype_and_determinism(net):
    images = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(0))
    features = net(images)
    assert features.shape == (2, net.num_features) == (2, 1280)
    assert features.dtype == torch.float32 and not features.requires_grad
    assert torch.equal(features, net(images))
    assert torch.isfinite(features).all() and features.std() > 0


def test_features_do_not_depend_on_batch_or_train_mode(net):
    images = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    batched = net(images)
    net.train()
    assert not net.training and not net._bn0.training
    torch.testing.assert_close(net(images[1:]), batched[1:], rtol=1e-4, atol=1e-5)


def test_half_precision_input_gives_fp32_features(net):
    features = net(torch.rand(2, 3, 32, 32).half())
    assert features.dtype == torch.float32


def test_rejects_non_rgb_batches(net):
    with pytest.raises(ValueError, match="N, 3, H, W"):
        net(torch.rand(3, 32, 32))
