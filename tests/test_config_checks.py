"""Values wrong for the code that uses them fail in check_config, before any model is built, naming the
key and where it was set (issue 9, item 11). No model is built here: every test checks a composed config."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from src.utils.config import ConfigError, check_config, where_set
from tests.helpers import CONF

pytestmark = pytest.mark.config


def compose_like_train(experiment: str, tmp_path, overrides: list[str] = ()):
    """The config, task overrides and group choices exactly as `python -m src.train` hands them over."""
    overrides = [f"experiment={experiment}", *overrides]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    task, choices = list(cfg.hydra.overrides.task), dict(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
        cfg.paths.output_dir = str(tmp_path)
    return cfg, task, choices


def problems_of(experiment: str, tmp_path, overrides: list[str] = (), **kw) -> str:
    cfg, task, choices = compose_like_train(experiment, tmp_path, overrides)
    with pytest.raises(ConfigError) as err:
        check_config(cfg, task, choices, **kw)
    return str(err.value)


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def with_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


# ---- optimizer arguments: the nested `_target_` node, checked against torch's own signature and checks ----
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("stage.optimizer.lr=abc", "stage.optimizer.lr: expected float | Tensor, got str 'abc'"),
        ("stage.optimizer.betas=[0.9,abc]", "stage.optimizer.betas: item 1: expected float | Tensor"),
        ("stage.optimizer.betas=[0.9]", "stage.optimizer.betas: expected 2 items"),
        ("+stage.optimizer.momentum=0.9", "stage.optimizer.momentum: unknown key"),
        ("stage.optimizer.lr=-1", "stage.optimizer.lr: AdamW rejects it: Invalid learning rate"),
        ("stage.optimizer.betas=[0.9,1.5]", "stage.optimizer.betas: AdamW rejects it: Invalid beta parameter"),
        ("stage.optimizer.eps=-1e-8", "stage.optimizer.eps: AdamW rejects it: Invalid epsilon"),
        ("stage.optimizer.weight_decay=-0.1", "stage.optimizer.weight_decay: AdamW rejects it"),
    ],
)
def test_optimizer_arguments_are_checked_by_torch(override, message, tmp_path):
    text = problems_of("seedx_pretrain_tiny", tmp_path, [override])
    assert message in text
    assert f"command-line override `{override}`" in text


# ---- sizes and counts: typed constraints on the consuming constructors / dataclasses, and a trainer table ----
@pytest.mark.parametrize(
    ("experiment", "override", "message"),
    [
        ("seedx_pretrain_tiny", "data.batch_size=-1", "data.batch_size: must be > 0, got -1"),
        ("seedx_detok_pretrain_tiny", "data.batch_size=0", "data.batch_size: must be > 0, got 0"),
        ("seedx_pretrain_tiny", "+data.val_batch_size=0", "data.val_batch_size: must be > 0"),
        ("seedx_pretrain_tiny", "data.num_workers=-1", "data.num_workers: must be >= 0"),
        ("seedx_pretrain_tiny", "data.max_length=0", "data.max_length: must be > 0"),
        ("seedx_pretrain_tiny", "data.samples_per_epoch=0", "data.samples_per_epoch: must be > 0"),
        ("seedx_pretrain_tiny", "data.t2i_ratio=1.5", "data.t2i_ratio: must be in [0, 1]"),
        ("seedx_detok_pretrain_tiny", "data.resolution=-32", "data.resolution: must be > 0"),
        ("seedx_detok_pretrain_tiny", "stage.sample_steps=0", "stage.sample_steps: must be > 0"),
        ("seedx_detok_cond_tiny", "stage.cond_drop_rate=2", "stage.cond_drop_rate: must be in [0, 1]"),
        ("seedx_pretrain_tiny", "stage.vit_chunk_size=0", "stage.vit_chunk_size: must be > 0"),
        ("seedx_pretrain_tiny", "stage.scheduler.warmup_steps=-5", "stage.scheduler.warmup_steps: must be >= 0"),
        ("seedx_pretrain_tiny", "stage.scheduler.name=cosin", "stage.scheduler.name: expected one of 'cosine'"),
        ("seedx_pretrain_tiny", "+stage.scheduler.warmup=5", "stage.scheduler.warmup: unknown key"),
        ("seedx_pretrain_tiny", "model.vit.width=-32", "model.vit.width: must be > 0"),
        ("seedx_detok_pretrain_tiny", "model.detokenizer.resolution=0", "model.detokenizer.resolution: must be > 0"),
        ("seedx_pretrain_tiny", "trainer.max_steps=0", "trainer.max_steps: must be -1 or > 0, got 0"),
        ("seedx_pretrain_tiny", "trainer.max_steps=-2", "trainer.max_steps: must be -1 or > 0"),
        ("seedx_pretrain_tiny", "trainer.devices=0", "trainer.devices: must be -1 or > 0"),
        ("seedx_pretrain_tiny", "trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches: must be > 0"),
        ("seedx_pretrain_tiny", "trainer.log_every_n_steps=0", "trainer.log_every_n_steps: must be > 0"),
        ("seedx_pretrain_tiny", "callbacks.model_checkpoint.every_n_train_steps=abc",
         "callbacks.model_checkpoint.every_n_train_steps: expected"),
    ],
)
def test_non_positive_sizes_and_counts_name_key_and_origin(experiment, override, message, tmp_path):
    text = problems_of(experiment, tmp_path, [override])
    assert message in text
    assert f"command-line override `{override}`" in text


def test_unlimited_and_tuple_values_pass(tmp_path):
    cfg, task, choices = compose_like_train(
        "seedx_pretrain_tiny", tmp_path, ["trainer.max_steps=-1", "stage.optimizer.betas=[0.9,0.95]", "trainer.devices=auto"]
    )
    check_config(cfg, task, choices)


def test_cross_checks_of_config_dataclasses_run_before_the_build(tmp_path):
    # 50 % 14 != 0: QwenViTConfig.__post_init__ says so, under the key it names, with its origin.
    text = problems_of("seedx_pretrain_tiny", tmp_path, ["model.vit.image_size=50"])
    assert "model.vit.patch_size" in text and "must divide image_size=50" in text


def test_every_problem_at_once(tmp_path):
    text = problems_of("seedx_pretrain_tiny", tmp_path,
                       ["data.batch_size=-1", "data.num_workers=-1", "stage.optimizer.lr=abc", "trainer.max_steps=0"])
    assert text.startswith("4 config problem(s)")


def test_train_fails_before_any_model_is_built(tmp_path, monkeypatch):
    from src.stages.base import StageModule
    from src.train import train

    def built(self):
        raise AssertionError("a model was built")

    monkeypatch.setattr(StageModule, "configure_model", built)
    cfg, task, choices = compose_like_train("seedx_pretrain_tiny", tmp_path, ["data.batch_size=-1"])
    with pytest.raises(ConfigError, match="data.batch_size: must be > 0"):
        train(cfg, task, choices)


# ---- a key overridden twice: Hydra keeps the last one, and so does the message ----
def test_where_set_names_the_override_that_won():
    overrides = ["data.batch_size=4", "data.batch_size=-1"]
    assert where_set("data.batch_size", overrides) == (
        "command-line override `data.batch_size=-1`, which overrode `data.batch_size=4`"
    )


def test_twice_overridden_key_reports_the_winner(tmp_path):
    cfg, task, choices = compose_like_train("seedx_pretrain_tiny", tmp_path, ["data.batch_size=4", "data.batch_size=-1"])
    assert cfg.data.batch_size == -1  # Hydra 1.3.8 applies both, in order
    with pytest.raises(ConfigError) as err:
        check_config(cfg, task, choices)
    assert "data.batch_size: must be > 0, got -1 (set in command-line override `data.batch_size=-1`, which " \
           "overrode `data.batch_size=4`)" in str(err.value)


# ---- full size on a machine without CUDA ----
def test_full_size_without_cuda_names_trainer_and_tiny_twin(tmp_path, no_cuda):
    text = problems_of("seedx_pretrain", tmp_path, for_training=True)
    line = next(x for x in text.splitlines() if "trainer.accelerator" in x)
    assert "torch.cuda.is_available() is False" in line
    assert "trainer=cpu" in line and "experiment=seedx_pretrain_tiny" in line
    assert "conf/experiment/seedx_pretrain.yaml" in line  # chose trainer=gpu
    assert line.endswith("(set in conf/trainer/gpu.yaml)")


def test_gpu_trainer_override_on_a_tiny_twin_without_cuda(tmp_path, no_cuda):
    text = problems_of("seedx_detok_pretrain_tiny", tmp_path, ["trainer=gpu"], for_training=True)
    assert "trainer=gpu from command-line override `trainer=gpu`" in text and "trainer=cpu" in text


def test_cuda_only_strategy_without_cuda(tmp_path, no_cuda):
    text = problems_of("seedx_pretrain_tiny", tmp_path, ["strategy=fsdp"], for_training=True)
    assert "strategy=fsdp needs CUDA" in text and "strategy=fsdp2" in text


def test_full_size_train_without_cuda_fails_before_build(tmp_path, no_cuda, monkeypatch):
    from src.stages.base import StageModule
    from src.train import train

    monkeypatch.setattr(StageModule, "configure_model", lambda self: pytest.fail("a model was built"))
    cfg, task, choices = compose_like_train("seedx_pretrain", tmp_path)
    with pytest.raises(ConfigError, match="trainer=cpu"):
        train(cfg, task, choices)


# ---- missing weight paths: every one at once, from the model configs' required_paths() ----
def test_full_size_lists_every_missing_weight_path(tmp_path, with_cuda):
    text = problems_of("seedx_detok_cond", tmp_path, for_training=True)
    assert text.startswith("3 config problem(s)")
    assert "model.vit.weights: needs the Qwen-VL ViT state dict" in text
    assert "(set in conf/model/vit/qwen_vit_g.yaml)" in text
    assert "model.detokenizer.pretrained_dir: needs a diffusers SDXL base folder" in text
    assert "model.detokenizer.adapter_weights: needs a stage-1 checkpoint" in text
    assert "set `model.detokenizer.pretrained_dir=/local/path`" in text


def test_mllm_full_size_lists_llm_vit_and_tokenizer(tmp_path, with_cuda):
    text = problems_of("seedx_pretrain", tmp_path, ["model.vit.weights=/nonexistent/qwen_vit_G.pt"], for_training=True)
    assert "model.llm.weights: needs a local Llama-2-chat HF folder" in text
    assert "model.vit.weights: needs the Qwen-VL ViT state dict (qwen_vit_G.pt), but '/nonexistent/qwen_vit_G.pt' " \
           "does not exist" in text
    assert "data.tokenizer_path: needs a local tokenizer folder" in text


def test_present_weight_paths_pass(tmp_path, with_cuda):
    sdxl, vit, stage1 = tmp_path / "sdxl", tmp_path / "vit.pt", tmp_path / "stage1.ckpt"
    sdxl.mkdir()
    vit.touch()
    stage1.touch()
    cfg, task, choices = compose_like_train("seedx_detok_cond", tmp_path / "out", [
        f"model.detokenizer.pretrained_dir={sdxl}", f"model.vit.weights={vit}",
        f"model.detokenizer.adapter_weights={stage1}"])
    check_config(cfg, task, choices, for_training=True)
    check_config(compose_like_train("seedx_detok_cond", tmp_path)[0])  # meta builds (src.inspect) need none


def test_missing_tokenizer_and_resume_checkpoint(tmp_path):
    text = problems_of("seedx_pretrain_tiny", tmp_path, ["data.tokenizer_path=/nonexistent/tok",
                                                         "ckpt_path=/nonexistent/last.ckpt"], for_training=True)
    assert "data.tokenizer_path: needs a local tokenizer folder" in text and "'/nonexistent/tok' does not exist" in text
    assert "ckpt_path: '/nonexistent/last.ckpt' does not exist" in text


def test_build_time_check_lists_every_missing_path(tmp_path):
    import hydra

    from src.utils.weights import MissingWeightsError

    cfg, _, _ = compose_like_train("seedx_detok_cond", tmp_path)
    module = hydra.utils.instantiate(cfg.stage, _convert_="all")
    with pytest.raises(MissingWeightsError) as err:
        module.configure_model()
    for key in ("model.vit.weights", "model.detokenizer.pretrained_dir", "model.detokenizer.adapter_weights"):
        assert key in str(err.value)
    assert not hasattr(module, "unet")


# ---- typed nodes (pydantic): every stage and datamodule has one; cross-checks name the key they check ----
def test_every_stage_and_datamodule_takes_a_typed_node():
    import hydra
    from omegaconf import OmegaConf

    from src.utils.constraints import ConfigModel

    for group in ("stage", "data"):
        for path in sorted((CONF / group).glob("*.yaml")):
            node = OmegaConf.to_container(OmegaConf.load(path))
            if "_target_" not in node:  # a variant of another file of the group (its defaults name it)
                continue
            cls = hydra.utils.get_class(node["_target_"])
            assert issubclass(cls.config_model, ConfigModel), f"{path.name}: {cls.__name__} has no config_model"
            unknown = set(node) - set(cls.config_model.model_fields) - {"_target_", "defaults"}
            assert not unknown, f"{path.name} sets keys {cls.__name__}'s typed node lacks: {unknown}"


@pytest.mark.parametrize(
    ("experiment", "overrides", "message"),
    [
        ("seedx_pretrain_tiny", ["stage.full_finetune=true"],
         "stage.full_finetune: stage.lora.enabled and stage.full_finetune are both true: pick one"),
        ("seed_llama_pretrain_tiny", ["stage.lora.enabled=false", "stage.full_finetune=false"],
         "stage.full_finetune: nothing would train: set stage.lora.enabled=true or stage.full_finetune=true"),
        ("seedx_detok_cond_tiny", ["stage.cond_drop_rate=0.6", "stage.feature_drop_rate=0.5"],
         "stage.cond_drop_rate: stage.feature_drop_rate + stage.both_drop_rate + stage.cond_drop_rate must be <= 1"),
        ("seedx_pretrain_tiny", ["stage.lora.r=0"], "stage.lora.r: must be > 0, got 0"),
        ("seedx_pretrain_tiny", ["+stage.lora.rank=8"], "stage.lora.rank: unknown key"),
        ("seedx_pretrain_tiny", ["data.truncation=cutt"], "data.truncation: expected one of 'cut', 'skip'"),
        ("seedx_detok_pretrain_tiny", ["data.image_fit=squash"], "data.image_fit: expected one of 'crop', 'stretch'"),
        ("seed_tokenizer_v2_tiny", ["+data.resolution=64"],
         "data.resolution: the SEED tokenizer's one view size is data.image_size"),
        ("seed_llama_pretrain_tiny", ["data.features_dir=/tmp/x"],
         "data.features_dir: SEED-LLaMA reads image codes from its records"),
        ("seedx_detok_pretrain_tiny", ["stage.negative=noise"], "stage.negative: expected one of 'official', 'zeros'"),
        ("seedx_pretrain_tiny", ["data.batch_size=true"], "data.batch_size: expected int, got bool True"),
    ],
)
def test_typed_nodes_and_cross_checks_name_the_key_and_origin(experiment, overrides, message, tmp_path):
    text = problems_of(experiment, tmp_path, overrides)
    assert message in text
    assert "(set in command-line override" in text.split(message)[1].splitlines()[0]


def test_a_model_cross_check_names_its_own_key(tmp_path):
    # the model config says which key its cross-check is about (ConfigValueError), never guessed from the text
    text = problems_of("seedx_pretrain_tiny", tmp_path, ["model.vit.heads=5"])
    assert "model.vit.heads: heads=5 must divide width=" in text and "(set in command-line override" in text
