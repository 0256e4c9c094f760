"""scratchlm finetune classify | sft | dpo.

Each method's flags are made from its config dataclass (`scratchlm.cli.flags`), so a field added
to `FinetuneConfig` or a method's config is a flag at once; `--config RECIPE` and `--set
KEY=VALUE` give the same keys from a TOML recipe and the command line."""

import argparse
from pathlib import Path

from scratchlm.cli.common import MODEL_HELP, argument_type
from scratchlm.cli.flags import Flag, add_config_flags, given_flags
from scratchlm.config import PRECISIONS
from scratchlm.finetune.config import ClassifyConfig, DPOConfig, SFTConfig  # torch-free: the flags come from them


def add_commands(stages: argparse._SubParsersAction) -> None:
    ft = stages.add_parser("finetune", help="fine-tune a model for a task",
                           description="Post-training: fine-tune a pretrained model for a task.")
    cmds = ft.add_subparsers(title="commands", metavar="COMMAND")
    cls = cmds.add_parser(
        "classify",
        help="train a text classifier on (text, label) records",
        description="Fine-tune MODEL as a text classifier: a linear head on the last token's (or the mean) hidden "
        "state, trained on a CSV (header text,label) or JSONL ({\"text\", \"label\"}) file. Reports held-out accuracy, "
        "macro F1 and the confusion matrix before and after, and writes OUT/model.safetensors, config.json, "
        "tokenizer.json, report.md, results.json, metrics.jsonl and loss.png. " + MODEL_HELP,
    )
    _add_run_args(cls, "classify", shipped="spam_")
    # `long` keeps its two switches (--truncate | --drop-long) instead of a generated --long CHOICE.
    add_config_flags(cls, ClassifyConfig, _shared_flags("texts", "{default}") | CLASSIFY_FLAGS, skip={"long", "parallel"})
    long = cls.add_mutually_exclusive_group()
    long.add_argument("--truncate", dest="long", action="store_const", const="truncate", default=argparse.SUPPRESS,
                      help="cut longer texts (the default)")
    long.add_argument("--drop-long", dest="long", action="store_const", const="drop", default=argparse.SUPPRESS,
                      help="leave longer texts out")
    cls.set_defaults(run=_finetune_classify)
    sft = cmds.add_parser(
        "sft",
        help="instruction-tune a model on conversations (SFT)",
        description="Fine-tune MODEL to follow instructions: next-token loss on the assistant's tokens only, the "
        "conversation rendered with the model's own chat template (ChatML for models trained here). --data and --eval "
        "are JSONL files, one record a line, in any of these shapes: {\"messages\": [{\"role\", \"content\"}]}, "
        "ShareGPT {\"conversations\": [{\"from\", \"value\"}]}, Alpaca {\"instruction\", \"input\", \"output\"}, "
        "{\"prompt\", \"completion\"}; malformed lines are skipped and reported by line number. Reports the held-out "
        "answer loss and perplexity before and after, and greedy answers to a few held-out prompts before and after. "
        "OUT holds model/ (the fine-tuned model, LoRA merged: a model folder that chat, serve, eval and export open), "
        "adapter.safetensors (with --lora), report.md, results.json, metrics.jsonl and loss.png. " + MODEL_HELP,
    )
    _add_run_args(sft, "sft", shipped="instructions_")
    add_config_flags(sft, SFTConfig, _shared_flags("rows of --max-length tokens (conversations with --no-packing)",
                                                   "5e-4, 2e-3 with --lora; a tenth of that for a model of 50M+ parameters")
                     | SFT_FLAGS, skip={"parallel"})
    sft.set_defaults(run=_finetune_sft)
    dpo = cmds.add_parser(
        "dpo",
        help="align a model with preference pairs (DPO)",
        description="Train MODEL by direct preference optimisation (Rafailov et al. 2023) on pairs of a prompt, a "
        "chosen answer and a rejected one: the model learns to make chosen answers more likely, relative to a frozen "
        "reference (the starting model unless --reference), than rejected ones. --data and --eval are JSONL files, one "
        "pair a line: {\"prompt\": text, \"chosen\": text, \"rejected\": text}, with the prompt a string, a list of "
        "messages, or {\"messages\": [...]} instead, and each answer a string or a list of one assistant message "
        "(TRL's shape); the web chat page's feedback file (scratchlm serve) is read as it is: an edited reply is a "
        "pair (chosen = the edit, rejected = the model's reply), a rating alone is skipped, and only the latest record "
        "of each reply counts. Malformed lines (and pairs whose answers are the same) are skipped and reported by line "
        "number. Reports held-out DPO loss, reward accuracy, margin and rewards, and the model's own log-probability "
        "preference, before and after. OUT holds model/ (the tuned model, LoRA merged: a model folder that chat, "
        "serve, eval and export open), adapter.safetensors (with --lora), report.md, results.json, metrics.jsonl and "
        "loss.png. " + MODEL_HELP,
    )
    _add_run_args(dpo, "dpo", shipped="preferences_")
    add_config_flags(dpo, DPOConfig, _shared_flags("pairs", "1e-4, 1e-3 with --lora; a tenth of that for a model of 50M+ parameters")
                     | DPO_FLAGS, skip={"parallel"})
    dpo.set_defaults(run=_finetune_dpo)


# How each config field reads on the command line ("{default}": the method's own default). A
# field missing here still gets a flag (`add_config_flags`); give it help here.
def _shared_flags(unit: str, lr_default: str) -> dict[str, Flag | str]:
    """`FinetuneConfig`'s fields; `unit` is what a batch counts, `lr_default` the --lr default in words."""
    return {
        "freeze": Flag("none (train everything), embeddings, or all-but-last:N (only the last N blocks, the final norm "
                       "and an untied head) (default: none)", metavar="WHAT"),
        "lora": "train LoRA adapters instead, every base weight frozen",
        "lora_rank": "LoRA rank (default: {default})",
        "lora_alpha": "LoRA alpha; the update is scaled by alpha/rank (default: {default})",
        "lora_dropout": "dropout on the adapters' input (default: {default})",
        "lora_targets": "comma-separated linear layers to adapt, by name suffix; auto: attn.q,attn.k,attn.v,attn.proj,mlp.gate (SwiGLU), "
                        "mlp.up,mlp.down plus the LM head when it is untied from the embedding, so a new end-of-turn token can be learnt "
                        "(default: auto)",
        "epochs": "passes over the training data (default: {default})",
        "max_steps": "stop after this many optimizer steps (overrides --epochs)",
        "batch_size": f"{unit} per batch (default: {{default}})",
        "grad_accum": "batches per optimizer step (default: {default})",
        "lr": f"peak learning rate, after linear warmup, before cosine decay (default: {lr_default})",
        "weight_decay": "AdamW weight decay on matrices (default: {default})",
        "warmup_fraction": "share of the steps spent warming up (default: {default})",
        "min_lr_ratio": "where the cosine decay ends, as a share of the peak learning rate (default: {default})",
        "grad_clip": "gradient norm clip, 0 for none (default: 1.0)",
        "dtype": Flag("autocast precision; auto is bfloat16 on GPUs, float32 on CPU (default: auto)", choices=PRECISIONS),
        "seed": "seed of the split, new weights and the batch order (default: {default})",
        "device": "cpu, cuda, cuda:N, mps or auto (default: {default})",
        "checkpoint_every": "steps between checkpoints of the run folder, for --resume (default: none)",
        "max_nonfinite": "non-finite losses in a row before the run stops; each is skipped (default: {default})",
        "activation_checkpointing": "recompute each block's activations in backward: less memory, more time",
    }


VAL_FRACTION = "held-out share without --eval (default: {default})"
CLASSIFY_FLAGS: dict[str, Flag | str] = {
    "pooling": "last real token or mean of tokens (default: {default})",
    "max_length": "tokens per text, end token included (default: {default})",
    "val_fraction": VAL_FRACTION,
}
SFT_FLAGS: dict[str, Flag | str] = {
    "max_length": "row width and context: longer conversations are dropped or cut (default: min(512, the model's context))",
    "packing": "one conversation per row, padded, instead of packing several into each row (attention stays inside "
               "each either way)",
    "truncate": "a conversation over --max-length: drop it, or cut its start, never its last answer (default: {default})",
    "val_fraction": VAL_FRACTION,
    "samples": "held-out prompts answered before and after, in the report (default: {default})",
    "sample_tokens": "most tokens per sample answer (default: {default})",
}
DPO_FLAGS: dict[str, Flag | str] = {
    "beta": "reward scale: how far the model may move from the reference; lower lets it move further (default: {default})",
    "label_smoothing": "conservative DPO: the chance a pair's label is wrong, in [0, 0.5) (default: {default})",
    "reference": Flag("the frozen reference model (same tokenizer) (default: MODEL itself, before training)", metavar="MODEL"),
    "precompute_reference": Flag("keep the reference model in memory and score each batch with it, instead of computing "
                                 "its log-probabilities of every pair once before training (TRL's default; two models "
                                 "in memory)", name="--live-reference"),
    "max_length": "tokens per prompt and answer: longer pairs are dropped or cut (default: min(512, the model's context))",
    "truncate": "a pair over --max-length: drop it, or cut its prompt's start in both answers, never an answer "
                "(default: {default})",
    "val_fraction": VAL_FRACTION,
}


def _add_run_args(cmd: argparse.ArgumentParser, method: str, shipped: str) -> None:
    """MODEL, the data, the run folder and the recipe: what every method takes besides its config."""
    from scratchlm.finetune.datasets import resolve_data_path, shipped_datasets
    from scratchlm.train.config import FINETUNE_RECIPES_DIR, builtin_recipes

    recipes = [name for name in builtin_recipes(FINETUNE_RECIPES_DIR) if name.startswith(f"{method}-")]
    cmd.add_argument("model", type=Path, help="the base model (see above)")
    data_path = argument_type(resolve_data_path)
    cmd.add_argument("--data", required=True, type=data_path,
                     help="training records: a file, or builtin:NAME for a data set shipped with scratchlm "
                     f"({', '.join(n for n in shipped_datasets() if n.startswith(shipped))})")
    cmd.add_argument("--eval", type=data_path, default=None,
                     help="held-out records, a file or builtin:NAME (default: a seeded --val-fraction split of --data)")
    cmd.add_argument("--out", required=True, type=Path, help="run folder (must be empty unless --force)")
    cmd.add_argument("--config", default=None, metavar="RECIPE",
                     help="TOML recipe of config keys (the flags' names with _ for -), a file or a built-in name "
                     f"({', '.join(recipes)}); --set and the flags override it")
    cmd.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override any config key, e.g. lora_rank=16 (repeatable; a flag wins over --set of its key)")
    cmd.add_argument("--force", action="store_true", help="write into a non-empty --out")
    cmd.add_argument("--resume", action="store_true",
                     help="continue the run in --out from its latest checkpoint (made with --checkpoint-every); "
                     "give the settings it started with")
    cmd.add_argument("--quiet", action="store_true", help="no progress bar")


def finetune_config(cls: type, args: argparse.Namespace):
    """The method's config `cls` from its defaults, then --config's recipe, then --set, then the
    flags given (pretrain's order: a flag names one key, so it wins over a general --set)."""
    from scratchlm.config import load_config
    from scratchlm.train.config import FINETUNE_RECIPES_DIR, resolve_recipe

    recipe = resolve_recipe(args.config, FINETUNE_RECIPES_DIR) if args.config is not None else None
    return load_config(cls, recipe, args.set, flags=given_flags(args, cls))


def _finetune_classify(args: argparse.Namespace) -> int:
    from scratchlm.finetune.classify import finetune_classifier
    from scratchlm.train.distributed import is_main_process

    config = finetune_config(ClassifyConfig, args)
    result = finetune_classifier(args.model, args.data, args.out, config, eval_path=args.eval, force=args.force,
                                 progress=not args.quiet, note=print, resume=args.resume)
    if not is_main_process():  # another rank of a torchrun job: rank 0 reports
        return 0
    if result.data["truncated"] or result.data["dropped"]:
        print(f"texts over {config.max_length} tokens: {result.data['truncated']} truncated, {result.data['dropped']} dropped")
    print(f"trainable parameters: {result.trainable_params:,} of {result.total_params:,}; "
          f"{result.steps} steps in {result.train_seconds:.1f} s, peak memory {result.peak_memory_mb:,.0f} MB")
    scores = result.after
    print(f"held-out after: accuracy {scores['accuracy']:.4f}, macro F1 {scores['macro_f1']:.4f} ({scores['examples']} examples)")
    extra = ", adapter.safetensors" if config.lora else ""
    print(f"wrote {result.out}/ (model.safetensors, config.json, tokenizer.json, report.md, results.json, loss.png, "
          f"metrics.jsonl{extra})")
    return 0


def _finetune_sft(args: argparse.Namespace) -> int:
    from scratchlm.finetune.sft_train import finetune_sft
    from scratchlm.train.distributed import is_main_process

    config = finetune_config(SFTConfig, args)
    result = finetune_sft(args.model, args.data, args.out, config, eval_path=args.eval, force=args.force,
                          progress=not args.quiet, note=print, resume=args.resume)
    if not is_main_process():  # another rank of a torchrun job: rank 0 reports
        return 0
    print(f"{result.steps} steps in {result.train_seconds:.1f} s, peak memory {result.peak_memory_mb:,.0f} MB")
    print(f"held-out answer loss after: {result.after['loss']:.4f} (perplexity {result.after['perplexity']:.2f})")
    extra = ", adapter.safetensors" if config.lora else ""
    print(f"wrote {result.out}/ (report.md, results.json, loss.png, metrics.jsonl{extra}); the model: {result.model_dir}")
    return 0


def _finetune_dpo(args: argparse.Namespace) -> int:
    from scratchlm.finetune.dpo_train import finetune_dpo
    from scratchlm.train.distributed import is_main_process

    config = finetune_config(DPOConfig, args)
    result = finetune_dpo(args.model, args.data, args.out, config, eval_path=args.eval, force=args.force,
                          progress=not args.quiet, note=print, resume=args.resume)
    if not is_main_process():  # another rank of a torchrun job: rank 0 reports
        return 0
    print(f"{result.steps} steps in {result.train_seconds:.1f} s, peak memory {result.peak_memory_mb:,.0f} MB")
    m = result.after
    print(f"held-out after: DPO loss {m['loss']:.4f}, reward accuracy {m['reward_accuracy']:.4f}, "
          f"margin {m['margin']:+.4f}, log-prob accuracy {m['logp_accuracy']:.4f}")
    extra = ", adapter.safetensors" if config.lora else ""
    print(f"wrote {result.out}/ (report.md, results.json, loss.png, metrics.jsonl{extra}); the model: {result.out / 'model'}")
    return 0
