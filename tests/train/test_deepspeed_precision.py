"""DeepSpeed learns train.precision: the generated config, the refusal of a contradicting user file, CPU runs.

Oracles: hand-written DeepSpeed sections and DeepSpeed's own config parser; for the runs, the dtype a
convolution computes in, an fp32 run's first loss from the same seeds, and the loss scale at save time.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from dist_train.config import ConfigError
from dist_train.train.checkpoint import read_pointer
from dist_train.train.distributed import DistEnv
from dist_train.train.engine.zero import check_deepspeed_file, deepspeed_config
from dist_train.train.loop import Trainer

from multiprocess import run_on_ranks
from run_helpers import tiny_config as tiny


@pytest.mark.parametrize(("precision", "expected", "dtype"), [
    ("fp32", {"enabled": False}, None),
    ("bf16", {"enabled": True, "dtype": "bfloat16"}, torch.bfloat16),
    ("fp16", {"enabled": True, "dtype": "float16"}, torch.float16),
])
def test_the_generated_config_carries_train_precision(precision, expected, dtype, make_shards, tmp_path):
    """torch_autocast keeps fp32 weights; DeepSpeed's 16-bit-weight modes stay off."""
    from deepspeed.runtime.config import DeepSpeedConfig

    generated = deepspeed_config(tiny(make_shards(), tmp_path, f"train.precision={precision}"), DistEnv())
    assert generated["torch_autocast"] == expected
    assert "fp16" not in generated and "bf16" not in generated
    parsed = DeepSpeedConfig(generated)
    assert parsed.torch_autocast_enabled == (dtype is not None)
    assert parsed.torch_autocast_dtype == dtype
    assert not parsed.float16_config.enabled and not parsed.bfloat16_config.enabled


@pytest.mark.parametrize(("setting", "expected"), [("null", 0.0), ("0.5", 0.5)])
def test_deepspeed_clips_only_where_ddp_does(setting, expected, make_shards, tmp_path):
    """DeepSpeed's default gradient_clipping is 1.0; DDP clips only when optim.grad_clip is set."""
    from deepspeed.runtime.config import DeepSpeedConfig

    generated = deepspeed_config(tiny(make_shards(), tmp_path, f"optim.grad_clip={setting}"), DistEnv())
    assert DeepSpeedConfig(generated).gradient_clipping == expected


def _user_file(tmp_path: Path, settings: dict) -> Path:
    path = tmp_path / "user_ds.json"
    path.write_text(json.dumps(settings))
    return path


@pytest.mark.parametrize(("settings", "precision", "named"), [
    ({"fp16": {"enabled": True}}, "bf16", ("fp16.enabled", "train.precision=bf16")),
    ({"torch_autocast": {"enabled": True, "dtype": "bfloat16"}}, "fp32",
     ("torch_autocast.dtype", "train.precision=fp32")),
    ({"bf16": {"enabled": True}}, "bf16", ("bf16.enabled", "train.precision=bf16")),
    ({"gradient_clipping": 1.0}, "fp32", ("gradient_clipping", "optim.grad_clip=None")),
    ({"train_micro_batch_size_per_gpu": 999}, "fp32", ("train_micro_batch_size_per_gpu", "train.batch_size=")),
    ({"gradient_accumulation_steps": 7}, "fp32", ("gradient_accumulation_steps", "train.accumulation_steps=")),
    ({"zero_optimization": {"stage": 3}}, "fp32", ("zero_optimization.stage", "engine.zero_stage=0")),
    ({"train_batch_size": 64}, "fp32", ("train_batch_size", "follows the world size")),
])
def test_a_user_file_that_contradicts_ours_is_refused_in_one_line(settings, precision, named, make_shards, tmp_path):
    user = _user_file(tmp_path, settings)
    before = user.read_text()
    cfg = tiny(make_shards(), tmp_path, "engine.kind=deepspeed", f"train.precision={precision}",
               f"engine.deepspeed_config={user}")
    with pytest.raises(ConfigError) as refused:
        check_deepspeed_file(cfg)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(str(user))
    assert all(name in message for name in named), message
    assert user.read_text() == before


def test_a_user_file_may_repeat_our_batch_and_stage(make_shards, tmp_path):
    """Before, batch sizes and stage were silently overridden whatever the file said; now only a repeat passes."""
    cfg = tiny(make_shards(), tmp_path, "engine.kind=deepspeed", "engine.zero_stage=2")
    user = _user_file(tmp_path, {"train_micro_batch_size_per_gpu": cfg.train.batch_size,
                                 "gradient_accumulation_steps": cfg.train.accumulation_steps,
                                 "zero_optimization": {"stage": 2}})
    check_deepspeed_file(dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, deepspeed_config=str(user))))


def test_an_agreeing_user_file_keeps_its_other_settings(make_shards, tmp_path):
    modules = ["torch.nn.modules.linear.Linear"]
    user = _user_file(tmp_path, {"torch_autocast": {"enabled": True, "dtype": "bf16",
                                                    "lower_precision_safe_modules": modules},
                                 "zero_optimization": {"reduce_bucket_size": 1000}})
    cfg = tiny(make_shards(), tmp_path, "engine.kind=deepspeed", "train.precision=bf16",
               f"engine.deepspeed_config={user}")
    check_deepspeed_file(cfg)
    generated = deepspeed_config(cfg, DistEnv())
    expected = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": modules}
    assert generated["torch_autocast"] == expected
    assert generated["zero_optimization"] == {"reduce_bucket_size": 1000, "stage": 0}


def test_an_unreadable_user_file_is_refused_in_one_line(make_shards, tmp_path):
    user = tmp_path / "broken.json"
    user.write_text("{not json")
    cfg = tiny(make_shards(), tmp_path, "engine.kind=deepspeed", f"engine.deepspeed_config={user}")
    with pytest.raises(ConfigError, match="engine.deepspeed_config cannot be read") as refused:
        check_deepspeed_file(cfg)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("stage", [1, 2])
def test_fp16_with_zero_1_or_2_is_refused_in_one_line(stage, make_shards, tmp_path):
    """Their overflow check skips the step without lowering torch_autocast's loss scale: every step overflows."""
    cfg = tiny(make_shards(), tmp_path, "engine.kind=deepspeed", f"engine.zero_stage={stage}", "train.precision=fp16")
    with pytest.raises(ConfigError) as refused:
        check_deepspeed_file(cfg, source="recipe.yaml")
    message = str(refused.value)
    assert message.startswith(f"recipe.yaml: engine.zero_stage: {stage} with train.precision=fp16")
    assert "\n" not in message
    check_deepspeed_file(tiny(make_shards(), tmp_path, "engine.kind=deepspeed", "train.precision=fp16"))


# ---------------------------------------------------------------- short CPU runs


def _train(env, shards, run_root: Path, precision: str, stage: int, steps: int = 3) -> tuple[Trainer, dict]:
    """`steps` DeepSpeed steps at `precision`; the first micro-batch's loss and the dtypes the first conv saw."""
    cfg = tiny(shards, run_root, "engine.kind=deepspeed", f"engine.zero_stage={stage}", f"train.precision={precision}",
               "train.epochs=1", f"train.steps_per_epoch={steps}", "train.batch_size=4")
    trainer = Trainer(cfg, env)
    conv = next(module for module in trainer.engine.module.modules() if isinstance(module, nn.Conv2d))
    seen: list[torch.dtype] = []
    hook = conv.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    initial = [param.detach().clone() for param in trainer.engine.module.parameters()]
    trainer.enter_phase(0)
    stats = trainer.run_steps(0, 1)
    first_loss = stats.loss_sum / stats.samples
    trainer.run_steps(0, steps - 1)
    hook.remove()
    moved = any(not torch.equal(a, b) for a, b in zip(initial, trainer.engine.module.parameters()))
    return trainer, {"first_loss": first_loss, "conv_dtypes": set(seen), "moved": moved, "step": trainer.state.step,
                     "param_dtypes": {param.dtype for param in trainer.engine.module.parameters()}}


def _precision_runs(env, shards, run_root: Path) -> dict:
    """fp32 (the oracle), bf16 on ZeRO 0 and 2, then fp16 saved and resumed, in one process.

    fp16 comes last: DeepSpeed keeps the autocast dtype of the last torch_autocast engine in a module
    global that later ZeRO 1-2 optimizers read."""
    results = {f"{precision}-{stage}": _train(env, shards, run_root / f"{precision}{stage}", precision, stage)[1]
               for precision, stage in (("fp32", 0), ("bf16", 0), ("bf16", 2))}
    trainer, results["fp16-0"] = _train(env, shards, run_root / "fp16", "fp16", 0)
    results["fp16-0"]["scaler"] = trainer.engine.state_dict().get("scaler")
    trainer.save_checkpoint()
    root = trainer.run_dir / "checkpoints"
    resumed = Trainer(trainer.cfg, env, resume_from=root / str(read_pointer(root / "latest")))
    results["fp16-0"]["resumed_scaler"] = resumed.engine.state_dict().get("scaler")
    results["zero2-fp16-overflow"] = _zero2_fp16_after_an_overflow()
    return results


def _zero2_fp16_after_an_overflow() -> tuple[bool, float]:
    """DeepSpeed alone (no dist_train code): ZeRO-2 with torch_autocast fp16 after one overflowing step.

    Returns (step applied, loss scale after it): why fp16 with ZeRO 1-2 is refused."""
    import deepspeed

    model = nn.Linear(4, 1)
    config = {"train_micro_batch_size_per_gpu": 2, "train_batch_size": 2, "zero_optimization": {"stage": 2},
              "torch_autocast": {"enabled": True, "dtype": "float16"}, "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=config,
                                      dist_init_required=False)
    engine.backward(engine(torch.ones(2, 4)).float().sum() * 1e30)
    engine.step()
    return engine.was_step_applied(), engine.optimizer.torch_autocast_gradscaler.get_scale()


@pytest.mark.slow
def test_short_cpu_deepspeed_runs_train_in_their_precision(make_shards, tmp_path):
    (runs,) = run_on_ranks(_precision_runs, 1, make_shards(), tmp_path, spawn=True)
    oracle = runs["fp32-0"]
    assert oracle["conv_dtypes"] == {torch.float32}
    for name in ("bf16-0", "bf16-2"):
        run = runs[name]
        assert run["conv_dtypes"] == {torch.bfloat16}, f"{name}: the forward did not run in bf16"
        assert run["param_dtypes"] == {torch.float32}, f"{name}: master weights are not fp32"
        assert run["step"] == 3 and run["moved"]
        assert torch.isfinite(torch.tensor(run["first_loss"]))
        assert run["first_loss"] != oracle["first_loss"]
        assert abs(run["first_loss"] - oracle["first_loss"]) < 0.05 * oracle["first_loss"], name
    fp16 = runs["fp16-0"]
    assert fp16["conv_dtypes"] == {torch.float16} and fp16["moved"]
    assert fp16["scaler"] is not None and fp16["scaler"]["scale"] > 1, "fp16 trains without loss scaling"
    assert fp16["resumed_scaler"] == fp16["scaler"], "the loss scale was not restored from the checkpoint"
    applied, scale = runs["zero2-fp16-overflow"]
    assert not applied and scale == 65536.0, "DeepSpeed's ZeRO-2 now lowers the fp16 loss scale: lift the refusal"
