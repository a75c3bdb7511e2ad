"""MethodConfig and its presets (edge_unisd/config.py): every preset validates, differs as documented,
and bad keys or values fail with a ConfigError that names the key."""

from __future__ import annotations

import pytest

from edge_unisd.config import PRESETS, ConfigError, MethodConfig, load_method_config


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_loads_and_validates(preset):
    cfg = load_method_config(preset)
    assert isinstance(cfg, MethodConfig)
    assert MethodConfig.model_validate(cfg.model_dump()) == cfg  # round-trips


def test_plain_sd_is_base_teacher_without_extras():
    cfg = load_method_config("sd")
    assert (cfg.mode, cfg.teacher, cfg.clip, cfg.agreement) == ("distill", "base", False, "none")
    assert cfg.contrastive_weight == 0 and cfg.feature_weight == 0 and not cfg.uses_views


def test_single_component_presets_change_one_thing():
    sd = load_method_config("sd").model_dump()
    expected = {
        "ema": {"teacher": "ema"},
        "live": {"teacher": "live"},
        "clip": {"clip": True},
        "agreement-token": {"agreement": "token"},
        "agreement-seq": {"agreement": "sequence"},
        "contrastive": {"contrastive_weight": 0.1},
        "feature": {"feature_weight": 0.1},
    }
    for preset, changed in expected.items():
        cfg = load_method_config(preset).model_dump()
        diff = {k: v for k, v in cfg.items() if sd[k] != v}
        assert diff == changed, preset
    assert load_method_config("clip").clip_cap == 10.0
    assert load_method_config("agreement-token").uses_views and load_method_config("agreement-seq").uses_views


def test_unisd_star_combines_components_with_visible_gamma():
    cfg = load_method_config("unisd-star")
    assert cfg.mode == "distill" and cfg.teacher == "ema" and cfg.clip and cfg.agreement == "token"
    assert cfg.contrastive_weight == 0.01 and cfg.feature_weight == 0.01
    assert cfg.agreement_gamma == 1.0  # not the reference code's 0.001 (defect 3)
    assert cfg.agreement_routing == "all"


def test_edge_is_unisd_star_with_budgeted_routing():
    edge, star = load_method_config("edge").model_dump(), load_method_config("unisd-star").model_dump()
    assert edge["agreement_routing"] == "given"
    assert {k: v for k, v in edge.items() if star[k] != v} == {"agreement_routing": "given"}


def test_sft_preset_is_sft_mode_without_views():
    cfg = load_method_config("sft")
    assert cfg.mode == "sft" and not cfg.uses_views


def test_overrides_merge_into_nested_settings():
    cfg = load_method_config("edge", {"lora": {"rank": 8}, "optim": {"lr": 2e-5}, "divergence": "jsd"})
    assert cfg.lora.rank == 8 and cfg.lora.alpha == 32.0  # sibling nested keys kept
    assert cfg.optim.lr == 2e-5 and cfg.divergence == "jsd" and cfg.teacher == "ema"
    assert PRESETS["edge"].get("lora") is None  # the preset data is not mutated


@pytest.mark.parametrize("overrides, key", [
    ({"lora": {"rnk": 4}}, "lora.rnk"),
    ({"lr": 1e-4}, "lr"),
    ({"optim": {"learning_rate": 1e-4}}, "optim.learning_rate"),
    ({"rollout": {"temp": 0.5}}, "rollout.temp"),
])
def test_unknown_keys_are_rejected_by_name(overrides, key):
    with pytest.raises(ConfigError, match=rf"{key}: unknown key"):
        load_method_config("edge", overrides)


@pytest.mark.parametrize("overrides, key", [
    ({"lora": {"rank": 0}}, "lora.rank"),
    ({"jsd_beta": 1.5}, "jsd_beta"),
    ({"optim": {"lr": -1}}, "optim.lr"),
    ({"temperature": 0}, "temperature"),
    ({"ema_decay": 1.0}, "ema_decay"),
    ({"clip_cap": 0}, "clip_cap"),
    ({"clip_quantile": 1.0}, "clip_quantile"),
    ({"num_views": 1}, "num_views"),
    ({"divergence": "kl"}, "divergence"),
    ({"view_kinds": []}, "view_kinds"),
    ({"rollout": {"top_p": 0}}, "rollout.top_p"),
])
def test_out_of_range_values_are_rejected_by_name(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_method_config("edge", overrides)
    assert f"{key}: " in str(err.value) and "preset 'edge'" in str(err.value)


def test_unknown_preset_is_named():
    with pytest.raises(ConfigError, match=r"unknown preset 'unisd\*'.*unisd-star"):
        load_method_config("unisd*")


def test_batch_size_must_be_a_multiple_of_micro_batch_size():
    message = r"optim\.batch_size \(6\) must be a multiple of optim\.micro_batch_size \(4\)"
    with pytest.raises(ConfigError, match=message):
        load_method_config("sd", {"optim": {"batch_size": 6, "micro_batch_size": 4}})
    cfg = load_method_config("sd", {"optim": {"batch_size": 8, "micro_batch_size": 2}})
    assert cfg.optim.batch_size // cfg.optim.micro_batch_size == 4


def test_assignment_is_validated_too():
    cfg = load_method_config("sd")
    with pytest.raises(ValueError):
        cfg.jsd_beta = 2.0
    with pytest.raises(ValueError):
        cfg.lora.rank = 0


def test_clipping_without_any_cap_is_rejected():
    with pytest.raises(ConfigError, match="clip_cap"):
        load_method_config("clip", {"clip_cap": None, "clip_quantile": None})
    assert load_method_config("clip", {"clip_cap": None, "clip_quantile": 0.99}).clip_quantile == 0.99
