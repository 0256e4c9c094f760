"""The CLI as stage modules: flags made from config dataclasses, fine-tuning recipes with --set,
and the policy the CLI used to hold, now library functions (eval suite, continued-pretraining
recipe, load-and-quantize, feedback select)."""

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Literal

import pytest

from scratchlm.cli import build_parser
from scratchlm.cli.finetune import finetune_config
from scratchlm.cli.flags import Flag, add_config_flags, given_flags
from scratchlm.config import PRECISIONS, load_config
from scratchlm.devices import TORCH_DTYPES
from scratchlm.errors import ConfigError
from scratchlm.eval.suite import choose_suite, default_tasks
from scratchlm.finetune.config import ClassifyConfig, DPOConfig, FinetuneConfig, SFTConfig
from scratchlm.finetune.feedback import select_for_review
from scratchlm.model.quantize import Int8Linear
from scratchlm.serve.load import load_for_inference
from scratchlm.train.config import FINETUNE_RECIPES_DIR, RECIPES_DIR, builtin_recipes, pretrain_recipe

METHODS = {"sft": (SFTConfig, "builtin:instructions_train"), "dpo": (DPOConfig, "builtin:preferences_train"),
           "classify": (ClassifyConfig, "builtin:spam_train")}


# ---- the flag generator ----------------------------------------------------------------------
@dataclass
class WithNewFields(FinetuneConfig):
    new_knob: int = 7
    enabled_thing: bool = True
    mode: Literal["a", "b"] = "a"
    scale: float | None = None
    weights: dict = field(default_factory=dict, metadata={"help": "a table"})


def parser_for(cls: type, flags: dict | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_config_flags(parser, cls, flags or {})
    return parser


def test_a_new_config_field_becomes_a_flag_of_its_type():
    parser = parser_for(WithNewFields, {"new_knob": "how far to turn it (default: {default})"})
    args = parser.parse_args(["--new-knob", "3", "--no-enabled-thing", "--mode", "b", "--scale", "0.5", "--lora-rank", "4"])
    assert given_flags(args, WithNewFields) == {"new_knob": 3, "enabled_thing": False, "mode": "b", "scale": 0.5, "lora_rank": 4}
    assert "how far to turn it (default: 7)" in " ".join(parser.format_help().split())
    with pytest.raises(SystemExit):
        parser.parse_args(["--mode", "c"])  # a Literal's values are the choices


def test_flags_not_given_are_left_out_so_defaults_and_recipes_stand():
    args = parser_for(WithNewFields).parse_args([])
    assert given_flags(args, WithNewFields) == {}


def test_a_field_of_no_argparse_type_is_read_as_set_reads_it_and_uses_its_metadata_help():
    parser = parser_for(WithNewFields)
    with pytest.raises(SystemExit):
        parser.parse_args(["--weights", "not a table"])
    assert "a table" in parser.format_help()


def test_a_flag_can_keep_its_own_name():
    parser = parser_for(WithNewFields, {"enabled_thing": Flag("off", name="--live-thing")})
    assert given_flags(parser.parse_args(["--live-thing"]), WithNewFields) == {"enabled_thing": False}


@pytest.mark.parametrize("method", METHODS)
def test_every_config_field_is_a_flag_of_its_finetune_command(method):
    cls, data = METHODS[method]
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    finetune = subparsers.choices["finetune"]
    command = next(a for a in finetune._actions if isinstance(a, argparse._SubParsersAction)).choices[method]
    dests = {action.dest for action in command._actions}
    tables = {"parallel"}  # a table of its own: --set parallel.dp_shard=2, or [parallel] in a --config file
    assert {f for f in cls.__dataclass_fields__} - tables <= dests
    assert "set" in dests


# ---- fine-tuning recipes and --set -------------------------------------------------------------
def parse_finetune(method: str, *extra: str) -> argparse.Namespace:
    _, data = METHODS[method]
    return build_parser().parse_args(["finetune", method, "base", "--data", data, "--out", "out", *extra])


def test_recipe_values_reach_the_config_and_set_then_flags_override_them(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('lora = true\nlora_rank = 4\nepochs = 5\nbatch_size = 3\ntruncate = "left"\n')
    args = parse_finetune("sft", "--config", str(recipe), "--set", "epochs=6", "--set", "batch_size=9", "--batch-size", "2")
    config = finetune_config(SFTConfig, args)
    assert (config.lora, config.lora_rank, config.truncate) == (True, 4, "left")  # from the recipe
    assert config.epochs == 6  # --set over the recipe
    assert config.batch_size == 2  # a flag over --set, as in pretrain
    assert config.samples == SFTConfig().samples  # untouched: the dataclass default


def test_without_a_recipe_the_flags_give_todays_configs():
    args = parse_finetune("dpo", "--live-reference", "--beta", "0.2", "--lora")
    assert finetune_config(DPOConfig, args) == DPOConfig(precompute_reference=False, beta=0.2, lora=True)
    args = parse_finetune("classify", "--drop-long", "--pooling", "mean")
    assert finetune_config(ClassifyConfig, args) == ClassifyConfig(long="drop", pooling="mean")
    args = parse_finetune("sft", "--no-packing")
    assert finetune_config(SFTConfig, args) == SFTConfig(packing=False)


def test_an_unknown_key_is_one_line_naming_it_and_its_file(cli, tmp_path):
    recipe = tmp_path / "bad.toml"
    recipe.write_text("epochz = 3\n")
    result = cli("finetune", "sft", "base", "--data", "builtin:instructions_train", "--out", tmp_path / "o", "--config", recipe)
    assert result.status == 2
    assert result.err == f"scratchlm: error: {recipe}: unknown key 'epochz'; did you mean 'epochs'?\n"
    result = cli("finetune", "dpo", "base", "--data", "builtin:preferences_train", "--out", tmp_path / "o", "--set", "betta=1")
    assert (result.status, result.err) == (2, "scratchlm: error: --set: unknown key 'betta'; did you mean 'beta'?\n")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("method", METHODS)
def test_each_shipped_recipe_loads_into_its_method_config(method):
    cls, _ = METHODS[method]
    names = [n for n in builtin_recipes(FINETUNE_RECIPES_DIR) if n.startswith(f"{method}-")]
    assert names
    for name in names:
        config = finetune_config(cls, parse_finetune(method, "--config", name))
        assert config != cls(), f"{name} changes nothing"
    assert not set(names) & set(builtin_recipes(RECIPES_DIR))  # pretrain's --recipe list holds only its own


def test_load_config_order_and_errors(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text("epochs = 4\nseed = 1\n")
    config = load_config(ClassifyConfig, recipe, ["seed=2"], base={"epochs": 9, "seed": 0, "batch_size": 5}, flags={"seed": 3})
    assert (config.epochs, config.seed, config.batch_size) == (4, 3, 5)
    with pytest.raises(ConfigError, match=r"--set: unknown key 'nope'"):
        load_config(ClassifyConfig, None, ["nope=1"])


# ---- a parser without torch ---------------------------------------------------------------------
def test_building_the_parser_imports_no_torch():
    """Every command builds the whole parser first, and torch takes over a second to import: the
    flags come from torch-free configs, so `scratchlm --help` and `scratchlm tokenizer` stay fast."""
    code = "import sys; from scratchlm.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_the_precision_names_are_those_devices_maps_to_dtypes():
    assert PRECISIONS == ("auto", *TORCH_DTYPES)


# ---- policy in the library ----------------------------------------------------------------------
def test_the_default_suite_when_nothing_is_asked_for(tmp_path, monkeypatch):
    # The held-out text takes seconds to cut from the corpus; what is tested is the choice.
    monkeypatch.setattr("scratchlm.eval.suite.default_text", lambda: "held-out text")
    suite = choose_suite()
    assert suite.default and suite.tasks == default_tasks() and suite.text == "held-out text"
    text = tmp_path / "t.txt"
    assert choose_suite([], text) == type(suite)([], text, default=False)
    assert choose_suite([], None, shards=tmp_path).tasks == []  # shards alone: no default tasks added
    asked = choose_suite(["mine.jsonl", "builtin"])
    assert asked.tasks == ["mine.jsonl", *default_tasks()] and asked.text is None and not asked.default


def test_continued_pretraining_picks_its_own_recipe_unless_one_is_named(tmp_path):
    assert pretrain_recipe(None, []) == RECIPES_DIR / "cpu-default.toml"
    assert pretrain_recipe(None, ["lr=1e-3", " init_from = m"]) == RECIPES_DIR / "continued-pretraining.toml"
    assert pretrain_recipe("gpt2-124m", ["init_from=m"]) == RECIPES_DIR / "gpt2-124m.toml"
    with pytest.raises(ConfigError, match="not key=value"):
        pretrain_recipe(None, ["init_from"])


@pytest.mark.slow
def test_load_for_inference_casts_and_quantizes(model_folder):
    import torch

    model, tokenizer = load_for_inference(model_folder, dtype="bfloat16")
    assert model.embed.weight.dtype == torch.bfloat16 and tokenizer.vocab_size == model.config.vocab_size
    model, _ = load_for_inference(model_folder, quantize="int8")
    assert any(isinstance(m, Int8Linear) for m in model.modules())
    with pytest.raises(ConfigError, match="int8"):
        load_for_inference(model_folder, dtype="float16", quantize="int8")


def test_select_for_review_fails_on_a_bad_top_before_loading_anything(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    with pytest.raises(ConfigError, match="--top"):
        select_for_review(tmp_path / "no-such-model", prompts, tmp_path / "r.jsonl", top=0)
    with pytest.raises(ConfigError, match="method"):
        select_for_review(tmp_path / "no-such-model", prompts, tmp_path / "r.jsonl", method="vibes")


@pytest.mark.slow
def test_select_for_review_writes_the_most_uncertain(model_folder, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"The quick {word}"}) + "\n" for word in ("fox", "dog", "café")))
    notes = []
    selection = select_for_review(model_folder, prompts, tmp_path / "r.jsonl", top=2, max_new_tokens=4, note=notes.append)
    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert selection.scored == 3 and len(selection.chosen) == len(rows) == 2
    assert rows[0]["score"] >= rows[1]["score"] and notes and "3" in notes[0]
