"""The locked COCO protocol: the caption rule, the pinned hash checked before loading, the
reference statistics of exactly the chosen photos (cached per image list), the FID resize."""

import hashlib
import json
import shutil
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch import nn

from obsdiff.calibration.prompts import load_prompts
from obsdiff.config import ConfigError, check_fields
from obsdiff.evaluation.coco import chosen_pairs, pairs_sha256
from obsdiff.evaluation.evaluate import coco_reference
from obsdiff.evaluation.fid import FidReference, fid_resize, load_centre_crop


def test_the_rule_takes_the_first_caption_of_the_lowest_image_ids(make_coco_captions):
    path = make_coco_captions(10)  # ids 7, 14, …, 70 listed as 7, 21, …, 14, 28, …
    assert chosen_pairs(path, 3) == [
        (7, "first caption of image 7"),
        (14, "first caption of image 14"),
        (21, "first caption of image 21"),
    ]
    assert chosen_pairs(path, 2, skip_prompts=1)[0] == (14, "first caption of image 14")
    assert load_prompts("coco", 3, str(path), group="eval") == [c for _, c in chosen_pairs(path, 3)]


def test_a_blank_first_caption_gives_way_to_the_next(make_coco_captions):
    path = make_coco_captions(3)
    data = json.loads(path.read_text())
    for ann in data["annotations"]:
        if ann["id"] == 14:  # image 7's first caption
            ann["caption"] = "  "
    path.write_text(json.dumps(data))
    assert chosen_pairs(path, 1) == [(7, "second caption of image 7")]


def test_the_hash_is_sha256_of_compact_utf8_json():
    expected = hashlib.sha256('[[7,"a café"],[14,"b"]]'.encode()).hexdigest()
    assert pairs_sha256([(7, "a café"), (14, "b")]) == expected


@pytest.fixture
def coco_cfg(compose_cfg, make_coco_captions, tmp_path, monkeypatch):
    """``eval=coco`` on a fake 5,000-image captions file, pinned to that file's hash."""
    monkeypatch.setattr(sys.modules["obsdiff.config.validate"], "_installed", lambda module: True)
    path, images = make_coco_captions(5000), tmp_path / "val2014"
    images.mkdir()
    pinned = pairs_sha256(chosen_pairs(path, 5000))

    def _compose(*overrides: str):
        return compose_cfg(
            "eval=coco", f"eval.path={path}", f"eval.reference_dir={images}",
            f"eval.protocol_sha256={pinned}", *overrides,
        )  # fmt: skip

    return path, _compose


def test_the_pinned_captions_pass_and_a_modified_file_fails_before_loading(coco_cfg):
    path, compose = coco_cfg
    check_fields(compose())
    data = json.loads(path.read_text())
    data["annotations"][0]["caption"] = "an edited caption"  # image 7's second caption: unchanged rule output
    path.write_text(json.dumps(data))
    check_fields(compose())
    data["annotations"][1]["caption"] = "an edited caption"  # image 7's first caption
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="eval.check_protocol=false"):
        check_fields(compose())
    check_fields(compose("eval.check_protocol=false"))  # the opt-out for custom files


def test_another_count_or_no_pin_fails(coco_cfg):
    _, compose = coco_cfg
    with pytest.raises(ConfigError, match="not the pinned"):
        check_fields(compose("eval.num_prompts=4999"))
    with pytest.raises(ConfigError, match="not pinned yet; .* hash to [0-9a-f]{64}"):
        check_fields(compose("eval.protocol_sha256=null"))


def test_the_ablation_is_the_first_thousand(compose_cfg):
    cfg = compose_cfg("eval=coco_ablation")
    assert (cfg.eval.source, cfg.eval.num_prompts, cfg.eval.skip_prompts, cfg.eval.seed) == (
        "coco",
        1000,
        0,
        1000,
    )
    assert compose_cfg("eval=coco").eval.num_prompts == 5000


class CountingNet(nn.Module):
    """Per-channel means and standard deviations (N, 6); counts the images it sees."""

    resize = "none (test)"

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.seen += images.shape[0]
        return torch.cat([images.mean((2, 3)), images.std((2, 3))], 1)


def _photos(folder, ids, seed=0):
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, image_id in enumerate(ids):
        size = (64, 48) if i % 2 else (40, 56)  # landscape and portrait
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"COCO_val2014_{image_id:012d}.jpg")


def _photo_eval(captions, folder):
    """The ``eval`` fields the COCO reference reads: 3 protocol photos of a fake 4-image file."""
    return OmegaConf.create(
        {"path": str(captions), "num_prompts": 3, "skip_prompts": 0, "reference_dir": str(folder),
         "feature_net": "test", "feature_weights": None}
    )  # fmt: skip


def test_reference_statistics_are_of_the_chosen_photos_and_cached_per_image_list(
    make_coco_captions, tmp_path
):
    folder, cache = tmp_path / "val2014", str(tmp_path / "cache")
    _photos(folder, [7, 14, 21, 28])
    ecfg = _photo_eval(make_coco_captions(4), folder)
    net = CountingNet()
    first = coco_reference(ecfg, net, cache)
    assert net.seen == 3  # exactly the 3 chosen photos, not the whole folder
    paths = [folder / f"COCO_val2014_{i:012d}.jpg" for i in (7, 14, 21)]
    torch.testing.assert_close(first.mean, FidReference.from_files(paths, CountingNet()).mean)

    moved = tmp_path / "elsewhere"
    shutil.copytree(folder, moved)
    again = coco_reference(OmegaConf.merge(ecfg, {"reference_dir": str(moved)}), net, cache)
    assert net.seen == 3  # the same image list, in another folder: read from the cache
    torch.testing.assert_close(again.cov, first.cov)

    coco_reference(OmegaConf.merge(ecfg, {"num_prompts": 4}), net, cache)
    assert net.seen == 3 + 4  # another image list: its own entry


def test_missing_photos_are_named(make_coco_captions, tmp_path):
    folder = tmp_path / "val2014"
    _photos(folder, [7, 21])
    ecfg = _photo_eval(make_coco_captions(4), folder)
    with pytest.raises(FileNotFoundError, match="lacks 1 of the protocol's 3 .*000000000014"):
        coco_reference(ecfg, CountingNet(), str(tmp_path / "cache"))


def test_centre_crop_then_antialiased_resize(tmp_path):
    pixels = np.zeros((40, 60, 3), dtype=np.uint8)
    pixels[:, :10], pixels[:, 10:50], pixels[:, 50:] = (255, 0, 0), (255, 255, 255), (0, 0, 255)
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    crop = load_centre_crop(tmp_path / "wide.png")
    assert crop.shape == (1, 3, 299, 299)
    torch.testing.assert_close(crop, torch.ones_like(crop))  # the coloured side bands are cut off
    checkerboard = (torch.arange(598)[:, None] + torch.arange(598)[None]) % 2
    small = fid_resize(checkerboard.float().expand(1, 3, 598, 598))
    assert small.shape == (1, 3, 299, 299) and (small - 0.5).abs().max() < 0.05  # antialiased: no aliasing
    same = torch.rand(2, 3, 299, 299)
    assert fid_resize(same) is same
