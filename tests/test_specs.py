"""Model specs (src/specs): one per family, the model recipe apart from the LightningModule.

A stage mixes in its family's recipe and adds the losses; inference builds the recipe's plain nn.Module, whose
state dict is the stage's; a checkpoint names its family and its stage (old ones: the legacy guess).
"""

from __future__ import annotations

import hydra
import pytest
import torch
from lightning import LightningModule
from omegaconf import OmegaConf

from src.specs.base import Recipe, model_args
from src.specs.detokenizer import DETOKENIZER, DetokCondModel, DetokModel
from src.specs.inference import build_detokenizer, detok_stage_of
from src.specs.registry import SPECS, model_config_classes, spec_of
from src.specs.seedx import SEEDX
from src.utils.checkpoint_kind import FAMILY_KEY, STAGE_KEY
from src.utils.config import CONF_DIR as CONF
from tests.helpers import built_stage, lean_checkpoint, perturb_trainable, tiny_run_cfg

pytestmark = pytest.mark.unit

# every stage class -> (its spec, its stage name in the spec)
STAGES = {
    "src.stages.mllm_pretrain.MLLMPretrainModule": ("seedx_mllm", "pretrain"),
    "src.stages.mllm_sft.MLLMSFTModule": ("seedx_mllm", "sft"),
    "src.stages.detok_pretrain.DetokPretrainModule": ("detokenizer", "stage1"),
    "src.stages.detok_cond.DetokCondModule": ("detokenizer", "stage2"),
    "src.stages.seed_qformer.SeedQFormerModule": ("seed_qformer", "stage1"),
    "src.stages.seed_tokenizer.SeedTokenizerModule": ("seed_tokenizer", "stage2"),
    "src.stages.seed_llama.SeedLlamaModule": ("seed_llama", "pretrain"),
    "src.stages.seed_llama.SeedLlamaSFTModule": ("seed_llama", "sft"),
}


@pytest.mark.parametrize("target", sorted(STAGES))
def test_every_stage_holds_its_family_spec_and_the_spec_model_is_plain_torch(target):
    cls = hydra.utils.get_class(target)
    family, stage = STAGES[target]
    assert cls.spec is spec_of(family) and cls.stage_name == stage
    model_cls = cls.spec.stages[stage]
    # the inference model shares the stage's recipe, without Lightning
    assert issubclass(model_cls, torch.nn.Module) and not issubclass(model_cls, LightningModule)
    recipe = next(c for c in model_cls.__mro__ if c.__dict__.get("stage_name") == stage)
    assert issubclass(cls, recipe) and issubclass(recipe, Recipe)


def test_the_spec_registry_covers_every_model_config_node():
    """What the config check needs: each `model.<node>` parsed by the dataclass a spec names."""
    from src.utils.config_nodes import _model_schemas

    groups = {p.name for p in (CONF / "model").iterdir() if p.is_dir()}
    assert set(model_config_classes()) == groups  # every conf/model group, no other
    assert _model_schemas() == model_config_classes()  # the config check reads the specs, no second table
    assert set(SPECS) == {"seedx_mllm", "detokenizer", "seed_qformer", "seed_tokenizer", "seed_llama"}


@pytest.mark.parametrize("experiment, stage", [("seedx_pretrain_tiny", "pretrain"),
                                               ("seedx_detok_cond_tiny", "stage2")])
def test_the_spec_model_equals_the_stage_model(experiment, stage, tmp_path):
    """Same state dict keys and tensors, same trainable set: a stage checkpoint is the spec model's."""
    stage_module = built_stage(experiment, tmp_path)
    args = OmegaConf.to_container(tiny_run_cfg(experiment, tmp_path).stage, resolve=True)
    spec = stage_module.spec
    plain = spec.stages[stage](**model_args(spec.stages[stage], args))
    if experiment.startswith("seedx_detok_cond"):
        plain.require_stage1 = True  # as the experiment's stage (its tiny twin starts from random init)
    plain.build_models(load_weights=True)
    a, b = stage_module.state_dict(), plain.state_dict()
    assert list(a) == list(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert stage_module.frozen_state_keys() == plain.frozen_state_keys()


def test_a_checkpoint_names_its_family_and_stage(tmp_path):
    stage = built_stage("seedx_detok_cond_tiny", tmp_path)
    checkpoint = {"state_dict": stage.state_dict()}
    stage.on_save_checkpoint(checkpoint)
    assert checkpoint[FAMILY_KEY] == "detokenizer" and checkpoint[STAGE_KEY] == "stage2"
    assert detok_stage_of(checkpoint) == "stage2"


def test_the_stored_stage_name_wins_and_old_checkpoints_take_the_legacy_path():
    # stored: no guessing from the hyper-parameters
    assert DETOKENIZER.stage_of({STAGE_KEY: "stage1", "hyper_parameters": {"cond_drop_rate": 0.1}}) == "stage1"
    assert SEEDX.stage_of({STAGE_KEY: "pretrain", "hyper_parameters": {"init_from": "x"}}) == "pretrain"
    # legacy (no stage_name): stage 2 takes the condition drop rate, SFT stages init_from
    assert DETOKENIZER.stage_of({"hyper_parameters": {"cond_drop_rate": 0.1}}) == "stage2"
    assert DETOKENIZER.stage_of({"hyper_parameters": {"feature_drop_rate": 0.1}}) == "stage1"
    assert SEEDX.stage_of({"hyper_parameters": {"init_from": None}}) == "sft"
    assert SEEDX.stage_of({"hyper_parameters": {}}) == "pretrain"


def test_inference_builds_the_stage_named_in_the_checkpoint_and_refuses_the_other(tmp_path):
    """A stage-2 checkpoint that names its stage builds the plain stage-2 model (no Lightning), equal to the
    trained stage; asked for stage 1, it is refused by name."""
    stage = built_stage("seedx_detok_cond_tiny", tmp_path)
    perturb_trainable(stage, 0)
    path = tmp_path / "last.ckpt"
    lean_checkpoint(stage, path)
    checkpoint = torch.load(path, weights_only=False)
    checkpoint[STAGE_KEY] = "stage2"
    checkpoint["hyper_parameters"].pop("cond_drop_rate")  # the name alone decides
    torch.save(checkpoint, path)
    model = build_detokenizer({}, "stage2", str(path))
    assert type(model) is DetokCondModel and not isinstance(model, LightningModule)
    for k, v in stage.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0, msg=k)
    with pytest.raises(ValueError, match="needs a stage-1"):
        build_detokenizer({}, "stage1", str(path))
    assert issubclass(DetokCondModel, DetokModel)


def test_strategy_fsdp_wraps_the_spec_blocks(tmp_path):
    """conf/strategy/fsdp.yaml names no block classes: src.train passes the stage spec's."""
    from src.parallel import block_classes
    from src.train import instantiate_strategy

    cfg = tiny_run_cfg("seed_tokenizer_v2_tiny", tmp_path, ["strategy=fsdp"])
    assert cfg.strategy.blocks is None
    module = hydra.utils.instantiate(cfg.stage, _convert_="all")
    strategy = instantiate_strategy(cfg.strategy, module)
    policy = strategy.kwargs["auto_wrap_policy"]
    assert set(policy._module_classes) == set(block_classes(list(module.spec.fsdp_blocks)))
    assert "timm.models.eva.EvaBlock" in module.spec.fsdp_blocks  # the SEED blocks the old yaml list lacked
