"""Every recipe composes into a valid typed config; typos are rejected with the key named."""

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError

from qvl_train.config import RECIPE_DIR, compose, to_config

RECIPES = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def test_the_required_recipes_exist():
    assert {"vqa", "video_qa", "full_sft", "30b_a3b_lora", "30b_a3b_full", "235b_a22b_lora", "235b_a22b_full"} <= set(RECIPES)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_composes(recipe):
    cfg = to_config(compose([f"+recipe={recipe}"]))
    assert cfg.train.max_steps > 0 and cfg.data.datasets
    if recipe.endswith("_lora"):
        assert cfg.peft.method == "lora" and cfg.peft.experts
    if recipe.startswith(("30b", "235b")):
        assert cfg.model.path and cfg.model.preset is None and cfg.parallel.ep_size in (8, 16)
        assert cfg.model.activation_checkpointing


def test_default_is_the_tiny_demo():
    cfg = to_config(compose())
    assert cfg.model.preset == "tiny" and cfg.data.datasets[0].path.endswith("vqa_demo/train.jsonl")
    assert cfg.logging.wandb.mode == "offline"


def test_overrides_apply():
    cfg = to_config(compose(["+recipe=vqa", "parallel.ep_size=2", "optim.lr=0.5", "data.max_length=64"]))
    assert cfg.parallel.ep_size == 2 and cfg.optim.lr == 0.5 and cfg.data.max_length == 64


@pytest.mark.parametrize("override", ["optim.lrr=1.0", "train.max_stepz=3", "data.tokens_per_batchh=4"])
def test_typo_in_an_override_is_rejected_naming_the_key(override):
    with pytest.raises((ConfigCompositionException, ConfigKeyError)) as err:
        compose(["+recipe=vqa", override])
    assert override.split("=")[0].split(".")[-1] in str(err.value) + str(err.value.__cause__)


def test_wrong_type_is_rejected():
    with pytest.raises(Exception, match="max_steps"):
        compose(["train.max_steps=many"])


def test_unknown_recipe_lists_the_choices():
    with pytest.raises(ConfigCompositionException, match="vqa"):
        compose(["+recipe=nope"])


def test_value_errors_explain_the_fix():
    with pytest.raises(ValueError, match="model.path=/local/hf/model/dir"):
        to_config(compose(["model.preset=null"]))
    with pytest.raises(ValueError, match="offline, online or disabled"):
        to_config(compose(["logging.wandb.mode=cloud"]))
    with pytest.raises(ValueError, match="sdpa_docs"):
        to_config(compose(["model.attn_impl=flash"]))
    assert to_config(compose(["model.attn_impl=sdpa_mask"])).model.attn_impl == "sdpa_mask"
