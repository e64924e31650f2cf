"""Model sources: what a broken or substituted model folder gets, before any engine loads it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from common import models
from common.errors import FtjobsError, InputError

pytestmark = pytest.mark.integration


def _copy(tiny_model: Path, dest: Path) -> Path:
    shutil.copytree(tiny_model, dest)
    return dest


def test_another_model_of_the_same_shape_gets_another_revision(tiny_model: Path, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    same = _copy(tiny_model, tmp_path / "same")
    other = _copy(tiny_model, tmp_path / "other")
    weights = load_file(str(other / "model.safetensors"))
    save_file({k: v + 0.05 * torch.randn_like(v) for k, v in weights.items()}, str(other / "model.safetensors"),
              metadata={"format": "pt"})
    assert (other / "model.safetensors").stat().st_size == (tiny_model / "model.safetensors").stat().st_size
    assert models.resolve(str(same)).revision == models.resolve(str(tiny_model)).revision
    assert models.resolve(str(other)).revision != models.resolve(str(tiny_model)).revision


def test_a_truncated_safetensors_file_is_named_before_loading(tiny_model: Path, tmp_path: Path) -> None:
    broken = _copy(tiny_model, tmp_path / "broken")
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"model.safetensors is truncated or corrupt \(its tensors need \d+ bytes "
                                         r"but the file has \d+\)\. Re-download"):
        models.resolve(str(broken))


def test_a_config_json_that_is_not_json_is_named(tiny_model: Path, tmp_path: Path) -> None:
    broken = _copy(tiny_model, tmp_path / "broken")
    (broken / "config.json").write_text((tiny_model / "config.json").read_text()[:200])
    with pytest.raises(InputError, match=r"config.json is not valid JSON .*re-download the model"):
        models.resolve(str(broken))


def test_a_folder_with_only_a_model_config_holds_no_tokenizer(tmp_path: Path) -> None:
    (tmp_path / "notok").mkdir()
    (tmp_path / "notok" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(InputError, match="holds no tokenizer files"):
        models.resolve(str(tmp_path / "notok"), tokenizer_only=True)


def test_hub_failures_split_permanent_from_transient(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(HFValidationError) as invalid:  # the Hub library's own error for a name it never fetches
        validate_repo_id("no--such..repo")
    assert isinstance(models.hub_error(invalid.value, "model", "no--such..repo"), InputError)
    down = models.hub_error(ConnectionError("Name or service not known"), "model", "demo/base-modl")
    assert type(down) is FtjobsError and down.exit_code == 1  # a Hub outage is worth retrying
    assert "There is no local folder demo/base-modl either" in str(down)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline by choice: a retry cannot help
    assert isinstance(models.hub_error(ConnectionError("offline"), "model", "a/b"), InputError)


def test_s3_folder_markers_do_not_break_a_model_download(tiny_model: Path, s3_root: str, tmp_path: Path) -> None:
    """The AWS console's "Create folder" and some sync tools leave empty keys named like folders (`model/`,
    `model/sub/`) beside the files: a download skips them and gets the same model as without them."""
    from common import storage

    src = storage.join(s3_root, "model")
    storage.upload_dir(tiny_model, src)
    bucket, key = storage.split_s3(src)
    for marker in (f"{key}/", f"{key}/extra/"):
        storage.s3_client().put_object(Bucket=bucket, Key=marker, Body=b"")
    ref = models.resolve(src, cache_dir=tmp_path / "cache")
    assert ref.revision == models.resolve(str(tiny_model)).revision
    tok = models.resolve(src, cache_dir=tmp_path / "cache", tokenizer_only=True)
    assert (tok.path / "tokenizer_config.json").is_file()
    assert [t.rel for t in storage.download_dir(src, tmp_path / "plain")] == sorted(
        p.relative_to(tiny_model).as_posix() for p in tiny_model.rglob("*") if p.is_file())
