"""The training command line, generated from the config dataclasses: every field a flag with help,
range checks at parse time and on every config, and --resume overriding only what is typed."""
import dataclasses
import json

import pytest

from train import cli, dpo, grpo, pretrain, sft
from train.config import TrainConfig

STAGES = [pretrain.STAGE, sft.STAGE, dpo.STAGE, grpo.STAGE]


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_every_field_is_a_flag_with_help_and_the_stage_default(stage):
    parser = cli.build_parser(f"python -m train.{stage.name}", stage.description, stage.cpu_defaults)
    text = parser.format_help()
    for f in dataclasses.fields(stage.cpu_defaults):
        flag = "--" + f.name.replace("_", "-")
        assert flag in text, flag
        assert f.metadata["help"], f"{f.name} has no help"
    assert stage.parse(["--device", "cpu"]) == dataclasses.replace(stage.cpu_defaults, device="cpu")


@pytest.mark.parametrize("stage, default", [(pretrain.STAGE, "12.0"), (sft.STAGE, "0.0"), (dpo.STAGE, "0.0"),
                                            (grpo.STAGE, "15.0")],
                         ids=lambda x: getattr(x, "name", x))
def test_max_minutes_says_its_default_what_it_counts_and_when_it_is_a_hard_stop(stage, default):
    """One flag for every stage (the shared loop applies it); a zero-argument pretraining run on CPU
    has a budget, and so does GRPO (whose sampling sets its pace), SFT and DPO do not, and the help
    says which and what --fixed-length changes."""
    parser = cli.build_parser(f"python -m train.{stage.name}", stage.description, stage.cpu_defaults)
    text = " ".join(parser.format_help().split())
    assert ("a time budget: minutes of training in this invocation, evaluations included (0: none). Unless the run "
            "length is fixed (--fixed-length, which typing --max-steps or --max-tokens turns on), it sets the run "
            "length: the first steps are timed and the run takes as many steps (at most --max-steps) as fit, warm-up "
            "and decay included, recorded as --fitted-steps. With a fixed length it is a hard stop: a checkpoint, the "
            "schedule unfinished, and --resume continues. Loading and preparing data and DPO's sampling of rejected "
            f"replies (redone by each --resume) come before training and do not count (default: {default})") in text
    assert "--fixed-length, --no-fixed-length" in text and "recorded by the run: --fitted-steps FITTED_STEPS" in text


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_a_length_typed_on_the_command_line_is_fixed(stage):
    """Typing --max-steps or --max-tokens (in any spelling argparse accepts) fixes the length; the
    defaults' length is not fixed, and --no-fixed-length typed with it wins."""
    assert not stage.parse([]).fixed_length
    assert not stage.parse(["--max-minutes", "3"]).fixed_length
    for argv in (["--max-steps", "100"], ["--max-steps=100"], ["--max-tok", "5000"], ["--max-steps", "100", "--max-minutes", "3"]):
        assert stage.parse(argv).fixed_length, argv
    assert not stage.parse(["--max-steps", "100", "--no-fixed-length"]).fixed_length
    assert stage.parse(["--fixed-length"]).fixed_length


def test_resume_keeps_the_fitted_length_and_a_typed_length_fixes_it(tmp_path):
    run_dir = tmp_path / "run"
    write_run(run_dir, "sft", max_minutes=5.0, fitted_steps=321)
    cfg = sft.STAGE.parse(["--resume", str(run_dir)])
    assert (cfg.fitted_steps, cfg.fixed_length, cfg.max_minutes) == (321, False, 5.0)
    assert sft.STAGE.parse(["--resume", str(run_dir), "--max-minutes", "9"]).fitted_steps == 321
    retyped = sft.STAGE.parse(["--resume", str(run_dir), "--max-steps", "400"])
    assert (retyped.max_steps, retyped.fixed_length) == (400, True)       # the loop then ignores fitted_steps
    write_run(tmp_path / "fixed", "sft", max_steps=77, fixed_length=True)
    assert sft.STAGE.parse(["--resume", str(tmp_path / "fixed")]).fixed_length


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
    (["--grad-accum", "-1"], "argument --grad-accum: must be at least 1, got -1"),
    (["--max-steps", "0"], "argument --max-steps: must be at least 1, got 0"),
    (["--ckpt-interval", "0"], "argument --ckpt-interval: must be at least 1, got 0"),
    (["--log-interval", "0"], "argument --log-interval: must be at least 1, got 0"),
    (["--max-tokens", "-1"], "argument --max-tokens: must be at least 0, got -1"),
    (["--warmup-steps", "-1"], "argument --warmup-steps: must be at least 0, got -1"),
    (["--lr", "0"], "argument --lr: must be greater than 0, got 0.0"),
    (["--max-steps", "ten"], "argument --max-steps: expected a whole number, got 'ten'"),
    (["--lr", "fast"], "argument --lr: expected a number, got 'fast'"),
    (["--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
    (["--kernels", "rms_norm=cuda"], "valid backends are auto, triton, torch"),
    (["--n-layer", "0"], "argument --n-layer: must be at least 1, got 0"),
])
def test_bad_flags_are_usage_errors_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        pretrain.STAGE.parse(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_post_training_flags_are_checked_too(capsys):
    for stage, argv, message in [(sft.STAGE, ["--eval-examples", "0"], "--eval-examples: must be at least 1"),
                                 (dpo.STAGE, ["--samples", "0"], "--samples: must be at least 1, got 0"),
                                 (dpo.STAGE, ["--rejected", "any"], "--rejected: invalid choice")]:
        with pytest.raises(SystemExit):
            stage.parse(argv)
        assert message in capsys.readouterr().err


def test_configs_made_in_code_are_checked():
    with pytest.raises(ValueError, match="batch_size: must be at least 1, got 0"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="eval_examples: must be at least 1"):
        sft.SFTConfig(eval_examples=0)


def write_run(run_dir, job, **args):
    run_dir.mkdir()
    saved = dataclasses.asdict(dataclasses.replace(sft.CPU_DEFAULTS, out=str(run_dir), **args))
    (run_dir / "config.json").write_text(json.dumps({"job": job, "args": saved}))


def test_resume_keeps_the_saved_config_and_overrides_only_typed_flags(tmp_path):
    run_dir = tmp_path / "run"
    write_run(run_dir, "sft", init="base", batch_size=5, lr=0.01, packing=False)
    cfg = sft.STAGE.parse(["--resume", str(run_dir), "--lr", "0.02", "--packing"])
    assert (cfg.batch_size, cfg.lr, cfg.packing, cfg.init) == (5, 0.02, True, "base")
    assert not sft.STAGE.parse(["--resume", str(run_dir)]).packing
    assert cfg.out == str(run_dir) and cfg.resume == str(run_dir)
    # A flag typed with the stage's default value still overrides the saved one.
    assert sft.STAGE.parse(["--resume", str(run_dir), "--batch-size", "32"]).batch_size == 32


def test_resume_of_another_job_or_no_run_is_explained(tmp_path):
    run_dir = tmp_path / "run"
    write_run(run_dir, "dpo")
    with pytest.raises(SystemExit, match=f"that is a dpo run, not sft; use python -m train.dpo --resume {run_dir}"):
        sft.STAGE.parse(["--resume", str(run_dir)])
    with pytest.raises(SystemExit, match="no config.json there"):
        sft.STAGE.parse(["--resume", str(tmp_path / "nowhere")])


def test_resume_of_a_config_edited_out_of_range_is_a_usage_error(tmp_path, capsys):
    run_dir = tmp_path / "run"
    write_run(run_dir, "sft")
    config = json.loads((run_dir / "config.json").read_text())
    config["args"]["batch_size"] = 0
    (run_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit):
        sft.STAGE.parse(["--resume", str(run_dir)])
    assert "batch_size: must be at least 1, got 0" in capsys.readouterr().err


def test_cuda_defaults_are_picked_by_the_device_flag():
    assert cli.cuda_requested(["--device", "cuda:1"]) and not cli.cuda_requested(["--device", "cpu"])


def test_init_is_kept_absolute_so_a_resume_works_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert sft.STAGE.parse(["--init", "runs/base"]).init == str(tmp_path / "runs" / "base")
    assert sft.STAGE.parse([]).init == ""
