"""TOML config files: every command takes one, flags override it, the saved config reads back."""

import dataclasses

import pytest

from gpu_ann.cli import _train_config, main, parse_args
from gpu_ann.config import ConfigError, read_toml, to_toml
from gpu_ann.training import TrainConfig


def test_saved_effective_config_round_trips_to_the_same_train_config(tmp_path):
    cfg = TrainConfig(
        data=str(tmp_path / "ratings.csv"),
        user_col="u",
        header=False,
        split=(0.7, 0.2, 0.1),
        seed=9,
        hidden=(32, 64, 32),
        lr=0.003,
        batch_size=64,
        sampling="replacement",
        max_steps=11,
        backend="cpu",
        out=str(tmp_path / "run"),
        tensorboard=True,
    )
    path = tmp_path / "config.toml"
    path.write_text(to_toml(cfg.to_dict(), "train"))
    assert _train_config(parse_args(["train", "--config", str(path)])) == cfg


def test_flags_override_the_file_and_top_level_keys_work(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("lr = 0.5\nbatch-size = 16\nhidden = [8, 8, 8]\n")
    args = parse_args(["train", "--config", str(path), "--lr", "0.25"])
    cfg = _train_config(args)
    assert cfg.lr == 0.25 and cfg.batch_size == 16 and cfg.hidden == (8, 8, 8)
    assert dataclasses.replace(cfg, lr=0.01, batch_size=1024, hidden=(256, 512, 256)) == TrainConfig()


def test_a_command_table_is_read_for_its_command_only(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[train]\nseed = 4\n\n[recommend]\nk = 3\nuser = "7"\ncheckpoint = "runs/x"\n')
    assert _train_config(parse_args(["train", "--config", str(path)])).seed == 4
    args = parse_args(["recommend", "--config", str(path)])
    assert (args.k, args.user, args.checkpoint) == (3, "7", "runs/x")
    assert read_toml(path, "evaluate") == {}


def test_unknown_keys_bad_values_and_missing_files_are_clear_errors(tmp_path, capsys):
    path = tmp_path / "c.toml"
    path.write_text("[train]\nlearning-rate = 0.1\n")
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "c.toml: unknown option 'learning-rate'" in err and "lr" in err
    path.write_text("[train]\nbatch-size = 0\n")
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["train", "--config", str(path)])
    assert exit_info.value.code == 2 and "0 is not a positive integer" in capsys.readouterr().err
    path.write_text("[train]\nheader = 3\n")
    with pytest.raises(ConfigError, match="header must be true or false"):
        parse_args(["train", "--config", str(path)])
    path.write_text("[train\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_args(["train", "--config", str(path)])
    with pytest.raises(ConfigError, match="config file not found"):
        parse_args(["train", "--config", str(tmp_path / "none.toml")])


def test_list_values_of_multi_value_flags_stay_separate(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[recommend]\ncheckpoint = "runs/x"\nitems = ["Naruto", "Death Note"]\n')
    assert parse_args(["recommend", "--config", str(path)]).items == ["Naruto", "Death Note"]


def test_resume_refuses_other_training_flags(capsys, tmp_path):
    assert main(["train", "--resume", str(tmp_path), "--max-steps", "5", "--lr", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "--resume continues a run with its saved config; drop --lr, --max-steps" in err


def test_a_relative_data_path_is_saved_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _train_config(parse_args(["train", "--data", "ratings.csv"]))
    assert cfg.data == str(tmp_path / "ratings.csv")
