"""Prompt sources: file formats, order, the tiny set, the HF loader (stubbed) and loud errors."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from obsdiff.calibration.prompts import (
    PROMPT_SOURCES,
    PromptSourceError,
    check_prompt_source,
    load_prompts,
    tiny_prompts,
)


def write(path: Path, text: str) -> str:
    """Write ``text`` to ``path`` and return the path as a string."""
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_registry_names() -> None:
    assert set(PROMPT_SOURCES) == {"tiny", "digits", "file", "coco", "hf"}


def test_digits_captions_interleave_digits_and_keep_the_splits_apart() -> None:
    from obsdiff.models.digits_data import heldout_set, parse_caption

    train = load_prompts("digits", 1000)
    heldout = load_prompts("digits", 500, split="heldout", group="eval")
    assert [parse_caption(p).digit for p in train[:20]] == list(range(10)) * 2
    assert [parse_caption(p).digit for p in heldout[:20]] == list(range(10)) * 2
    assert sorted(heldout) == sorted(c.text for c in heldout_set()[1])  # the held-out images' captions
    assert load_prompts("digits", 3) == train[:3]
    with pytest.raises(PromptSourceError, match="has only 500 prompts"):
        load_prompts("digits", 501, split="heldout", group="eval")
    with pytest.raises(PromptSourceError, match="eval.split='test'.*train, heldout"):
        load_prompts("digits", 5, split="test", group="eval")


def test_tiny_prompts_are_packaged_and_ordered() -> None:
    prompts = tiny_prompts()
    assert 48 <= len(prompts) <= 80
    assert len(set(prompts)) == len(prompts)
    assert all(p == p.strip() and p for p in prompts)
    assert load_prompts("tiny", 10) == prompts[:10]
    assert prompts[0] == "a red bicycle leaning on a brick wall"


def test_txt_skips_blank_lines_and_keeps_order(tmp_path: Path) -> None:
    path = write(tmp_path / "p.txt", "first prompt\n\n  second prompt  \n\nthird\nfourth\n")
    assert load_prompts("file", 3, path=path) == ["first prompt", "second prompt", "third"]


def test_tsv_default_column_keeps_quotes(tmp_path: Path) -> None:
    text = 'Prompt\tCategory\n"G O" painted on a wall\tArt\na cat said "hi"\tAnimals\nbond\tAbstract\n'
    path = write(tmp_path / "p.tsv", text)
    assert load_prompts("file", 3, path=path) == ['"G O" painted on a wall', 'a cat said "hi"', "bond"]
    assert load_prompts("file", 2, path=path, column="Category") == ["Art", "Animals"]


@pytest.mark.parametrize("header", ["caption", "text"])
def test_csv_falls_back_to_caption_then_text(tmp_path: Path, header: str) -> None:
    path = write(tmp_path / "p.csv", f'id,{header}\n1,"a dog, running"\n2,a cat\n')
    assert load_prompts("file", 2, path=path) == ["a dog, running", "a cat"]


def test_unknown_column_lists_available(tmp_path: Path) -> None:
    path = write(tmp_path / "p.tsv", "Prompt\tCategory\na\tb\n")
    with pytest.raises(PromptSourceError, match=r"calibration\.column.*\['Prompt', 'Category'\]"):
        load_prompts("file", 1, path=path, column="caption_en")
    other = write(tmp_path / "q.csv", "id,label\n1,x\n")
    with pytest.raises(PromptSourceError, match="available columns: \\['id', 'label'\\]"):
        check_prompt_source("file", 1, path=other)


def test_json_coco_captions(tmp_path: Path) -> None:
    data = {"images": [], "annotations": [{"image_id": 1, "caption": " A man. "}, {"caption": "A bus."}]}
    path = write(tmp_path / "captions_val2014.json", json.dumps(data))
    assert load_prompts("file", 2, path=path) == ["A man.", "A bus."]


def test_json_list_of_objects_and_strings(tmp_path: Path) -> None:
    objects = write(tmp_path / "tifa.json", json.dumps([{"id": "x", "caption": "c1"}, {"caption": "c2"}]))
    assert load_prompts("file", 2, path=objects) == ["c1", "c2"]
    prompts = write(tmp_path / "prompts.json", json.dumps([{"prompt": "p1"}, {"prompt": "p2"}]))
    assert load_prompts("file", 1, path=prompts) == ["p1"]
    strings = write(tmp_path / "strings.json", json.dumps(["s1", "", "s2"]))
    assert load_prompts("file", 2, path=strings) == ["s1", "s2"]


def test_json_errors_name_the_keys(tmp_path: Path) -> None:
    path = write(tmp_path / "x.json", json.dumps([{"id": 1, "title": "t"}]))
    with pytest.raises(PromptSourceError, match=r"calibration\.column.*keys: \['id', 'title'\]"):
        load_prompts("file", 1, path=path)
    bad = write(tmp_path / "bad.json", json.dumps({"captions": ["x"]}))
    with pytest.raises(PromptSourceError, match="unsupported JSON layout"):
        load_prompts("file", 1, path=bad)


def test_too_many_prompts_says_how_many(tmp_path: Path) -> None:
    path = write(tmp_path / "p.txt", "a\nb\nc\n")
    with pytest.raises(PromptSourceError, match=r"calibration\.num_prompts=5.*has only 3 prompts"):
        load_prompts("file", 5, path=path)
    with pytest.raises(PromptSourceError, match=f"has only {len(tiny_prompts())} prompts"):
        check_prompt_source("tiny", 1000)


@pytest.mark.parametrize("num_prompts", [0, -3])
def test_num_prompts_must_be_positive(num_prompts: int) -> None:
    with pytest.raises(PromptSourceError, match=r"calibration\.num_prompts must be >= 1"):
        load_prompts("tiny", num_prompts)
    with pytest.raises(PromptSourceError, match=r"calibration\.num_prompts must be >= 1"):
        check_prompt_source("tiny", num_prompts)


def test_unknown_source_lists_known() -> None:
    with pytest.raises(
        PromptSourceError, match=r"calibration\.source='parti'.*\['coco', 'digits', 'file', 'hf', 'tiny'\]"
    ):
        load_prompts("parti", 1)


def test_missing_or_unsupported_file(tmp_path: Path) -> None:
    with pytest.raises(PromptSourceError, match=r"calibration\.path='.*nope\.txt': no such file"):
        check_prompt_source("file", 1, path=str(tmp_path / "nope.txt"))
    with pytest.raises(PromptSourceError, match=r"calibration\.path is required"):
        check_prompt_source("file", 1)
    parquet = write(tmp_path / "p.parquet", "x")
    with pytest.raises(PromptSourceError, match=r"unsupported suffix.*\.tsv"):
        check_prompt_source("file", 1, path=parquet)


def test_group_names_the_eval_fields(tmp_path: Path) -> None:
    with pytest.raises(PromptSourceError, match=r"eval\.path="):
        check_prompt_source("file", 1, path=str(tmp_path / "nope.txt"), group="eval")


def test_check_accepts_a_valid_source(tmp_path: Path) -> None:
    path = write(tmp_path / "p.txt", "a\nb\n")
    assert check_prompt_source("file", 2, path=path) is None
    assert check_prompt_source("tiny", 16) is None


def fake_datasets(rows: dict[str, list[str]], calls: list[tuple[str, str]]) -> types.ModuleType:
    """A stand-in ``datasets`` module whose ``load_dataset`` slices ``rows`` like a split spec."""
    module = types.ModuleType("datasets")

    class Rows:
        def __init__(self, count: int) -> None:
            self.column_names = list(rows)
            self.count = count

        def __getitem__(self, name: str) -> list[str]:
            return rows[name][: self.count]

    def load_dataset(name: str, split: str) -> Rows:
        calls.append((name, split))
        if name == "offline/dataset":
            raise ConnectionError("no network")
        return Rows(int(split.split("[:")[1].rstrip("]")))

    module.load_dataset = load_dataset  # type: ignore[attr-defined]
    return module


def test_hf_loads_first_rows_of_the_split(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str]] = []
    rows = {"url": ["u1", "u2", "u3"], "caption": ["c1", "c2", "c3"]}
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets(rows, calls))
    assert load_prompts("hf", 2, dataset="org/cc3m") == ["c1", "c2"]
    assert calls == [("org/cc3m", "train[:2]")]
    with pytest.raises(PromptSourceError, match="has only 3 prompts"):
        load_prompts("hf", 5, dataset="org/cc3m")
    with pytest.raises(PromptSourceError, match=r"calibration\.column.*\['url', 'caption'\]"):
        load_prompts("hf", 1, dataset="org/cc3m", column="text_en")


def test_hf_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str]] = []
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets({"caption": ["c"]}, calls))
    with pytest.raises(PromptSourceError, match=r"calibration\.dataset='offline/dataset'.*Offline"):
        load_prompts("hf", 1, dataset="offline/dataset")
    with pytest.raises(PromptSourceError, match=r"calibration\.dataset is required"):
        check_prompt_source("hf", 1)
    check_prompt_source("hf", 10_000, dataset="org/cc3m")
    assert calls == [("offline/dataset", "train[:1]")]  # checking downloads nothing
    monkeypatch.setitem(sys.modules, "datasets", None)  # import now fails, as when not installed
    with pytest.raises(PromptSourceError, match="pip install datasets"):
        check_prompt_source("hf", 1, dataset="org/cc3m")
