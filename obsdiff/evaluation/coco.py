"""The locked MS-COCO 2014 val protocol of ``eval=coco``: which captions, which real images.

The rule (:func:`protocol_pairs`): the images of ``captions_val2014.json`` in ascending image id,
each with its first caption (the non-blank caption of lowest annotation id, stripped); the first
N pairs are the prompt set (5,000 for ``eval=coco``, 1,000 for ``eval=coco_ablation``, a prefix
of the first). Nothing depends on the order of the file's entries. The sha256 of the chosen
pairs (:func:`pairs_sha256`) is pinned in the eval config and checked before any model loads, so
a different captions file cannot pass as the paper's protocol. FID compares with the real images
of exactly those image ids (:func:`image_files`).

Stdlib only: config validation uses it without importing torch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from obsdiff.calibration.prompts import PromptQuery, PromptSource, PromptSourceError, _resolve_path


def _read_coco(path: Path, group: str) -> dict[str, Any]:
    """The parsed captions file; raises unless it has COCO's ``annotations`` and ``images`` lists."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if not (
        isinstance(data, dict)
        and isinstance(data.get("annotations"), list)
        and isinstance(data.get("images"), list)
    ):
        raise PromptSourceError(
            f"{group}.path={str(path)!r}: not a COCO captions file (needs 'annotations' and 'images' "
            f"lists, as captions_val2014.json has); use {group}.source=file for other prompt files"
        )
    return data


def protocol_pairs(data: dict[str, Any]) -> list[tuple[int, str]]:
    """Every image of a COCO captions file with its first caption, in ascending image id.

    Args:
        data: The parsed captions JSON (``{"images": [...], "annotations": [...]}``).

    Returns:
        ``(image_id, caption)`` pairs; the caption is the stripped, non-blank caption of lowest
        annotation id; images without one are left out.
    """
    first: dict[int, tuple[int, str]] = {}  # image id -> (annotation id, caption)
    for ann in data["annotations"]:
        caption = str(ann.get("caption") or "").strip()
        image_id, ann_id = int(ann["image_id"]), int(ann["id"])
        if caption and (image_id not in first or ann_id < first[image_id][0]):
            first[image_id] = (ann_id, caption)
    return [(image_id, first[image_id][1]) for image_id in sorted(first)]


def pairs_sha256(pairs: list[tuple[int, str]]) -> str:
    """sha256 of ``(image_id, caption)`` pairs as compact UTF-8 JSON: ``[[id,"caption"],...]``."""
    text = json.dumps(
        [[image_id, caption] for image_id, caption in pairs], ensure_ascii=False, separators=(",", ":")
    )
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def chosen_pairs(
    path: str | Path, num_prompts: int, skip_prompts: int = 0, group: str = "eval"
) -> list[tuple[int, str]]:
    """The protocol's pairs ``skip_prompts .. skip_prompts + num_prompts - 1`` of a captions file.

    Raises:
        PromptSourceError: When the file is not a COCO captions file or has too few images.
    """
    pairs = protocol_pairs(_read_coco(Path(path), group))
    if len(pairs) < skip_prompts + num_prompts:
        raise PromptSourceError(
            f"{group}.num_prompts={num_prompts} (+ skip_prompts={skip_prompts}), but {path} has only "
            f"{len(pairs)} captioned images"
        )
    return pairs[skip_prompts : skip_prompts + num_prompts]


def protocol_error(ecfg: Any) -> str | None:
    """Why the eval's captions are not its pinned protocol (``None``: they are, or unchecked).

    Args:
        ecfg: The ``eval`` config (``source=coco``; ``path``, ``num_prompts``, ``skip_prompts``,
            ``protocol_sha256``, ``check_protocol``).
    """
    if not ecfg.check_protocol:
        return None
    digest = pairs_sha256(chosen_pairs(ecfg.path, ecfg.num_prompts, ecfg.skip_prompts))
    if digest == ecfg.protocol_sha256:
        return None
    if ecfg.protocol_sha256 is None:
        return (
            f"eval.protocol_sha256 is not pinned yet; the {ecfg.num_prompts} protocol captions of "
            f"eval.path={ecfg.path!r} hash to {digest}. If that is MS-COCO's captions_val2014.json, "
            f"pin it in the eval config (or pass eval.protocol_sha256={digest}); for a custom captions "
            "file set eval.check_protocol=false"
        )
    return (
        f"eval.path={ecfg.path!r}: its {ecfg.num_prompts} protocol captions (skip {ecfg.skip_prompts}) "
        f"hash to {digest}, not the pinned eval.protocol_sha256={ecfg.protocol_sha256} "
        "(another captions file, or another num_prompts / skip_prompts). Use MS-COCO's "
        "annotations/captions_val2014.json with the config's counts; or, for a custom captions file, "
        "set eval.check_protocol=false (its numbers are then not the paper protocol's)"
    )


def image_files(path: str | Path, image_ids: list[int]) -> list[str]:
    """The ``file_name`` of each image id in a COCO captions file (``COCO_val2014_<id:012d>.jpg``)."""
    names = {int(image["id"]): image["file_name"] for image in _read_coco(Path(path), "eval")["images"]}
    missing = [image_id for image_id in image_ids if image_id not in names]
    if missing:
        raise PromptSourceError(f"eval.path={str(path)!r}: no 'images' entry for image ids {missing[:5]}")
    return [names[image_id] for image_id in image_ids]


def reference_photos(ecfg: Any, resize: str) -> tuple[list[Path], str]:
    """The real photos of the protocol's image ids in ``eval.reference_dir``, and the cache key of
    their FID statistics: a hash of the sorted file names, the feature net (name, weights) and its
    resize, so any folder holding the same photos reuses the statistics.

    Args:
        ecfg: The ``eval`` config (``path``, ``num_prompts``, ``skip_prompts``, ``reference_dir``,
            ``feature_net``, ``feature_weights``).
        resize: How the feature net resizes its input (e.g. :data:`obsdiff.evaluation.fid.INCEPTION_RESIZE`).

    Raises:
        FileNotFoundError: When ``reference_dir`` lacks some of the photos.
    """
    pairs = chosen_pairs(ecfg.path, ecfg.num_prompts, ecfg.skip_prompts)
    names = image_files(ecfg.path, [image_id for image_id, _ in pairs])
    paths = [Path(ecfg.reference_dir) / name for name in names]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"eval.reference_dir={ecfg.reference_dir!r} lacks {len(missing)} of the protocol's "
            f"{len(paths)} COCO photos, e.g. {missing[:3]}: point it at the val2014/ folder"
        )
    key = {"images": sorted(names), "feature_net": ecfg.feature_net, "feature_weights": ecfg.feature_weights,
           "resize": resize}  # fmt: skip
    return paths, hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _load_coco(query: PromptQuery) -> list[str]:
    """Loader of the ``coco`` prompt source: the protocol's captions in order."""
    return [caption for _, caption in protocol_pairs(_read_coco(_resolve_path(query), query.group))]


# The ``coco`` entry of ``PROMPT_SOURCES``.
COCO_SOURCE = PromptSource(_load_coco)
