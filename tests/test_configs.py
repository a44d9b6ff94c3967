"""Every experiment composes; full-size models build on the meta device with the expected counts."""

import importlib.util
import json
import subprocess
import sys

import hydra
import pytest

from src.inspect import build_on_meta, count_parameters
from src.train import instantiate_strategy
from src.utils.config import ConfigError, check_config, where_set
from tests.helpers import CONF, EXPERIMENTS, compose_cfg, run_module_main

pytestmark = pytest.mark.config

SDXL_UNET_PARAMS = 2_567_463_684
QWEN_VIT_PARAMS = 1_935_610_624
DETOK_ADAPTER_PARAMS = 61_245_696


def test_every_experiment_has_a_tiny_twin():
    full = [e for e in EXPERIMENTS if not e.endswith("_tiny")]
    assert full, "no experiments found"
    for e in full:
        assert f"{e}_tiny" in EXPERIMENTS, f"{e} has no tiny twin"


@pytest.mark.parametrize("experiment", [e for e in EXPERIMENTS if e.endswith("_tiny")])
def test_a_tiny_twin_is_its_full_size_experiment_plus_the_shared_tiny_settings(experiment):
    """A tiny twin inherits its own full-size experiment (so it trains what that one trains) and the shared
    conf/debug/tiny.yaml (directly or through a debug/tiny_* family file), stating only its own deltas."""
    from omegaconf import OmegaConf

    def chain(name: str) -> list[str]:
        path = CONF / f"{name}.yaml"
        entries = [e for e in OmegaConf.load(path).get("defaults", []) if isinstance(e, str) and e != "_self_"]
        return [name, *(x for e in entries if e.startswith("/debug/") for x in chain(e.lstrip("/")))]

    defaults = [e for e in OmegaConf.load(CONF / "experiment" / f"{experiment}.yaml").defaults if isinstance(e, str)]
    assert defaults[0] == experiment.removesuffix("_tiny")
    shared = [d for d in defaults if d.startswith("/debug/")]
    assert shared and "debug/tiny" in chain(shared[0].lstrip("/"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes(experiment, tmp_path):
    cfg = compose_cfg(experiment, tmp_path)
    assert cfg.stage._target_.startswith("src.stages.")
    assert cfg.data._target_.startswith("src.data.")
    assert cfg.task_name == experiment


def test_experiments_only_override():
    """Experiment files state deltas: they never restate a group default with `- group: x` (no override)."""
    for path in (CONF / "experiment").glob("*.yaml"):
        for line in path.read_text().splitlines():
            s = line.strip()
            if s.startswith("- ") and ":" in s and not s.startswith("- override"):
                pytest.fail(f"{path.name}: '{s}' sets a group without `override`")
            assert "from_pretrained" not in s, f"{path.name}: weights are paths loaded by code"


def test_detok_pretrain_full_size_on_meta():
    module = build_on_meta(compose_cfg("seedx_detok_pretrain"))
    counts = count_parameters(module)
    m = counts["modules"]
    assert m["unet"]["total"] == SDXL_UNET_PARAMS
    assert m["vit"]["total"] == QWEN_VIT_PARAMS and m["vit"]["trainable"] == 0
    assert m["resampler"]["total"] == m["resampler"]["trainable"] == DETOK_ADAPTER_PARAMS
    kv = sum(p.numel() for n, p in module.unet.named_parameters() if ".to_k." in n or ".to_v." in n)
    assert m["unet"]["trainable"] == kv > 0
    assert counts["trainable"] == DETOK_ADAPTER_PARAMS + kv
    assert all(p.device.type == "meta" for p in module.parameters())


def test_detok_cond_full_size_on_meta():
    module = build_on_meta(compose_cfg("seedx_detok_cond"))
    counts = count_parameters(module)["modules"]
    # conv_in widened 4 -> 8: +320 * 4 * 3 * 3 weights, and the whole UNet trains.
    assert counts["unet"]["total"] == SDXL_UNET_PARAMS + 320 * 4 * 9
    assert counts["unet"]["trainable"] == counts["unet"]["total"]
    assert module.unet.config.in_channels == 8


def test_inspect_cli_prints_json_line(tmp_path, capsys):
    from src.inspect import main

    code, stdout, stderr = run_module_main(main, ["experiment=seedx_detok_pretrain"], capsys)
    assert code == 0, stderr[-2000:]
    last = json.loads(stdout.strip().splitlines()[-1])
    assert last["modules"]["unet"]["total"] == SDXL_UNET_PARAMS
    assert last["trainable"] < last["total"]


def test_missing_sdxl_weights_name_the_key(tmp_path):
    from src.utils.weights import MissingWeightsError

    cfg = compose_cfg("seedx_detok_pretrain", tmp_path)
    module = hydra.utils.instantiate(cfg.stage, _convert_="all")
    with pytest.raises(MissingWeightsError, match="model.detokenizer.pretrained_dir"):
        module.configure_model()


def test_config_mistake_fails_before_build(tmp_path):
    cfg = compose_cfg("seedx_detok_pretrain_tiny", tmp_path, ["model.detokenizer.unet.cross_attention_dim=7"])
    with pytest.raises(Exception, match="cross_attention_dim"):
        hydra.utils.instantiate(cfg.stage, _convert_="all")


def test_stage2_without_stage1_weights_fails_naming_key(tmp_path):
    cfg = compose_cfg("seedx_detok_cond", tmp_path, ["model.detokenizer.pretrained_dir=/nonexistent"])
    module = hydra.utils.instantiate(cfg.stage, _convert_="all")
    with pytest.raises(ValueError, match="model.detokenizer.adapter_weights"):
        module.configure_model()
    assert not hasattr(module, "unet")  # nothing was built



STRATEGIES = sorted(p.stem for p in (CONF / "strategy").glob("*.yaml"))


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_strategy_composes_with_every_experiment(experiment, strategy, tmp_path):
    cfg = compose_cfg(experiment, tmp_path, [f"strategy={strategy}"])
    check_config(cfg)
    if strategy == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        assert cfg.strategy._target_.endswith("DeepSpeedStrategy")  # composes; deepspeed is a cluster extra
        return
    # as src.train builds it: `blocks: null` (strategy=fsdp) takes the stage's model spec's block classes
    built = instantiate_strategy(cfg.strategy, hydra.utils.get_class(cfg.stage._target_))
    assert type(built).__name__.endswith("Strategy")


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_passes_the_type_checks(experiment, tmp_path):
    check_config(compose_cfg(experiment, tmp_path))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.vit.width=abc", "model.vit.width: expected int, got str 'abc'"),
        ("data.batch_size=2.5", "data.batch_size: expected int"),
        ("+model.vit.widht=3", "model.vit.widht: unknown key"),
        ("stage.optimizer.lr=fast", "stage.optimizer.lr: expected float"),  # the nested optimizer node too
    ],
)
def test_type_errors_name_key_and_origin(override, message, tmp_path):
    cfg = compose_cfg("seedx_pretrain_tiny", tmp_path, [override])
    if message is None:
        check_config(cfg, [override])
        return
    with pytest.raises(ConfigError) as err:
        check_config(cfg, [override])
    assert message in str(err.value)
    assert f"command-line override `{override}`" in str(err.value)


def test_where_set_names_the_yaml_file():
    choices = {"experiment": "seedx_pretrain_tiny", "model/vit": "tiny", "trainer": "cpu"}
    assert where_set("model.vit.width", choices=choices) == "conf/model/vit/tiny.yaml"
    assert where_set("model.vit.patch_size", choices=choices) == "conf/model/vit/qwen_vit_g.yaml"
    assert where_set("data.max_length", choices=choices) == "conf/experiment/seedx_pretrain_tiny.yaml"
    assert where_set("trainer.max_steps", choices=choices) == "conf/debug/tiny.yaml"  # shared by the tiny twins
    assert where_set("stage.optimizer.lr", choices=choices) == "conf/debug/tiny_seedx_mllm.yaml"
    assert where_set("trainer.precision", choices=choices) == "conf/trainer/cpu.yaml"


def test_unknown_experiment_lists_the_available_ones(tmp_path, capsys):
    from src.train import main

    code, _, stderr = run_module_main(main, ["experiment=no_such_stage", f"paths.output_dir={tmp_path}"], capsys)
    assert code != 0
    assert "no_such_stage" in stderr and "seedx_pretrain_tiny" in stderr


@pytest.mark.slow  # subprocess runs (~30 s each here); CI runs the slow tier
def test_readme_slurm_example_validates_with_cfg_job(tmp_path):
    readme = (CONF.parent / "docs" / "cluster.md").read_text()  # the README's cluster section moved there
    line = next(x for x in readme.splitlines() if x.startswith("python -m src.train -m launcher=slurm"))
    args = line.split()[3:]  # after "python -m src.train"
    args = [a for a in args if a != "-m"]
    out = subprocess.run(
        [sys.executable, "-m", "src.train", *args, "--cfg", "hydra"],
        capture_output=True, text=True, cwd=CONF.parent, timeout=120, check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "SlurmLauncher" in out.stdout and "partition: gpu" in out.stdout
    job = subprocess.run(
        [sys.executable, "-m", "src.train", *args, "--cfg", "job", "--resolve"],
        capture_output=True, text=True, cwd=CONF.parent, timeout=120, check=False,
    )
    assert job.returncode == 0, job.stderr[-2000:]
    assert "num_nodes: 6" in job.stdout and "src.parallel.FSDP2Strategy" in job.stdout
