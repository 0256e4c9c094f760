"""Run under torchrun by tests/test_parallel.py: for each layout named on the command line, train
a tiny GPT for a few steps on fixed global batches, laid out by `scratchlm.train.parallel`, and
the same GPT in this one process without any layout; write, per rank, each layout's losses next
to the single-process ones and the largest gradient difference at the first step.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/parallel_parity.py OUT \\
        llama:dp_shard=2 gpt2:tp=2 llama-untied:pp=2,pp_schedule=gpipe ...
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from scratchlm.config import build
from scratchlm.model import GPT, ModelConfig
from scratchlm.train.config import ParallelConfig
from scratchlm.train.distributed import init_distributed, mean_across_ranks
from scratchlm.train.parallel import parallelize, whole_tensor

SMALL = dict(vocab_size=64, block_size=16, n_layer=4, n_head=4, n_embd=32)
MODELS = {
    # Llama-shaped: rotary positions, RMSNorm, SwiGLU, grouped-query attention, no biases.
    "llama": ModelConfig(**SMALL, n_kv_head=2, positions="rope", norm="rmsnorm", mlp="swiglu", bias=False),
    "llama-untied": ModelConfig(**SMALL, n_kv_head=2, positions="rope", norm="rmsnorm", mlp="swiglu", bias=False,
                                tie_embeddings=False),
    "llama-qknorm": ModelConfig(**SMALL, n_kv_head=2, positions="rope", norm="rmsnorm", mlp="swiglu", bias=False,
                                qk_norm=True),
    # GPT-2-shaped: learned positions, LayerNorm with biases, GELU, tied embeddings.
    "gpt2": ModelConfig(**SMALL),
}
BATCH, STEPS, LR = 4, 3, 1e-2


def global_batch(step: int, config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, config.vocab_size, (BATCH, config.block_size + 1), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def train(config: ModelConfig, parallel: ParallelConfig | None, info) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Losses of STEPS steps and the first step's gradients by parameter name (whole tensors)."""
    torch.manual_seed(0)
    model = GPT(config)
    device = torch.device("cpu")
    if parallel is None:
        module, step_model, dp, dp_rank, layout = model, model, 1, 0, None
    else:
        layout = parallelize(model, parallel, info, device)
        module, step_model, dp, dp_rank = layout.model, layout.train_model, layout.dp, layout.dp_rank
    optimizer = torch.optim.AdamW([p for p in module.parameters()], lr=LR, weight_decay=0.1)
    losses, grads = [], {}
    for step in range(STEPS):
        x, y = global_batch(step, config)
        rows = slice(dp_rank * BATCH // dp, (dp_rank + 1) * BATCH // dp)
        if layout is None:
            _, loss = step_model(x, y)
            loss.backward()
            losses.append(loss.item())
        else:
            with layout.micro_step(last=True):
                _, loss = step_model(x[rows], y[rows])
                if loss.requires_grad:
                    loss.backward()
            losses.append(mean_across_ranks(whole_tensor(loss).item(), info, device))
        if step == 0:
            grads = {name: whole_tensor(p.grad).detach().clone() for name, p in module.named_parameters() if p.grad is not None}
        if layout is None:
            norm = torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        else:
            norm = layout.clip_grad_norm(1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 0:
            grads["(grad norm)"] = whole_tensor(norm).detach().reshape(1)
    return losses, grads


def parse(spec: str) -> tuple[str, ParallelConfig]:
    name, _, settings = spec.partition(":")
    values = dict(item.split("=") for item in settings.split(",") if item)
    return name, build(ParallelConfig, values, spec)


def main() -> None:
    out = Path(sys.argv[1])
    info = init_distributed(torch.device("cpu"))
    results = {}
    for spec in sys.argv[2:]:
        name, parallel = parse(spec)
        config = MODELS[name]
        one_losses, one_grads = train(config, None, info)
        losses, grads = train(config, parallel, info)
        compared = sorted(set(grads) & set(one_grads))
        results[spec] = {
            "losses": losses, "one_process": one_losses, "compared": compared,
            "missing": sorted(set(grads) - set(one_grads)),
            "max_grad_diff": max(float((grads[k] - one_grads[k]).abs().max()) for k in compared),
            "max_grad": max(float(one_grads[k].abs().max()) for k in compared),
        }
        dist.barrier()
    (out / f"rank{info.rank}.json").write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
