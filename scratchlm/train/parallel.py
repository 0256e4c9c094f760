"""Parallelism applied to the single-device model from outside, in torchtitan's order:

    pipeline stages (pp)  -> the layers cut into stages, one per pipeline rank
    tensor parallel (tp)  -> each block's projections split column-wise then row-wise (Megatron),
                             norms sequence-parallel, the head's loss computed on vocab shards
    activation checkpointing, torch.compile (per block when the weights are sharded, so FSDP's
                             gathers run between graphs; the whole model otherwise)
    data parallel         -> FSDP2 (`fully_shard` per block, then the root) when dp_shard != 1,
                             HSDP when dp_replicate > 1 too; DDP when the weights are whole

The model file knows none of this: `parallelize` takes a `GPT` built for one device, a
`ParallelConfig` and the process count, and returns a `Layout` that holds what the loop calls
(`train_model`), what it evaluates (`eval_model`) and how it clips, syncs and checkpoints.
Ranks are laid out on a `DeviceMesh` of dims (pp, dp_replicate, dp_shard, tp); ranks that share
a data-parallel index read the same micro-batches (`Degrees.dp_rank`).
"""

import copy
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from scratchlm.errors import ConfigError
from scratchlm.model.model import GPT, allocate_on_cpu
from scratchlm.train.config import Degrees, ParallelConfig
from scratchlm.train.distributed import DistInfo

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


@dataclass
class Layout:
    """A model laid out over the processes of a run. `model` holds the parameters this rank
    trains (a pipeline rank: its stage); `train_model` is what a training step calls;
    `eval_model` what evaluation calls (every rank of a sharded layout must call it, with the
    same inputs)."""

    degrees: Degrees
    info: DistInfo
    model: nn.Module  # the module as built, parallelised in place (a pipeline rank: its stage)
    train_model: "nn.Module | Pipeline"
    mesh: object | None = None  # DeviceMesh, None for one process or plain DDP
    loss_parallel: bool = False
    pipeline: "Pipeline | None" = None
    ddp: bool = False
    fsdp: bool = False
    template: nn.Module | None = None  # the model as built, on the meta device: the shape of `whole_model`

    @property
    def sharded(self) -> bool:
        """Weights split across ranks: checkpoints are torch.distributed.checkpoint shards."""
        return self.fsdp or self.degrees.tp > 1 or self.degrees.pp > 1

    @property
    def dp_rank(self) -> int:
        return self.degrees.dp_rank(self.info.rank)

    @property
    def dp(self) -> int:
        return self.degrees.dp

    @property
    def eval_model(self) -> "nn.Module | Pipeline":
        return self.pipeline if self.pipeline is not None else self.model

    def parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @contextmanager
    def micro_step(self, last: bool) -> Iterator[None]:
        """Around one micro-batch's forward and backward: gradients are reduced across data
        parallel ranks on the last micro-batch of a step only; the loss of a vocab-sharded head
        is computed shard by shard."""
        if self.ddp and not last:
            sync = self.train_model.no_sync()
        else:
            sync = nullcontext()
            if self.fsdp:
                self.model.set_requires_gradient_sync(last)
        with sync, (loss_parallel_context() if self.loss_parallel else nullcontext()):
            yield

    def clip_grad_norm(self, max_norm: float) -> Tensor:
        """Clip the gradients of every rank's parameters by their global norm (over shards,
        tensor-parallel slices and pipeline stages) and return that norm."""
        params = self.parameters()
        grads = [p.grad for p in params if p.grad is not None]
        total = torch.nn.utils.get_total_norm(grads, foreach=True) if grads else torch.zeros((), device=params[0].device)
        total = whole_tensor(total)
        if self.degrees.pp > 1:  # each stage holds some layers: add the squares across the pipeline
            squared = total.float() ** 2
            dist.all_reduce(squared, group=self.mesh["pp"].get_group())
            total = squared.sqrt()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
        return total

    def whole_model(self) -> nn.Module | None:
        """The trained model as one plain module on the main process (None on the others): the
        shards gathered, or the stages collected, on the CPU (a model sharded because it is
        large may not fit whole on one GPU); an unsharded model as it is. Every rank must call it."""
        if not self.sharded:
            return self.model if self.info.is_main else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
        state = {name: tensor.detach().cpu() for name, tensor in state.items()}
        if self.degrees.pp > 1:  # each stage has its own layers, which its first rank sends
            parts: list[dict | None] = [None] * self.info.world
            per_stage = self.info.world // self.degrees.pp
            dist.all_gather_object(parts, state if self.info.rank % per_stage == 0 else None)
            state = {k: v for part in parts if part for k, v in part.items()}
        if not self.info.is_main:
            return None
        whole = allocate_on_cpu(self.template)
        whole.load_state_dict(state, strict=True)
        return whole


def loss_parallel_context():
    from torch.distributed.tensor.parallel import loss_parallel

    return loss_parallel()


def whole_tensor(t: Tensor) -> Tensor:
    """A DTensor (a vocab-sharded head's logits, its loss) as the whole tensor on every rank; a
    plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


# ---- building a layout ---------------------------------------------------------------------
def parallelize(
    model: nn.Module, parallel: ParallelConfig, info: DistInfo, device: torch.device, *,
    compile: bool = False, activation_checkpointing: bool = False, amp: torch.dtype | None = None,
    grad_accum: int = 1, loss_parallel: bool = False,
) -> Layout:
    """Lay `model` out over the run's processes as `parallel` says. Tensor and pipeline
    parallelism need a `GPT` (their cuts follow its modules); FSDP2 and DDP take any module.
    `loss_parallel`: the training step takes the model's own loss (`GPT.loss`, pretraining), so
    under tensor parallelism the head's logits may stay sharded over the vocabulary; other steps
    (fine-tuning losses computed from the logits) get them whole."""
    degrees = parallel.degrees(info.world)
    if degrees.world > 1 and not dist.is_initialized():
        raise ConfigError(f"the layout {degrees.describe()} needs {degrees.world} processes; start it with torchrun")
    if (degrees.tp > 1 or degrees.pp > 1) and not isinstance(model, GPT):
        raise ConfigError(f"tensor and pipeline parallelism cut a plain language model; this {type(model).__name__} "
                          "trains with data parallelism only (parallel.dp_shard for FSDP2)")
    needs_mesh = parallel.fsdp or degrees.tp > 1 or degrees.pp > 1
    mesh = _device_mesh(degrees, device) if needs_mesh else None
    template = meta_copy(model) if needs_mesh else None
    pipeline = None
    if degrees.pp > 1:
        model = pipeline_stage(model, degrees.pp, int(mesh["pp"].get_local_rank()))
    if degrees.tp > 1:
        apply_tensor_parallel(model, mesh["tp"], loss_parallel)
    if activation_checkpointing:
        from scratchlm.train.wrap import apply_activation_checkpointing

        apply_activation_checkpointing(model)
    layout = Layout(degrees, info, model, model, mesh, loss_parallel=loss_parallel and degrees.tp > 1, template=template)
    if compile and needs_mesh:
        for block in _blocks(model):  # per block, so FSDP's gathers and frees run between the graphs
            block.compile()
    elif compile:  # whole weights: one graph, the head and loss fused in too
        layout.train_model = torch.compile(model)
    if parallel.fsdp or (degrees.dp_replicate > 1 and needs_mesh):
        apply_fsdp(model, mesh, degrees, amp)
        layout.fsdp = True
    elif degrees.dp_replicate > 1:
        from torch.nn.parallel import DistributedDataParallel

        layout.train_model = DistributedDataParallel(layout.train_model, device_ids=[device.index] if device.type == "cuda" else None)
        layout.ddp = True
    if degrees.pp > 1:
        pipeline = Pipeline(model, mesh, parallel, degrees, device, grad_accum)
        layout.pipeline = pipeline
        layout.train_model = pipeline
    return layout


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters and buffers are on the meta device: its structure, no
    memory (deepcopy takes the memo's meta tensors instead of copying the real ones)."""
    memo: dict[int, object] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        meta = tensor.detach().to("meta")
        memo[id(tensor)] = nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def _device_mesh(degrees: Degrees, device: torch.device):
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():  # FSDP2 on one process (dp_shard=-1) still needs a process group
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    shape = tuple(getattr(degrees, name) for name in MESH_DIMS)
    return init_device_mesh(device.type, shape, mesh_dim_names=MESH_DIMS)


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a GPT, a stage of one, or a model that wraps one (a classifier,
    LoRA): the units that FSDP shards and checkpointing recomputes one at a time."""
    from scratchlm.model.model import Block

    return [m for m in model.modules() if isinstance(m, Block)]


# ---- data parallel ---------------------------------------------------------------------------
def apply_fsdp(model: nn.Module, mesh, degrees: Degrees, amp: torch.dtype | None) -> None:
    """FSDP2: each block's parameters become DTensors sharded over the data-parallel ranks,
    gathered just before the block runs and freed after; gradients are reduce-scattered. With
    `amp`, the gathered copies are in that dtype and the reduction stays in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dp_mesh = mesh["dp_replicate", "dp_shard"] if degrees.dp_replicate > 1 else mesh["dp_shard"]
    policy = MixedPrecisionPolicy(param_dtype=amp, reduce_dtype=torch.float32) if amp else MixedPrecisionPolicy()
    blocks = _blocks(model)
    for index, block in enumerate(blocks):
        # The last block's weights would be gathered again at once by the backward pass.
        fully_shard(block, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=index < len(blocks) - 1)
    fully_shard(model, mesh=dp_mesh, mp_policy=policy)


# ---- tensor parallel -------------------------------------------------------------------------
def check_tensor_parallel(model: GPT, tp: int) -> None:
    config = model.config
    sizes = {"n_head": config.n_head, "n_kv_head": config.kv_heads, "the MLP width": config.hidden,
             "vocab_size": config.vocab_size}
    for name, size in sizes.items():
        if size % tp:
            raise ConfigError(f"tp={tp} does not divide {name} ({size}); choose a tensor-parallel degree that does")


def apply_tensor_parallel(model: GPT, tp_mesh, loss_parallel: bool = True) -> None:
    """Megatron's split, with sequence parallelism (Korthikanti et al. 2022) between blocks:

        residual stream   (B, T/tp, C) on each rank: norms and dropout work on a slice of the sequence
        attention, MLP    input gathered to (B, T, C); q, k, v, gate, up column-wise (a rank holds
                          n_head/tp heads, hidden/tp units); proj and down row-wise, their partial
                          sums reduce-scattered back to (B, T/tp, C)
        head              column-wise over the vocabulary; with `loss_parallel` the loss is
                          computed on the shards, so the (B, T, vocab) logits are never gathered
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel, PrepareModuleInput, RowwiseParallel, SequenceParallel, parallelize_module,
    )

    check_tensor_parallel(model, tp_mesh.size())
    tied = model.config.tie_embeddings and model.embed is not None and model.head is not None
    top = {"norm": SequenceParallel(),
           "head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                   use_local_output=not loss_parallel)}
    if model.embed is not None:
        top["embed"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
        if model.pos_embed is not None:
            top["pos_embed"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    parallelize_module(model, tp_mesh, {k: v for k, v in top.items() if getattr(model, k, None) is not None})
    if tied:  # embedding rows and head rows are both the vocabulary, sharded alike: tie them again
        model.head.weight = model.embed.weight
    for block in _blocks(model):
        for name in ("attn.q", "attn.k", "attn.v", "attn.proj", "mlp.up", "mlp.down"):
            if type(block.get_submodule(name)) is not nn.Linear:
                raise ConfigError(f"tensor parallel splits plain linear layers, and {name} is a "
                                  f"{type(block.get_submodule(name)).__name__}; LoRA trains with data parallelism "
                                  "(parallel.dp_shard for FSDP2), not parallel.tp")
        plan = {
            "norm1": SequenceParallel(),
            # Block calls attn(x, rope, cached, layer, mask): only x is laid out.
            "attn": PrepareModuleInput(input_layouts=(Shard(1), None, None, None, None),
                                       desired_input_layouts=(Replicate(), None, None, None, None), use_local_output=True),
            "attn.q": ColwiseParallel(), "attn.k": ColwiseParallel(), "attn.v": ColwiseParallel(),
            "attn.proj": RowwiseParallel(output_layouts=Shard(1)),
            "norm2": SequenceParallel(),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True),
            "mlp.up": ColwiseParallel(),
            "mlp.down": RowwiseParallel(output_layouts=Shard(1)),
        }
        if getattr(block.mlp, "gate", None) is not None:
            plan["mlp.gate"] = ColwiseParallel()
        if block.attn.q_norm is not None:
            # Per-head norms of (B, heads, T, head_dim), each rank holding n_head/tp heads: the
            # heads dim is sharded, and the shared gain's gradient is summed across the ranks.
            plan["attn.q_norm"] = SequenceParallel(sequence_dim=1, use_local_output=True)
            plan["attn.k_norm"] = SequenceParallel(sequence_dim=1, use_local_output=True)
        parallelize_module(block, tp_mesh, plan)
    pad_sequence_to_multiple(model, tp_mesh.size())


def pad_sequence_to_multiple(model: GPT, multiple: int) -> None:
    """Sequence parallelism splits the T positions of a batch evenly across the tp ranks. A batch
    of another length (fine-tuning pads each batch to its longest example) is padded on the right
    to a multiple of tp as it enters the model, and the logits cut back to T as they leave: under
    causal attention no real position sees the padding, and its targets are -100, so the loss and
    every real logit are those of the unpadded batch."""
    lengths: list[int] = []

    def pad(module: GPT, args: tuple, kwargs: dict):
        idx = args[0] if args else kwargs["idx"]
        extra = -idx.shape[1] % multiple
        lengths.append(idx.shape[1] if extra else 0)
        if not extra or kwargs.get("cache") is not None:
            return None
        arguments = dict(zip(("idx", "targets"), args)) | kwargs
        fill = {"idx": 0, "targets": -100, "documents": -1}  # -1: padding is a document of its own
        for name, value in fill.items():
            if arguments.get(name) is not None:
                arguments[name] = F.pad(arguments[name], (0, extra), value=value)
        return (), arguments

    def cut(module: GPT, args: tuple, kwargs: dict, output: tuple):
        length = lengths.pop()
        if not length:
            return None
        logits, loss = output
        return logits[:, :length], loss

    model.register_forward_pre_hook(pad, with_kwargs=True)
    model.register_forward_hook(cut, with_kwargs=True)


# ---- pipeline parallel -----------------------------------------------------------------------
def stage_layers(n_layer: int, stages: int) -> list[range]:
    """The blocks of each pipeline stage: n_layer split as evenly as possible, earlier stages
    taking the remainder (the last stage also runs the head, the largest matmul)."""
    if stages > n_layer:
        raise ConfigError(f"pp={stages} stages need at least as many layers; the model has {n_layer}")
    base, extra = divmod(n_layer, stages)
    bounds = [0]
    for stage in range(stages):
        bounds.append(bounds[-1] + base + (1 if stage < extra else 0))
    return [range(bounds[s], bounds[s + 1]) for s in range(stages)]


def pipeline_stage(model: GPT, stages: int, stage: int) -> GPT:
    """Stage `stage` of `model` cut into `stages`: the same GPT with the other layers dropped,
    the embedding kept by the first stage only and the final norm and head by the last. Blocks
    go in a ModuleDict keyed by their layer numbers, so parameter names stay those of the whole
    model: a checkpoint saved by stages loads into any layout."""
    if model.config.tie_embeddings:
        raise ConfigError("pipeline parallelism needs untied embeddings (the first stage holds the embedding, "
                          "the last the head); set model_config.tie_embeddings=false or pp=1")
    layers = stage_layers(model.config.n_layer, stages)[stage]
    model.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in layers})
    if stage > 0:
        model.embed, model.pos_embed = None, None
    if stage < stages - 1:
        model.norm, model.head = None, None
    return model


class _FirstOutput(nn.Module):
    """A stage as the schedule needs it: one tensor out (hidden states, or the last stage's
    logits), where the GPT returns (output, loss)."""

    def __init__(self, stage: GPT) -> None:
        super().__init__()
        self.stage = stage

    def forward(self, x: Tensor) -> Tensor:
        return self.stage(x)[0]


class Pipeline:
    """The stage of this rank in a pipeline schedule (GPipe or 1F1B). Called like the model on
    a micro-batch, `pipeline(x, y)` runs forward and backward of all its pipeline micro-batches
    and returns (None, loss), the loss already backpropagated (so it has no grad), the same on
    every stage. `token_nats(x, y)` evaluates: per-token losses, on every stage."""

    def __init__(self, stage: GPT, mesh, parallel: ParallelConfig, degrees: Degrees, device: torch.device, grad_accum: int):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        self.stage_module = stage
        self.group = mesh["pp"].get_group()
        self.index = int(mesh["pp"].get_local_rank())
        self.stages = degrees.pp
        self.microbatches = parallel.pp_microbatches or degrees.pp
        self.grad_accum = grad_accum
        self.device = device
        schedule = Schedule1F1B if parallel.pp_schedule == "1f1b" else ScheduleGPipe
        stage = PipelineStage(_FirstOutput(stage), self.index, self.stages, device, group=self.group)
        # Each pipeline micro-batch's loss is divided by their number and by grad_accum, so that a
        # step's gradient is the mean over all its micro-batches, as without a pipeline. (The
        # schedule's own scale_grads would divide the gradient accumulated so far, earlier
        # micro-batches of the step included, again at every call.)
        self.schedule = schedule(stage, self.microbatches, loss_fn=self._loss, scale_grads=False)

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.stages - 1

    def _loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        return GPT.loss(logits, targets) / (self.microbatches * self.grad_accum)

    def _check(self, x: Tensor) -> None:
        if x.shape[0] % self.microbatches:
            raise ConfigError(f"micro_batch {x.shape[0]} is not divisible by pp_microbatches {self.microbatches}")

    def __call__(self, x: Tensor, y: Tensor | None = None) -> tuple[None, Tensor]:
        self._check(x)
        losses: list[Tensor] = []
        if self.first:
            self.schedule.step(x)
        elif self.last:
            self.schedule.step(target=y, losses=losses, return_outputs=False)
        else:
            self.schedule.step()
        if self.last:  # under tensor parallelism, the losses of a vocab-sharded head are DTensors
            loss = torch.stack([whole_tensor(l).detach() for l in losses]).mean() * self.microbatches * self.grad_accum
        else:
            loss = torch.zeros((), device=self.device)
        return None, self._from_last(loss)

    def _from_last(self, t: Tensor) -> Tensor:
        dist.broadcast(t, group=self.group, group_src=self.stages - 1)
        return t

    @torch.no_grad()
    def token_nats(self, x: Tensor, y: Tensor) -> Tensor:
        """Next-token losses (nats) of every position of x, shape (B * T,), on every stage."""
        rows = x.shape[0]
        short = -rows % self.microbatches  # the last evaluation batch may not split evenly: pad it
        if short:
            x, y = torch.cat([x, x[-1:].expand(short, -1)]), torch.cat([y, y[-1:].expand(short, -1)])
        nats = torch.zeros(y.numel(), device=self.device)
        if self.first:
            self.schedule.eval(x)
        else:
            logits = self.schedule.eval(target=y if self.last else None)  # (the schedule's loss is not used)
            if self.last:
                logits = whole_tensor(logits)
                nats = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1), reduction="none")
        return self._from_last(nats)[: rows * y.shape[1]]

    @property
    def training(self) -> bool:
        return self.stage_module.training

    def train(self, mode: bool = True) -> "Pipeline":
        self.stage_module.train(mode)
        return self

    def eval(self) -> "Pipeline":
        return self.train(False)

