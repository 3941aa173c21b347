"""`spineauto train --config / --lr / --batch-size / --config-set / KEY=VALUE` refuses a bad run
configuration in one line, and writes nothing.

Generated cases (a run YAML text or flags -> words of the error), each asserting the exit code, one
`error:` line without traceback, and that no file under the results folder changed (hash before and
after; the results hold a finished run, so an accidental write or removal would show): invalid YAML
(line and column), unknown keys (with the closest key), wrong types (with the expected type),
preprocessing keys (with the re-plan command), plug-ins that do not import (module named) or are of
the wrong kind, a loss that does not fit the task, accumulate 0, negative or non-numeric rates,
callbacks with unknown arguments.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from train_support import DATASET, RUN, copy_run, finished, one_error, root, train, tree_hash, use  # noqa: F401 (fixtures)

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[2]

YAML_CASES = {  # run YAML text -> words of the error
    "invalid_yaml_indent": ("loss:\n  name: tversky\n bad: 1\n", ("invalid YAML at line 3, column 2",)),
    "invalid_yaml_unclosed": ("optim: {initial_lr: 0.01\n", ("invalid YAML at line 2",)),
    "invalid_yaml_tab": ("optim:\n\tinitial_lr: 0.01\n", ("invalid YAML at line 2, column 1",)),
    "not_a_mapping": ("- loss\n- optim\n", ("a run configuration is a mapping",)),
    "unknown_top_key": ("losss: {name: tversky}\n", ("unknown key 'losss'", "did you mean 'loss'?")),
    "unknown_nested_key": ("optim: {initail_lr: 0.01}\n", ("unknown key 'optim.initail_lr'", "did you mean 'optim.initial_lr'?")),
    "key_in_wrong_section": ("initial_lr: 0.01\n", ("unknown key 'initial_lr'", "did you mean 'optim.initial_lr'?")),
    "unknown_trainer_key": ("trainer: {acumulate: 2}\n", ("unknown key 'trainer.acumulate'", "'trainer.accumulate'")),
    "lr_not_a_number": ("optim: {initial_lr: fast}\n", ("optim.initial_lr", "expected a number", "'fast'")),
    "lr_negative": ("optim: {initial_lr: -0.01}\n", ("optim.initial_lr", "must be > 0")),
    "batch_size_float": ("batch_size: 2.5\n", ("batch_size", "expected an integer")),
    "accumulate_zero": ("trainer: {accumulate: 0}\n", ("trainer.accumulate", "must be >= 1")),
    "val_every_zero": ("trainer: {val_every: 0}\n", ("trainer.val_every", "must be >= 1")),
    "section_not_mapping": ("loss: tversky\n", ("loss", "expected an object")),
    "spacing_changes_preprocessing": ("target_spacing: [0.5, 0.5]\n", ("'target_spacing' decides the preprocessed data",
                                                                       "spineauto plan_and_preprocess -d Dataset001_Phantoms --preset")),
    "normalisation_changes_preprocessing": ("normalization: [CTNormalization]\n", ("'normalization' decides the preprocessed data",)),
    "slicing_changes_preprocessing": ("slicing: axial\n", ("'slicing' decides", "plan_and_preprocess")),
    "data_identifier": ("data_identifier: other\n", ("'data_identifier' decides",)),
    "unknown_loss": ("loss: {name: focal_tverski}\n", ("loss.name", "unknown loss 'focal_tverski'", "did you mean 'focal_tversky'?")),
    "unknown_architecture": ("network: {architecture: unett}\n", ("network.architecture", "unknown network architecture 'unett'",
                                                                 "did you mean 'unet'?", "package.module:Name")),
    "unknown_optimizer": ("optim: {optimizer: adamx}\n", ("optim.optimizer", "unknown optimiser 'adamx'")),
    "unknown_schedule": ("optim: {schedule: cosin}\n", ("optim.schedule", "did you mean 'cosine'?")),
    "plugin_module_missing": ("network: {architecture: no_such_module_xyz:Net}\n", ("network.architecture", "module 'no_such_module_xyz'",
                                                                                    "does not import", "PYTHONPATH")),
    "plugin_module_broken": ("loss: {name: plugins_broken_for_tests:Loss}\n", ("loss.name", "module 'plugins_broken_for_tests'",
                                                                               "does not import", "ZeroDivisionError")),
    "plugin_class_missing": ("optim: {optimizer: plugins_for_tests:NoSuchOptimizer}\n", ("optim.optimizer", "has no 'NoSuchOptimizer'")),
    "plugin_wrong_kind_network": ("network: {architecture: plugins_for_tests:not_a_class}\n", ("network.architecture", "is an int",
                                                                                                "not a network architecture")),
    "plugin_wrong_kind_optimizer": ("optim: {optimizer: plugins_for_tests:TinyNet}\n", ("optim.optimizer", "the class TinyNet",
                                                                                        "torch.optim.optimizer.Optimizer", "not an optimiser")),
    "plugin_wrong_kind_loss": ("loss: {name: plugins_for_tests:CountingSGD}\n", ("loss.name", "the class CountingSGD", "not a loss")),
    "plugin_wrong_kind_schedule": ("optim: {schedule: plugins_for_tests:NotAPlugin}\n", ("optim.schedule", "NotAPlugin", "not a LR schedule")),
    "plugin_wrong_kind_callback": ("trainer: {callbacks: [{name: plugins_for_tests:TinyNet}]}\n", ("trainer.callbacks[0].name", "TinyNet",
                                                                                                    "not a callback")),
    "plugin_wrong_kind_task": ("trainer: {task: plugins_for_tests:NotAPlugin}\n", ("trainer.task", "NotAPlugin", "Task protocol")),
    "plugin_wrong_kind_transform": ("augmentation: {transforms: [{name: plugins_for_tests:NotAPlugin}]}\n",
                                    ("augmentation.transforms[0].name", "NotAPlugin", "not an augmentation transform")),
    "plugin_unknown_argument": ("network: {architecture: plugins_for_tests:TinyNet, kwargs: {widht: 4}}\n",
                                ("network.kwargs", "unknown argument 'widht'", "did you mean 'width'?")),
    "not_an_import_string": ("network: {architecture: 'my net'}\n", ("network.architecture", "a registered name or an import string")),
    "callback_unknown_name": ("trainer: {callbacks: [{name: early_stoping}]}\n", ("trainer.callbacks[0].name", "did you mean 'early_stopping'?")),
    "callback_unknown_argument": ("trainer: {callbacks: [{name: early_stopping, patiense: 3}]}\n",
                                  ("trainer.callbacks[0]", "unknown argument 'patiense'", "did you mean 'patience'?")),
    "callback_without_name": ("trainer: {callbacks: [{patience: 3}]}\n", ("trainer.callbacks[0]", "a mapping with a name")),
    "checkpoint_bad_mode": ("trainer: {callbacks: [{name: model_checkpoint, mode: biggest}]}\n", ("model_checkpoint.mode", "'min' or 'max'")),
    "checkpoint_bad_template": ("trainer: {callbacks: [{name: model_checkpoint, filename: '{epoch'}]}\n", ("model_checkpoint.filename",
                                                                                                         "not a template")),
    "sigmoid_loss_output_mismatch": ("loss: {name: dice_bce}\nnetwork: {output_activation: softmax}\n",
                                     ("network.output_activation 'softmax' does not fit loss 'dice_bce'",)),
    "unknown_logger": ("trainer: {loggers: [tensorbord]}\n", ("logger 'tensorbord'", "tensorboard")),
    "builtin_loss_with_kwargs": ("loss: {name: tversky, kwargs: {alpha: 0.2}}\n", ("loss.kwargs", "built-in loss 'tversky'")),
    "optimizer_kwargs_unknown": ("optim: {optimizer: adamw, optimizer_kwargs: {betaz: [0.9, 0.99]}}\n",
                                 ("optim.optimizer_kwargs", "unknown argument 'betaz'", "did you mean 'betas'?")),
    "monitor_unknown": ("trainer: {callbacks: [{name: early_stopping, monitor: val_dise}]}\n",
                        ("trainer.callbacks[0] (early_stopping).monitor", "'val_dise' is not a key", "did you mean 'val_dice'?")),
    "filename_field_unknown": ("trainer: {callbacks: [{name: model_checkpoint, monitor: val_dice, filename: '{epoch}-{dice:.3f}'}]}\n",
                               ("model_checkpoint).filename", "'dice' is not a key")),
    "plateau_monitor_unknown": ("optim: {schedule: reduce_on_plateau, plateau_monitor: validation_loss}\n",
                                ("optim.plateau_monitor", "'validation_loss' is not a key", "did you mean 'val_loss'?")),
    "non_monotone_share_above_one": ("augmentation: {non_monotone: 1.5}\n", ("augmentation.non_monotone", ">= 0 and <= 1")),
    "cord_contrast_share_negative": ("augmentation: {cord_contrast: -0.2}\n", ("augmentation.cord_contrast", ">= 0 and <= 1")),
    "retired_composite_key": ("augmentation: {composite: 0.5}\n", ("unknown key 'augmentation.composite'",)),  # taken out after 4f4ab0d
    "preset_without_configuration": ("configurations:\n  cls: {batch_size: 4}\n", ("this preset has no configuration '2d'", "has: cls")),
}

FLAG_CASES = {  # extra train arguments -> words of the error
    "lr_flag_not_a_number": (["--lr", "abc"], ("--lr 'abc'", "expected a number")),
    "lr_flag_negative": (["--lr", "-0.5"], ("optim.initial_lr", "must be > 0")),
    "lr_flag_zero": (["--lr", "0"], ("optim.initial_lr", "must be > 0")),
    "batch_size_flag_text": (["--batch-size", "four"], ("--batch-size 'four'", "expected an integer")),
    "batch_size_flag_zero": (["--batch-size", "0"], ("batch_size", "must be >= 1")),
    "config_set_without_equals": (["--config-set", "optim.initial_lr"], ("--config-set 'optim.initial_lr'", "key=value")),
    "config_set_unknown_key": (["--config-set", "optim.lr=0.1"], ("unknown key 'optim.lr'", "did you mean 'optim.initial_lr'?")),
    "config_set_accumulate_zero": (["--config-set", "trainer.accumulate=0"], ("trainer.accumulate", "must be >= 1")),
    "config_set_spacing": (["--config-set", "target_spacing=[1, 1]"], ("'target_spacing' decides the preprocessed data",)),
    "positional_lr_text": (["optim.initial_lr=fast"], ("optim.initial_lr", "expected a number")),
    "positional_unknown": (["trainer.early_stop=true"], ("unknown key 'trainer.early_stop'",)),
    "sigmoid_loss_with_classification_head": (["-c", "multitask", "loss.name=dice_bce"],
                                              ("loss.name 'dice_bce' trains sigmoid outputs", "classification heads")),
    "segmentation_loss_for_classification": (["-c", "cls", "loss.name=focal_tversky"], ("is a segmentation loss", "classification")),
    "missing_config_file": (["--config", "/nonexistent/run.yaml"], ("/nonexistent/run.yaml", "run configuration not found")),
    "unknown_logger_flag": (["--logger", "tensorbord"], ("logger 'tensorbord'",)),
}


def test_case_count():
    assert len(YAML_CASES) + len(FLAG_CASES) >= 55


@pytest.fixture(scope="module")
def broken_module(tmp_path_factory):
    """A plug-in module that raises while importing, on sys.path for the module."""
    folder = tmp_path_factory.mktemp("broken_plugin")
    (folder / "plugins_broken_for_tests.py").write_text("import torch\nVALUE = 1 / 0\n")
    mp = pytest.MonkeyPatch()
    mp.syspath_prepend(str(folder))
    yield folder
    mp.undo()


def _refused(args, words, root, finished, tmp_path, monkeypatch, capsys):
    copy_run(finished, tmp_path / "results")
    use(monkeypatch, root, tmp_path / "results")
    before = tree_hash(tmp_path / "results")
    pre_before = tree_hash(root / "preprocessed")
    code, err = train(capsys, *RUN, "--overwrite", *args)
    one_error(code, err, *words)
    assert tree_hash(tmp_path / "results") == before  # nothing written, nothing moved aside
    assert tree_hash(root / "preprocessed") == pre_before


@pytest.mark.parametrize("name", list(YAML_CASES))
def test_bad_run_yaml_is_one_line_and_writes_nothing(name, root, finished, broken_module, tmp_path, monkeypatch, capsys):
    text, words = YAML_CASES[name]
    config = tmp_path / "run.yaml"
    config.write_text(text)
    _refused(["--config", str(config)], words, root, finished, tmp_path, monkeypatch, capsys)


@pytest.mark.parametrize("name", list(FLAG_CASES))
def test_bad_override_flag_is_one_line_and_writes_nothing(name, root, finished, tmp_path, monkeypatch, capsys):
    args, words = FLAG_CASES[name]
    _refused(args, words, root, finished, tmp_path, monkeypatch, capsys)
