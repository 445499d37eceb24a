"""AdaptConfig: closed choices are Enums that still take strings; out-of-range values are errors, not clamped."""

from __future__ import annotations

import pytest

from l2l_peft.cli import build_parser
from l2l_peft.config import AdaptConfig, HeadInit, LoraTargets
from l2l_peft.train import plan


@pytest.mark.parametrize(
    "field, text, member",
    [
        ("lora_targets", "qkv", LoraTargets.QKV),
        ("lora_targets", "all", LoraTargets.ALL),
        ("head_init", "zero", HeadInit.ZERO),
    ],
)
def test_closed_choices_take_strings_and_members(field, text, member):
    """YAML and experiments pass strings; both forms give the member, and to_dict() gives the string back."""
    config = AdaptConfig(**{field: text})
    assert getattr(config, field) is member and getattr(AdaptConfig(**{field: member}), field) is member
    assert config.to_dict()[field] == text


@pytest.mark.parametrize("field, value", [("lora_targets", "qk"), ("head_init", "prototypes"), ("head_init", None)])
def test_unknown_choice_names_the_field_and_the_choices(field, value):
    with pytest.raises(ValueError, match=rf"AdaptConfig\.{field} must be one of"):
        AdaptConfig(**{field: value})


def test_cli_choices_come_from_the_enums():
    parser = build_parser()
    choices = {a.dest: a.choices for a in parser._actions}
    assert choices["lora_targets"] == ["qv", "qkv", "attn", "all"] and choices["head_init"] == ["prototype", "zero"]
    assert parser.parse_args(["a", "b"]).head_init == "prototype"


@pytest.mark.parametrize(
    "field, value",
    [
        ("min_steps", -1),
        ("prefix_views", -1),
        ("lr_head", -1e-3),
        ("lr_adapter", -1e-3),
        ("weight_decay", -0.1),
        ("epochs", -1.0),
        ("lora_alpha", 0.0),
        ("lora_dropout", 1.0),
        ("lora_dropout", -0.1),
        ("warmup_frac", 1.0),
        ("transductive", -0.5),
        ("lora_last_blocks", 0),
        ("full_last_blocks", 0),
    ],
)
def test_out_of_range_is_an_error_not_clamped(field, value):
    with pytest.raises(ValueError, match=rf"AdaptConfig\.{field} must be"):
        AdaptConfig(**{field: value})


def test_max_steps_caps_min_steps_without_rewriting_it():
    """`--max-steps 5` alone trains 5 steps: the upper bound wins over the default min_steps (20)."""
    config = AdaptConfig(max_steps=5)
    assert config.min_steps == 20  # kept as given, not clamped
    assert plan(10, config) == (10, 5)
    assert plan(10, AdaptConfig(max_steps=100, min_steps=30, epochs=1.0)) == (10, 30)


def test_transductive_needs_images_every_step():
    """The query batch rides with the support images; the cached-prefix path has no images to add it to."""
    with pytest.raises(ValueError, match="AdaptConfig.transductive needs the query images every step"):
        AdaptConfig(transductive=0.5, lora_last_blocks=2)
    AdaptConfig(transductive=0.5, lora_last_blocks=2, prefix_views=0)  # blocks run every step: fine
    with pytest.raises(ValueError, match="AdaptConfig.transductive needs the query images every step"):
        AdaptConfig(transductive=0.5, full_last_blocks=2)
