"""`TrainConfig`: everything a pretraining run needs, loaded from a TOML recipe plus
`--set key=value` overrides (`scratchlm.config`)."""

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from scratchlm.config import load_config, parse_overrides
from scratchlm.errors import ConfigError
from scratchlm.units import parse_duration


@dataclass
class ParallelConfig:
    """How a run spreads over the processes torchrun starts, as degrees of a device mesh
    (pp, dp_replicate, dp_shard, tp), whose product is the number of processes. -1 means "the
    processes left over"; at most one data-parallel degree may be -1, and when both are, sharding
    takes the rest. The defaults are plain data parallelism (DDP) over every process.

        dp_replicate  copies of the model that average gradients (DDP; HSDP with dp_shard)
        dp_shard      ranks that each hold a slice of every weight, gradient and optimizer
                      state (FSDP2); FSDP2 is used whenever dp_shard is not 1, so dp_shard=-1
                      shards even on a single process
        tp            tensor parallel: each block's matrices split across ranks (Megatron)
        pp            pipeline parallel: the layers cut into pp stages
    """

    dp_replicate: int = -1
    dp_shard: int = 1
    tp: int = 1
    pp: int = 1
    pp_schedule: Literal["1f1b", "gpipe"] = "1f1b"
    pp_microbatches: int | None = None  # per micro-batch; None: pp (each stage busy once per step)

    def __post_init__(self) -> None:
        for name in ("dp_replicate", "dp_shard", "tp", "pp"):
            value = getattr(self, name)
            if value == 0 or value < -1 or (value == -1 and name in ("tp", "pp")):
                allowed = "a positive whole number or -1 (the rest)" if name.startswith("dp") else "a positive whole number"
                raise ConfigError(f"parallel.{name} must be {allowed}, not {value}")
        if self.pp_schedule not in ("1f1b", "gpipe"):
            raise ConfigError(f"parallel.pp_schedule must be '1f1b' or 'gpipe', not {self.pp_schedule!r}")
        if self.pp_microbatches is not None and self.pp_microbatches < 1:
            raise ConfigError(f"parallel.pp_microbatches must be at least 1, not {self.pp_microbatches}")

    @property
    def fsdp(self) -> bool:
        return self.dp_shard != 1

    def degrees(self, world: int) -> "Degrees":
        """The mesh for `world` processes, with -1 resolved; a ConfigError when they do not fit."""
        fixed = self.tp * self.pp
        replicate, shard = self.dp_replicate, self.dp_shard
        if replicate == -1 and shard == -1:
            replicate = 1
        known = fixed * (replicate if replicate != -1 else 1) * (shard if shard != -1 else 1)
        if world % known:
            raise ConfigError(f"the layout tp={self.tp} x pp={self.pp} x dp_replicate={self.dp_replicate} x "
                              f"dp_shard={self.dp_shard} does not divide {world} process(es); start "
                              f"torchrun --nproc_per_node with a multiple of {known}")
        if replicate == -1:
            replicate = world // known
        elif shard == -1:
            shard = world // known
        if replicate * shard * fixed != world:
            raise ConfigError(f"the layout tp={self.tp} x pp={self.pp} x dp_replicate={replicate} x dp_shard={shard} "
                              f"needs {replicate * shard * fixed} processes, not {world}; start torchrun --nproc_per_node "
                              f"{replicate * shard * fixed}")
        return Degrees(replicate, shard, self.tp, self.pp)


@dataclass(frozen=True)
class Degrees:
    """A resolved layout. Ranks are laid out pp-major, then dp_replicate, dp_shard and tp
    (torchtitan's order): the ranks of one tensor-parallel group are neighbours, so on a node
    of 8 GPUs, tp <= 8 keeps its frequent collectives on the fast links inside the node."""

    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    pp: int = 1

    @property
    def dp(self) -> int:
        """Data-parallel ranks: each reads a different slice of every batch."""
        return self.dp_replicate * self.dp_shard

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.pp

    def dp_rank(self, rank: int) -> int:
        """Which slice of the batch global rank `rank` reads (ranks of one tp group or pipeline share it)."""
        return (rank // self.tp) % self.dp

    def describe(self) -> str:
        parts = [f"{name}={getattr(self, name)}" for name in ("dp_replicate", "dp_shard", "tp", "pp") if getattr(self, name) > 1]
        return ", ".join(parts) or "1 process"


@dataclass
class TrainConfig:
    # model: a preset name, or "auto" to size a small Llama-style model to the time budget
    model: str = "auto"
    model_config: dict = field(default_factory=dict)  # overrides of ModelConfig fields
    seq_len: int | None = None  # default: the model's block_size
    # continued pretraining: start from this model's weights and architecture (anything
    # `scratchlm.interop.open_model` opens); `model` stays "auto", model_config may set dropout only
    init_from: str | None = None
    # batch
    micro_batch: int = 16  # sequences per forward pass on each process
    batch_tokens: int | None = None  # tokens per optimizer step; reached by gradient accumulation
    # budget: the first limit reached ends the run; the LR schedule spans the budget
    max_steps: int | None = None
    max_tokens: int | None = None
    max_time: str | None = None  # e.g. "120s", "5m"
    # optimizer and schedule
    optimizer: Literal["adamw", "muon"] = "adamw"
    lr: float = 3e-3  # AdamW's (with muon: for embeddings, head and norms)
    muon_lr: float = 0.02  # Muon's, for the blocks' weight matrices
    muon_momentum: float = 0.95
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    schedule: Literal["cosine", "wsd"] = "cosine"
    cooldown_fraction: float = 0.3  # wsd: share of the budget spent decaying
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # evaluation and logging
    eval_every: int = 100
    eval_tokens: int = 65536
    log_every: int = 10
    samples: int = 3
    sample_tokens: int = 120
    sample_prompt: str = ""
    # checkpoints
    checkpoint_every: int = 100  # steps; also at the end
    # machinery
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    compile: bool = False
    activation_checkpointing: bool = False
    device: str = "auto"
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # under torchrun: [parallel] / parallel.tp=2
    seed: int = 1337
    max_nonfinite: int = 5  # consecutive non-finite losses before the run stops

    def __post_init__(self) -> None:
        budget = (self.max_steps, self.max_tokens, self.max_time)
        if all(b is None for b in budget):
            raise ConfigError("training needs a budget: set max_steps, max_tokens or max_time")
        if self.max_time is not None:
            parse_duration(self.max_time)
        positive = {"micro_batch": self.micro_batch, "lr": self.lr, "eval_every": self.eval_every,
                    "log_every": self.log_every, "eval_tokens": self.eval_tokens}
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{name} must be positive, not {value}")
        if self.seq_len is not None and self.seq_len <= 0:
            raise ConfigError(f"seq_len must be positive, not {self.seq_len}")
        if self.init_from is not None and self.model != "auto":
            raise ConfigError(f"model={self.model!r} conflicts with init_from: the architecture comes from {self.init_from}; leave model as \"auto\"")
        if self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("warmup_steps must be >= 0 and min_lr_ratio in [0, 1]")
        if self.samples < 0:
            raise ConfigError(f"samples must be >= 0, not {self.samples}")
        self.sampling()  # a bad samples or sample_tokens fails now, not after hours of training
        microbatches = self.parallel.pp_microbatches or self.parallel.pp
        if self.parallel.pp > 1 and self.micro_batch % microbatches:
            raise ConfigError(f"micro_batch {self.micro_batch} does not split into {microbatches} pipeline micro-batches "
                              f"(parallel.pp_microbatches, by default pp); make micro_batch a multiple of it")
        if self.optimizer == "muon" and (self.parallel.fsdp or self.parallel.tp > 1):
            raise ConfigError("optimizer = \"muon\" orthogonalises whole weight matrices, which FSDP (parallel.dp_shard) "
                              "and tensor parallelism (parallel.tp) split across ranks; set optimizer = \"adamw\"")

    def sampling(self):
        """The sampling settings of the samples written at the end of the run (None: no samples)."""
        if self.samples == 0:
            return None
        from scratchlm.model.sampling import SamplingConfig

        return SamplingConfig(temperature=0.8, top_k=50, max_new_tokens=self.sample_tokens, seed=self.seed,
                              num_samples=self.samples)

    @property
    def max_seconds(self) -> float | None:
        return parse_duration(self.max_time) if self.max_time is not None else None

    def to_dict(self) -> dict:
        return asdict(self)


def load_train_config(recipe: str | Path | None = None, overrides: list[str] | None = None, base: dict | None = None) -> TrainConfig:
    """Defaults, then the recipe file, then `key=value` overrides."""
    return load_config(TrainConfig, recipe, overrides, base)


RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
# Fine-tuning recipes live apart, so pretraining's list of built-in recipes holds only its own.
FINETUNE_RECIPES_DIR = RECIPES_DIR / "finetune"


def builtin_recipes(folder: Path = RECIPES_DIR) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.toml"))


def resolve_recipe(recipe: str | Path | None, folder: Path = RECIPES_DIR) -> Path:
    """A recipe file path, or the name of a built-in recipe in `folder`; None means `cpu-default`."""
    if recipe is None:
        return RECIPES_DIR / "cpu-default.toml"
    path = Path(recipe)
    if path.is_file():
        return path
    builtin = folder / f"{recipe}.toml"
    if builtin.is_file():
        return builtin
    raise ConfigError(f"recipe {str(recipe)!r} is neither a file nor a built-in recipe ({', '.join(builtin_recipes(folder))})")


def pretrain_recipe(recipe: str | Path | None, overrides: list[str]) -> Path:
    """The recipe a pretraining run starts from: the one named; else, when the overrides set
    init_from (continued pretraining), `continued-pretraining`, whose gentle learning rate
    suits a model that has already learnt; else `cpu-default`."""
    if recipe is None and "init_from" in parse_overrides(overrides):
        recipe = "continued-pretraining"
    return resolve_recipe(recipe)
