"""The settings of every fine-tuning method, with no torch import: the command line builds its
flags from these dataclasses (`scratchlm.cli.flags`), and `scratchlm --help` should not wait
a second and a half for torch to load. What needs a model or a tensor lives next to the code
that uses it (`trainer.default_lora_targets`, `lora.apply_lora`).

    FinetuneConfig   what every method shares: what trains, the schedule, precision, device
    SFTConfig        instruction SFT (sft_train.py)
    DPOConfig        preference optimisation (dpo_train.py)
    ClassifyConfig   a text classifier (classify.py)
    LoRAConfig       the adapters' rank, alpha, dropout and targets (lora.py)
"""

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

from scratchlm.config import POOLINGS, PRECISIONS, Pooling, build
from scratchlm.errors import ConfigError
from scratchlm.train.config import ParallelConfig

# The linear layers of every block of our GPT (scratchlm/model/model.py): attention's query,
# key, value and output projections, the MLP's gate (SwiGLU only), up and down projections. Hu
# et al. adapted only queries and values; adapting every linear layer of the block does better at
# the same parameter budget (QLoRA, Dettmers et al. 2023, section 4). A model without a gate
# (GELU MLP) simply has one target less: defaults that match nothing are not an error.
DEFAULT_TARGETS: tuple[str, ...] = ("attn.q", "attn.k", "attn.v", "attn.proj", "mlp.gate", "mlp.up", "mlp.down")

Truncate = Literal["drop", "left"]  # an SFT conversation or DPO pair over the context: drop it, or cut its start
TRUNCATE_CHOICES = ("drop", "left")
LongPolicy = Literal["truncate", "drop"]  # a text over a classifier's max_length
LONG_POLICIES = ("truncate", "drop")
DEFAULT_MAX_LENGTH = 512  # SFT rows and DPO sides: wider costs attention time for little gain on short instructions


# ---- LoRA ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8
    # The update is scaled by alpha / rank, so a change of rank needs no new learning rate (Hu et
    # al. section 4.1: they set alpha once and never tuned it).
    alpha: float = 16.0
    dropout: float = 0.0  # on the adapter's input only; the frozen path sees x unchanged
    targets: tuple[str, ...] = DEFAULT_TARGETS  # module-name suffixes; "a,b" or a list also accepted

    def __post_init__(self) -> None:
        targets = self.targets
        if isinstance(targets, str):  # from the command line: "attn.q,attn.v"
            targets = tuple(part.strip() for part in targets.split(","))
        elif isinstance(targets, list):  # from TOML or JSON
            targets = tuple(targets)
        object.__setattr__(self, "targets", targets)
        checks = [
            (isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank >= 1,
             f"rank must be a positive integer, not {self.rank!r}"),
            (isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool)
             and math.isfinite(self.alpha) and self.alpha > 0, f"alpha must be a positive number, not {self.alpha!r}"),
            (isinstance(self.dropout, (int, float)) and not isinstance(self.dropout, bool) and 0.0 <= self.dropout < 1.0,
             f"dropout must be in [0, 1), not {self.dropout!r}"),
            (isinstance(targets, tuple) and len(targets) > 0, f"targets must name at least one linear layer, not {self.targets!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"LoRA config: {message}")
        for target in targets:
            if not isinstance(target, str) or not target or target != target.strip() or target.startswith(".") or target.endswith("."):
                raise ConfigError(f"LoRA config: targets: {target!r} is not a module name such as 'attn.q'")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        data = asdict(self)
        data["targets"] = list(self.targets)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "LoRAConfig":
        return build(cls, data, "LoRA config")


# ---- what trains -----------------------------------------------------------------------------
@dataclass(frozen=True)
class FreezeSpec:
    kind: Literal["none", "embeddings", "all-but-last"]
    last_blocks: int = 0  # for "all-but-last": how many of the top blocks train

    def __str__(self) -> str:
        return f"all-but-last:{self.last_blocks}" if self.kind == "all-but-last" else self.kind


def parse_freeze(value: str) -> FreezeSpec:
    """'none', 'embeddings' or 'all-but-last:N' (N >= 0; 0 trains only the final norm and head)."""
    text = value.strip().lower()
    if text in ("none", "embeddings"):
        return FreezeSpec(text)  # type: ignore[arg-type]
    kind, _, number = text.partition(":")
    if kind == "all-but-last" and number.isdigit():
        return FreezeSpec("all-but-last", int(number))
    raise ConfigError(f"freeze must be none, embeddings or all-but-last:N, not {value!r}")


# ---- the shared settings ---------------------------------------------------------------------
@dataclass
class FinetuneConfig:
    """The settings every fine-tuning method shares; each method's config adds its own."""

    freeze: str = "none"  # none | embeddings | all-but-last:N
    lora: bool = False
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "auto"  # comma-separated name suffixes, or auto: `trainer.default_lora_targets`
    epochs: int = 3
    max_steps: int | None = None  # overrides epochs when set
    batch_size: int = 16
    grad_accum: int = 1  # batches per optimizer step
    lr: float | None = 1e-3  # None: the method's default for the model (`trainer.default_lr`), set once it is loaded
    weight_decay: float = 0.0
    warmup_fraction: float = 0.1  # of the steps, linear from 0; then cosine to min_lr_ratio
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    dtype: str = "auto"  # autocast: auto (bf16 on GPUs, float32 on CPU) | float32 | bfloat16 | float16
    seed: int = 0
    device: str = "cpu"
    checkpoint_every: int | None = None  # steps between checkpoints of the run folder (for --resume); None: none
    max_nonfinite: int = 5  # non-finite losses in a row before the run stops (a non-finite step is skipped)
    activation_checkpointing: bool = False  # recompute each block's activations in backward: less memory, more time
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # under torchrun: parallel.dp_shard=-1 for FSDP2

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, f"epochs must be at least 1, not {self.epochs}"),
            (self.max_steps is None or self.max_steps >= 1, f"max steps must be at least 1, not {self.max_steps}"),
            (self.batch_size >= 1, f"batch size must be at least 1, not {self.batch_size}"),
            (self.grad_accum >= 1, f"grad accum must be at least 1, not {self.grad_accum}"),
            (self.checkpoint_every is None or self.checkpoint_every >= 1, f"checkpoint every must be at least 1, not {self.checkpoint_every}"),
            (self.max_nonfinite >= 1, f"max nonfinite must be at least 1, not {self.max_nonfinite}"),
            (self.lr is None or (self.lr > 0 and math.isfinite(self.lr)), f"lr must be a positive number, not {self.lr}"),
            (0.0 <= self.warmup_fraction < 1.0, f"warmup fraction must be in [0, 1), not {self.warmup_fraction}"),
            (0.0 <= self.min_lr_ratio <= 1.0, f"min lr ratio must be in [0, 1], not {self.min_lr_ratio}"),
            (self.dtype in PRECISIONS, f"dtype must be one of {', '.join(PRECISIONS)}, not {self.dtype!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if self.parallel.pp > 1:
            raise ConfigError("pipeline parallelism (parallel.pp) is for pretraining; fine-tune with parallel.dp_shard "
                              "(FSDP2) or parallel.tp")
        spec = parse_freeze(self.freeze)
        if self.lora:
            if spec.kind != "none":
                raise ConfigError("LoRA already freezes every base weight; use --lora or --freeze, not both")
            self.lora_config()  # a bad rank, alpha, dropout or target fails here, before any model loads

    def lora_config(self, auto_targets: tuple[str, ...] = DEFAULT_TARGETS) -> LoRAConfig:
        """The adapters' settings, with "auto" targets meaning `auto_targets` (the model's, from
        `trainer.default_lora_targets`; the block defaults alone for checking the other fields)."""
        targets = self.lora_targets
        return LoRAConfig(rank=self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout,
                          targets=auto_targets if targets.strip() == "auto" else targets)

    def batch_text(self, unit: str) -> str:
        """The batch of one optimizer step in words, for reports: "8 pairs" or "2 x 8 pairs"."""
        return f"{self.batch_size} {unit}" if self.grad_accum == 1 else f"{self.grad_accum} x {self.batch_size} {unit} (accumulated)"

    def method(self) -> str:
        """What trains, in words, for reports."""
        if self.lora:
            return f"LoRA rank {self.lora_rank}, alpha {self.lora_alpha:g}, targets {self.lora_targets}"
        return "full fine-tuning" if self.freeze == "none" else f"freeze {self.freeze}"


def context_length(max_length: int | None, block_size: int) -> int:
    """SFT's row width or DPO's tokens per side for a model of context `block_size`: `max_length`,
    or min(DEFAULT_MAX_LENGTH, block_size) when it is None."""
    if max_length is None:
        return min(DEFAULT_MAX_LENGTH, block_size)
    if max_length > block_size:
        raise ConfigError(f"--max-length {max_length} is longer than the model's context ({block_size})")
    return max_length


# ---- the methods -----------------------------------------------------------------------------
@dataclass
class SFTConfig(FinetuneConfig):
    """The shared fine-tuning settings (`FinetuneConfig`) with SFT's defaults, plus its own.

    `lr` None picks by method and model size (`trainer.default_lr`): 5e-4 for full fine-tuning or
    a freeze, 2e-3 for LoRA (which trains far fewer numbers, from a zero update), a tenth of those
    for a model of 50M parameters or more. Measured on the quickstart model with the
    shipped Python-docs instructions (2 epochs, held-out answer loss from 5.08): full 2e-4 3.63,
    5e-4 3.53, 1e-3 3.57, 3e-3 3.76; LoRA on the blocks only 1e-3 3.90, 3e-3 3.83, and with
    the untied head adapted too (the "auto" targets) 2e-3 3.57."""

    lr: float | None = None  # None: trainer.default_lr(sft_train.FULL_LR, sft_train.LORA_LR, ...) for the model
    epochs: int = 2
    batch_size: int = 8  # rows of max_length tokens when packing, else conversations
    max_length: int | None = None  # row width and context for truncation; None: min(512, the model's block_size)
    packing: bool = True  # several examples per row, attention kept inside each (False: one per row, padded)
    truncate: Truncate = "drop"  # a conversation over max_length: drop it, or cut its start ("left")
    val_fraction: float = 0.1  # held-out share when no eval file is given
    samples: int = 3  # held-out prompts answered before and after training, for the report
    sample_tokens: int = 96  # most tokens per sample answer

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = [
            (self.max_length is None or self.max_length >= 2, f"max length must be at least 2, not {self.max_length}"),
            (self.truncate in TRUNCATE_CHOICES, f"truncate must be one of {', '.join(TRUNCATE_CHOICES)}, not {self.truncate!r}"),
            (0.0 < self.val_fraction < 1.0, f"val fraction must be between 0 and 1 (exclusive), not {self.val_fraction}"),
            (self.samples >= 0, f"samples must be 0 or more, not {self.samples}"),
            (self.sample_tokens >= 1, f"sample tokens must be at least 1, not {self.sample_tokens}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def context(self, block_size: int) -> int:
        """The row width and truncation context for a model of `block_size`."""
        return context_length(self.max_length, block_size)


def check_dpo_settings(beta: float, label_smoothing: float) -> None:
    """ConfigError for a beta that is not a positive number or a label smoothing outside [0, 0.5)
    (at 0.5 every label is a coin toss and the loss has no preference left to learn)."""
    if not (math.isfinite(beta) and beta > 0):
        raise ConfigError(f"beta must be a positive number, not {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ConfigError(f"label smoothing must be in [0, 0.5), not {label_smoothing}")


@dataclass
class DPOConfig(FinetuneConfig):
    """The shared fine-tuning settings (`FinetuneConfig`) with DPO's defaults, plus its own.

    `lr` None picks by method and model size (`trainer.default_lr`): 1e-4 for full fine-tuning or
    a freeze, 1e-3 for LoRA, a tenth of those for a model of 50M parameters or more. LoRA, trains
    far fewer numbers from a zero update. Tried on the quickstart model with the shipped
    preference data (held-out DPO loss from 0.693): full, 2 epochs, 1e-4 0.267 (reward accuracy
    0.89, margin 2.1), 3e-4 0.212 (0.88, 3.5), a big step for a larger model that DPO should only
    nudge; 60 steps of LoRA, 1e-4 0.660 (margin 0.07, barely moving), 1e-3 0.411 (0.84, 1.1);
    2 epochs of LoRA at 1e-3 0.272 (0.86, 2.2)."""

    lr: float | None = None  # type: ignore[assignment]  # None: trainer.default_lr(dpo_train.FULL_LR, dpo_train.LORA_LR, ...)
    epochs: int = 2
    batch_size: int = 8
    beta: float = 0.1  # reward scale; lower lets the policy drift further from the reference
    label_smoothing: float = 0.0  # conservative DPO: the chance a label is wrong
    reference: str | None = None  # model path of the frozen reference; None: the starting model
    precompute_reference: bool = True  # reference log-probs once before training, then the reference is freed
    max_length: int | None = None  # tokens per side of a pair; None: min(512, the model's context)
    truncate: Truncate = "drop"  # a pair longer than max_length: drop it, or cut its prompt's start ("left")
    val_fraction: float = 0.1  # held-out share when no eval file is given

    def __post_init__(self) -> None:
        super().__post_init__()
        check_dpo_settings(self.beta, self.label_smoothing)
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"max length must be at least 2, not {self.max_length}")
        if self.truncate not in TRUNCATE_CHOICES:
            raise ConfigError(f"truncate must be one of {', '.join(TRUNCATE_CHOICES)}, not {self.truncate!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val fraction must be between 0 and 1 (exclusive), not {self.val_fraction}")

    def context(self, block_size: int) -> int:
        """Tokens per side of a pair for a model of context `block_size`."""
        return context_length(self.max_length, block_size)


@dataclass
class ClassifyConfig(FinetuneConfig):
    """The shared fine-tuning settings (`FinetuneConfig`) plus the classifier's own."""

    pooling: Pooling = "last"
    max_length: int = 128
    long: LongPolicy = "truncate"  # a text longer than max_length: truncate or drop
    val_fraction: float = 0.2  # held-out share when no eval file is given

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = [
            (self.pooling in POOLINGS, f"pooling must be one of {', '.join(POOLINGS)}, not {self.pooling!r}"),
            (self.long in LONG_POLICIES, f"long must be one of {', '.join(LONG_POLICIES)}, not {self.long!r}"),
            (self.max_length >= 2, f"max length must be at least 2, not {self.max_length}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
