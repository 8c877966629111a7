"""The command line: every command is listed and documented, and user errors are one clear line."""

from __future__ import annotations

import json

import pytest

from diffattr.cli import build_parser, main

COMMANDS = ["train", "generate", "data", "methods", "featurize", "attribute", "evaluate", "demo"]


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for command in COMMANDS:
        assert command in text


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "--" in capsys.readouterr().out  # its options are listed


def test_train_and_generate_options_match_the_readme():
    parser = build_parser()
    args = parser.parse_args(["train", "--config", "configs/digits2.yaml", "--out", "runs/digits2"])
    assert args.config == "configs/digits2.yaml" and args.out == "runs/digits2"
    args = parser.parse_args(
        ["generate", "--model", "runs/digits2", "--n", "16", "--seed", "0", "--out", "gen/"]
    )
    assert (args.n, args.seed, args.out) == (16, 0, "gen/")


def test_data_list_and_inspect(capsys):
    assert main(["data", "list"]) == 0
    listed = capsys.readouterr().out
    for name in ["digits", "digits-2", "cifar10", "cifar2", "artbench10", "imagefolder"]:
        assert name in listed
    assert main(["data", "inspect", "digits-2", "--size", "8"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["image_shape"] == [1, 8, 8]
    assert set(info["classes"]) == {"0", "1"}


def test_missing_data_folder_is_one_clear_error(tmp_path, caplog):
    code = main(["data", "inspect", "cifar2", "--data-root", str(tmp_path / "nowhere")])
    assert code == 2
    assert "nowhere" in caplog.text
