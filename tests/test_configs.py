"""Configs make their own flags: each field a flag with its type, default, help and checks, parsed back
into the config, and a config written back as the command line of a process."""
import argparse
import json

import pytest

from lora_w2w.dreambooth import DreamboothConfig, add_dreambooth_arguments, training_settings
from lora_w2w.errors import SettingError
from lora_w2w.flags import OneLineParser, add_config_flags, config_argv, config_from_args
from lora_w2w.inversion import InversionConfig
from lora_w2w.pca import BuildConfig
from lora_w2w.tiny.tables import Settings


@pytest.mark.parametrize("config", [DreamboothConfig, BuildConfig, InversionConfig, Settings], ids=lambda c: c.__name__)
def test_the_flags_give_back_the_defaults(config):
    parser = argparse.ArgumentParser()
    add_config_flags(parser, config)
    assert config_from_args(config, parser.parse_args([])) == config()
    assert all(action.help for action in parser._actions)


def test_a_recipe_round_trips_through_its_command_line():
    recipe = DreamboothConfig(lora_r=4, lora_alpha=108.0, lora_target_modules=("to_q", "to_k", "to_v"),
                              with_prior_preservation=False, class_data_dir="class", learning_rate=3e-3)
    for kebab in (True, False):
        parser = argparse.ArgumentParser()
        add_dreambooth_arguments(parser, kebab)
        args = parser.parse_args(config_argv(recipe, kebab))
        assert config_from_args(DreamboothConfig, args, kebab) == recipe
        recorded = [json.dumps(training_settings(source), sort_keys=True) for source in (args, recipe)]
        assert recorded[0] == recorded[1]  # as each adapter records them; read from the fields, no command line
    assert "class_data_dir" not in training_settings(recipe) and training_settings(recipe)["lora_r"] == 4


def test_a_refused_value_names_the_flag_as_the_command_spells_it(capsys):
    with pytest.raises(SettingError, match="^max_train_steps must be >= 1, got 0$"):
        DreamboothConfig(max_train_steps=0)  # a library caller reads the field's name
    parser = OneLineParser(prog="w2w x")
    add_config_flags(parser, Settings)
    for kebab, flag in ((True, "--slider-steps"), (False, "--slider_steps")):
        with pytest.raises(SettingError, match=f"^{flag} must be >= 1, got 0$"):
            config_from_args(Settings, parser.parse_args(["--slider-steps", "0"]), kebab)
    with pytest.raises(SystemExit):
        parser.parse_args(["--edit-method", "guess"])  # choices from the field's metadata
    assert "argument --edit-method: invalid choice: 'guess'" in capsys.readouterr().err
