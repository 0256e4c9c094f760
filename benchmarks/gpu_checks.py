"""The checks of benchmarks/gpu_check.sh, one subcommand each; every one prints one result line
and appends a JSON row to --results (a .jsonl file), which `table` turns into markdown.

    python benchmarks/gpu_checks.py cuda-tests --results R.jsonl [--log FILE]
    python benchmarks/gpu_checks.py data       --results R.jsonl --work DIR
    python benchmarks/gpu_checks.py flash      --results R.jsonl [--device cuda]
    python benchmarks/gpu_checks.py pretrain   --results R.jsonl --work DIR [--fsdp] [--device cuda]
    python benchmarks/gpu_checks.py nanogpt    --results R.jsonl --work DIR --nanogpt-dir DIR
    python benchmarks/gpu_checks.py decode     --results R.jsonl [--device cuda]
    python benchmarks/gpu_checks.py table      --results R.jsonl [--out summary.md] [--revision REV]

On a GPU the shape is GPT-2 small as nanoGPT trains it (gpt2-124m, vocabulary 50304, context
1024, 16 sequences per step, bf16, torch.compile). `--device cpu` swaps in a tiny model of the
same family and a few float32 steps: a smoke run of every code path, not a measurement.

Throughput is the median over logged steps after `warmup` (compilation and the first
allocations fall in the first steps); MFU is achieved FLOP/s over the GPU's dense bf16 peak,
with one formula for both scratchlm and nanoGPT (`flops_per_token`, 6 N plus attention), so the
two compare like for like (nanoGPT's own printout divides by the A100's 312 TFLOP/s).
"""

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from scratchlm.atomic_io import write_bytes_atomic, write_text_atomic
from scratchlm.devices import peak_flops
from scratchlm.model import ModelConfig, flops_per_token, get_preset

TOKENIZER_VOCAB = 8192  # seconds to train on the embedded corpus; the model's vocabulary stays 50304


@dataclass(frozen=True)
class Shape:
    """What the training checks run: the same for scratchlm and nanoGPT."""

    model: str = "gpt2-124m"
    vocab_size: int = 50304  # GPT-2's 50257 padded, as nanoGPT pads it
    seq_len: int = 1024
    micro_batch: int = 16
    steps: int = 300
    warmup: int = 30  # steps left out of the throughput median
    dtype: str = "bfloat16"
    compile: bool = True
    layers: dict | None = None  # n_layer / n_head / n_embd overrides (the CPU smoke's tiny model)

    def model_config(self) -> ModelConfig:
        config = get_preset(self.model).replace(vocab_size=self.vocab_size, block_size=self.seq_len)
        return config.replace(**self.layers) if self.layers else config


CPU_SMOKE = Shape(seq_len=64, micro_batch=2, steps=12, warmup=2, dtype="float32", compile=False,
                  layers={"n_layer": 2, "n_head": 2, "n_embd": 64})


def shape_for(device: str, steps: int | None) -> Shape:
    shape = Shape() if device.startswith("cuda") else CPU_SMOKE
    return replace(shape, steps=steps) if steps else shape


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    import platform

    return f"CPU ({platform.machine()})"


def record(results: Path, row: dict, line: str) -> None:
    """Print the check's one result line and add its row to the results file (rewritten whole
    and atomically, so an interrupted check never leaves a torn row)."""
    print(line, flush=True)
    old = results.read_text() if results.is_file() else ""
    write_text_atomic(results, old + json.dumps(row) + "\n")


def tail(text: str, lines: int = 3) -> str:
    return " | ".join(t.strip() for t in text.strip().splitlines()[-lines:])


def run_logged(command: list[str], log: Path, timeout: float, cwd: Path | None = None) -> tuple[int | None, str]:
    """Run `command`, its output (stdout and stderr together) saved in `log`; rc None on timeout."""
    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
        rc, output = done.returncode, done.stdout
    except subprocess.TimeoutExpired as expired:
        rc, output = None, expired.stdout.decode() if isinstance(expired.stdout, bytes) else expired.stdout or ""
    write_text_atomic(log, f"$ {' '.join(command)}\n{output}")
    return rc, output


# ---- a. the test suite's CUDA tests ------------------------------------------------------
def cuda_tests(args: argparse.Namespace) -> int:
    command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider"]
    rc, output = run_logged(command, args.log, args.timeout)
    summary = output.strip().splitlines()[-1] if output.strip() else "no output"
    status = {0: "ok", 5: "none collected"}.get(rc, "timed out" if rc is None else "failed")
    record(args.results, {"check": "cuda-tests", "status": status, "summary": summary},
           f"a. CUDA tests: {status}: {summary}")
    return 0 if status in ("ok", "none collected") else 1


# ---- data: the embedded corpus as shards, and as nanoGPT's train.bin / val.bin -------------
def data(args: argparse.Namespace) -> int:
    from scratchlm.data.shards import split_tokens
    from scratchlm.data.tokenize import tokenize_files
    from scratchlm.tokenizer import train_tokenizer

    start = time.perf_counter()
    tokenizer, _, _ = train_tokenizer(None, args.vocab_size)
    manifest = tokenize_files(None, tokenizer, args.work / "shards")
    write_nanogpt_dataset(args.work / "shards", args.work / "nanogpt_data")
    counts = split_tokens(manifest)
    what = (f"embedded corpus (CPython docs), {tokenizer.vocab_size}-token BPE trained here, "
            f"{counts['train']:,} train / {counts['val']:,} val tokens, re-read in a loop")
    record(args.results, {"check": "data", "status": "ok", "data": what, "seconds": round(time.perf_counter() - start, 1)},
           f"   data: {what}")
    return 0


def write_nanogpt_dataset(shards: Path, out: Path) -> None:
    """Each split's shard files end to end as one flat uint16 file: nanoGPT's data layout."""
    manifest = json.loads((shards / "manifest.json").read_text())
    if manifest["dtype"] != "uint16":
        raise SystemExit(f"{shards}: nanoGPT reads uint16 tokens, these shards are {manifest['dtype']}")
    for split in ("train", "val"):
        blob = b"".join((shards / f["file"]).read_bytes() for f in manifest["splits"][split])
        write_bytes_atomic(out / f"{split}.bin", blob)


# ---- b. FlashAttention selected -----------------------------------------------------------
def flash(args: argparse.Namespace) -> int:
    """Forward and backward of the model in bf16 with SDPA limited to FlashAttention: raises if
    no flash kernel fits. The profiler then shows the flash ops ran, which also catches a model
    that stopped calling scaled_dot_product_attention (the restriction alone would not)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from scratchlm.model import GPT

    shape = shape_for(args.device, None)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = GPT(shape.model_config()).to(device)
    x = torch.randint(0, shape.vocab_size, (shape.micro_batch, shape.seq_len + 1), device=device)
    default_ops = _attention_ops(model, x, device, None)
    try:
        ops = _attention_ops(model, x, device, sdpa_kernel(SDPBackend.FLASH_ATTENTION))
        missing = [f"{kind} flash op" for kind, found in (("forward", _has_flash(ops, backward=False)),
                                                          ("backward", _has_flash(ops, backward=True))) if not found]
        status, detail = ("failed", f"no {' or '.join(missing)} among {sorted(ops)}") if missing else ("ok", ", ".join(sorted(ops)))
    except RuntimeError as error:  # "No available kernel" when flash cannot run these inputs
        status, detail = "failed", str(error).splitlines()[0]
    row = {"check": "flash", "status": status, "detail": detail, "default_ops": sorted(default_ops),
           "device": device_name(args.device), "shape": asdict(shape)}
    record(args.results, row, f"b. FlashAttention, bf16 forward+backward: {status}: {detail}; "
                              f"unrestricted SDPA picks {', '.join(sorted(default_ops)) or 'nothing'}")
    return 0 if status == "ok" else 1


def _attention_ops(model: torch.nn.Module, x: torch.Tensor, device: torch.device, restriction) -> set[str]:
    from contextlib import nullcontext

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with restriction or nullcontext(), torch.autocast(device.type, dtype=torch.bfloat16):
            _, loss = model(x[:, :-1], x[:, 1:])
            loss.backward()
    model.zero_grad(set_to_none=True)
    return {e.key for e in prof.key_averages() if e.key.startswith("aten::_scaled_dot_product")}


def _has_flash(ops: set[str], backward: bool) -> bool:
    return any("flash_attention" in op and op.endswith("_backward") == backward for op in ops)


# ---- c, d. scratchlm pretrain --------------------------------------------------------------
def pretrain(args: argparse.Namespace) -> int:
    shape = shape_for(args.device, args.steps)
    run = args.work / ("run-fsdp" if args.fsdp else "run")
    label = "scratchlm + FSDP2 (1 GPU)" if args.fsdp else "scratchlm"
    rc, output = run_logged(pretrain_command(shape, args.work / "shards", run, args.device, args.fsdp),
                            args.log_dir / f"{run.name}.log", args.timeout)
    row = {"check": "pretrain-fsdp" if args.fsdp else "pretrain", "label": label, "device": device_name(args.device),
           "shape": asdict(shape)}
    if rc != 0:
        row |= {"status": "timed out" if rc is None else "failed", "detail": tail(output)}
        record(args.results, row, f"{'d' if args.fsdp else 'c'}. {label}: {row['status']}: {row['detail']}")
        return 1
    row |= {"status": "ok", **summarise_run(run, shape.warmup)}
    if args.fsdp and "FSDP" not in (row["layout"] or ""):  # the run finished, but not sharded
        row |= {"status": "failed", "detail": f"report.md's layout is {row['layout']!r}, not FSDP2"}
    for name in ("metrics.jsonl", "report.md", "config.json"):  # the run itself (checkpoints) stays in --work
        if (run / name).is_file():
            write_text_atomic(args.log_dir / f"{run.name}-{name}", (run / name).read_text())
    layout = f", layout: {row['layout']}" if row["layout"] else ""
    record(args.results, row, f"{'d' if args.fsdp else 'c'}. {label}: {row['status']}: {_speed(row)}, loss {row['final_loss']}{layout}")
    return 0 if row["status"] == "ok" else 1


def pretrain_command(shape: Shape, shards: Path, run: Path, device: str, fsdp: bool) -> list[str]:
    sets = {"device": device, "dtype": shape.dtype, "compile": str(shape.compile).lower(), "seq_len": shape.seq_len,
            "micro_batch": shape.micro_batch, "batch_tokens": shape.micro_batch * shape.seq_len,  # no accumulation, as nanoGPT here
            "model": shape.model, "model_config.vocab_size": shape.vocab_size, "eval_every": 1_000_000,
            "eval_tokens": 65536, "checkpoint_every": 1_000_000, "samples": 0, "log_every": 10}
    sets |= {f"model_config.{k}": v for k, v in (shape.layers or {}).items()}
    if fsdp:
        sets["parallel.dp_shard"] = -1
    # FSDP2 needs a process group, which torchrun's environment describes; one process of it.
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"] if fsdp else []
    return [sys.executable, *launcher, "-m", "scratchlm.cli", "pretrain", "--data", str(shards), "--out", str(run),
            "--recipe", "gpt2-124m", "--max-steps", str(shape.steps), "--quiet",
            *[part for key, value in sets.items() for part in ("--set", f"{key}={value}")]]


def summarise_run(run: Path, warmup: int) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    timed = [r for r in rows if "tokens_per_s" in r and r["step"] > warmup] or [r for r in rows if "tokens_per_s" in r]
    report = (run / "report.md").read_text()
    memory = re.search(r"^\| peak memory \| ([\d,.]+) MB", report, re.MULTILINE)  # "MB per process" under torchrun
    layout = re.search(r"^\| layout \| (.+?) \|$", report, re.MULTILINE)
    mfus = [r["mfu"] for r in timed if "mfu" in r]
    return {"tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in timed)),
            "mfu": statistics.median(mfus) if mfus else None,
            "peak_memory_mb": float(memory.group(1).replace(",", "")) if memory else None,
            "final_loss": rows[-1].get("loss"), "steps": rows[-1]["step"], "layout": layout.group(1) if layout else None}


def _speed(row: dict) -> str:
    mfu = f", MFU {row['mfu']:.1%}" if row.get("mfu") is not None else ""
    memory = f", peak memory {row['peak_memory_mb']:,.0f} MB" if row.get("peak_memory_mb") is not None else ""
    return f"{row['tokens_per_s']:,} tokens/s{mfu}{memory}"


# ---- f. nanoGPT's train.py on the same data and shape --------------------------------------
NANOGPT_ITER = re.compile(r"^iter (\d+): loss ([\d.]+), time ([\d.]+)ms, mfu (-?[\d.]+)%", re.MULTILINE)


def nanogpt(args: argparse.Namespace) -> int:
    if args.nanogpt_dir is None or not (args.nanogpt_dir / "train.py").is_file():
        why = "NANOGPT_DIR not set" if args.nanogpt_dir is None else f"no train.py in {args.nanogpt_dir}"
        record(args.results, {"check": "nanogpt", "status": "skipped", "detail": why}, f"f. nanoGPT: skipped: {why}")
        return 0
    shape = shape_for(args.device, args.steps)
    dataset = args.work / "nanogpt_data"
    if shape.vocab_size != 50304:  # without meta.pkl nanoGPT uses 50304
        import pickle

        write_bytes_atomic(dataset / "meta.pkl", pickle.dumps({"vocab_size": shape.vocab_size}))
    rc, output = run_logged(nanogpt_command(shape, dataset, args.work / "nanogpt_out", args.device),
                            args.log_dir / "nanogpt.log", args.timeout, cwd=args.nanogpt_dir)
    row = {"check": "nanogpt", "label": "nanoGPT train.py", "device": device_name(args.device), "shape": asdict(shape)}
    iters = [(int(n), float(loss), float(ms), float(mfu)) for n, loss, ms, mfu in NANOGPT_ITER.findall(output)]
    if rc != 0 or not iters:
        row |= {"status": "timed out" if rc is None else "failed", "detail": tail(output)}
        record(args.results, row, f"f. nanoGPT: {row['status']}: {row['detail']}")
        return 1
    timed = [ms for n, _, ms, _ in iters if n > shape.warmup] or [ms for _, _, ms, _ in iters]
    tokens_per_s = shape.micro_batch * shape.seq_len / (statistics.median(timed) / 1000)
    peak = peak_flops(torch.device(args.device))
    own = iters[-1][3] / 100 * 312e12 / peak if peak else None  # its running MFU, rescaled from the A100's peak
    row |= {"status": "ok", "tokens_per_s": round(tokens_per_s), "steps": iters[-1][0],
            "mfu": flops_per_token(shape.model_config(), shape.seq_len) * tokens_per_s / peak if peak else None,
            "nanogpt_own_mfu": own, "final_loss": iters[-1][1], "peak_memory_mb": None}
    record(args.results, row, f"f. nanoGPT train.py: {_speed(row)}, loss {row['final_loss']}")
    return 0


def nanogpt_command(shape: Shape, dataset: Path, out_dir: Path, device: str) -> list[str]:
    config = shape.model_config()
    flags = {
        # nanoGPT joins 'data' and the dataset name: an absolute path leaves its checkout untouched
        "dataset": dataset.resolve(), "out_dir": out_dir.resolve(), "device": device, "dtype": shape.dtype,
        "compile": shape.compile, "batch_size": shape.micro_batch, "block_size": shape.seq_len,
        "gradient_accumulation_steps": 1, "max_iters": shape.steps, "n_layer": config.n_layer,
        "n_head": config.n_head, "n_embd": config.n_embd, "bias": config.bias, "dropout": 0.0,
        # one evaluation happens at iteration 0 whatever the interval: keep it short
        "eval_interval": 1_000_000, "eval_iters": 5, "log_interval": 1, "always_save_checkpoint": False,
    }
    return [sys.executable, "train.py", *[f"--{key}={value}" for key, value in flags.items()]]


# ---- e. decode speed of SmolLM2-135M -------------------------------------------------------
def decode(args: argparse.Namespace) -> int:
    from decode_speed import BATCH_PROMPTS
    from models import smollm2_path

    from scratchlm.interop import open_model
    from scratchlm.model.quantize import prepare_for_inference

    cpu = not args.device.startswith("cuda")
    new_tokens, repeats, sizes = (8, 1, [1, 2]) if cpu else (args.new_tokens, 3, args.batch_sizes)
    dtype = "float32" if cpu else "bfloat16"
    try:
        path = smollm2_path()
    except SystemExit as missing:  # the package is not installed: say so in the table, go on
        record(args.results, {"check": "decode", "status": "skipped", "detail": str(missing)}, f"e. SmolLM2-135M decode: skipped: {missing}")
        return 0
    opened = open_model(path, args.device, kind="language-model")
    model = prepare_for_inference(opened.model, dtype).eval()
    prompts = [opened.tokenizer.encode(p) for p in BATCH_PROMPTS]
    _decode_rate(model, prompts, 1, 4)  # warm-up: CUDA context, cuBLAS handles, allocator
    for size in sizes:
        rate = statistics.median(_decode_rate(model, prompts, size, new_tokens) for _ in range(repeats))
        record(args.results, {"check": "decode", "status": "ok", "label": f"SmolLM2-135M {dtype} decode, batch {size}",
                              "batch": size, "dtype": dtype, "new_tokens": new_tokens, "tokens_per_s": round(rate),
                              "device": device_name(args.device)},
               f"e. SmolLM2-135M {dtype} decode, batch {size}: {rate:,.0f} tokens/s ({new_tokens} new tokens per sequence)")
    return 0


def _decode_rate(model, prompts: list[list[int]], size: int, new_tokens: int) -> float:
    """Tokens per second of the decode steps alone (prefill excluded), summed over the batch;
    greedy, no stop tokens, so every sequence produces `new_tokens`."""
    from scratchlm.model.sampling import DecodeBatch, SamplingConfig

    config = SamplingConfig(temperature=0.0, max_new_tokens=new_tokens)
    batch = DecodeBatch(model, max_batch=size)
    for n in range(size):
        batch.add(prompts[n % len(prompts)], config)
    start = time.perf_counter()
    steps = 0
    while batch.step():  # each step ends in .tolist(): the GPU has finished it
        steps += 1
    return size * steps / (time.perf_counter() - start)


# ---- the table for docs/benchmarks.md ------------------------------------------------------
def table(args: argparse.Namespace) -> int:
    rows = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
    gpu = next((r["device"] for r in rows if "device" in r), "unknown device")
    lines = [f"GPU: {gpu}; torch {torch.__version__}" + (f", CUDA {torch.version.cuda}" if torch.version.cuda else "")
             + f"; scratchlm {args.revision}", "",
             "| check | result | tokens/s | MFU | peak memory |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(_table_row(row))
    warmup = next((r["shape"]["warmup"] for r in rows if r.get("shape")), None)
    lines += ["", *_targets(rows), "",
              f"tokens/s: median over the steps after the first {warmup}. MFU: tokens/s x FLOPs per token (6 N plus "
              "attention, `flops_per_token`) over the GPU's dense bf16 peak, the same formula for scratchlm and nanoGPT."]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        write_text_atomic(args.out, text)
    failed = [r["check"] for r in rows if r.get("status") in ("failed", "timed out")]
    return 1 if failed else 0


def _table_row(row: dict) -> str:
    names = {"cuda-tests": "CUDA tests (`pytest -m cuda`)", "data": "training data", "flash": "FlashAttention, bf16 fwd+bwd"}
    shape = row.get("shape") or {}
    name = names.get(row["check"]) or row.get("label", row["check"])
    if row["check"] in ("pretrain", "pretrain-fsdp", "nanogpt") and shape:
        name += f", {shape['model']} ctx {shape['seq_len']} x {shape['micro_batch']}, {shape['dtype']}" + (", compile" if shape["compile"] else "")
        name += " (tiny smoke model)" if shape.get("layers") else ""
    result = row.get("summary") or row.get("data") or row.get("detail") or (f"loss {row['final_loss']} after {row['steps']} steps" if "final_loss" in row else "")
    result += f"; {row['layout']}" if row.get("layout") and not row.get("detail") else ""
    if row["check"] == "flash" and row["status"] == "ok":
        result = "selected; unrestricted: " + ", ".join(op.removeprefix("aten::") for op in row["default_ops"])
    speed = f"{row['tokens_per_s']:,}" if row.get("tokens_per_s") is not None else ""
    mfu = f"{row['mfu']:.1%}" if row.get("mfu") is not None else ""
    memory = f"{row['peak_memory_mb']:,.0f} MB" if row.get("peak_memory_mb") is not None else ""
    status = "" if row.get("status") == "ok" else f"**{row.get('status')}**: "
    return f"| {name} | {status}{result} | {speed} | {mfu} | {memory} |"


def _targets(rows: list[dict]) -> list[str]:
    """The issue's targets: gpt2-124m at >= 45% MFU on one H100, and at least nanoGPT's tokens/s."""
    ours = next((r for r in rows if r["check"] == "pretrain" and r.get("status") == "ok"), None)
    ref = next((r for r in rows if r["check"] == "nanogpt" and r.get("status") == "ok"), None)
    if ours is None:
        return ["Targets: not measured (the scratchlm run did not finish)."]
    out = []
    if ours.get("mfu") is not None:
        out.append(f"Target MFU >= 45%: {ours['mfu']:.1%}, {'met' if ours['mfu'] >= 0.45 else 'NOT met'}.")
    if ref is not None:
        ratio = ours["tokens_per_s"] / ref["tokens_per_s"]
        out.append(f"Target tokens/s >= nanoGPT's: {ratio:.2f}x nanoGPT, {'met' if ratio >= 1 else 'NOT met'}.")
    else:
        out.append("Target tokens/s >= nanoGPT's: not measured (nanoGPT skipped or failed).")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, run, device: bool = False, work: bool = False, timeout: float | None = None) -> argparse.ArgumentParser:
        sub = commands.add_parser(name)
        sub.add_argument("--results", type=Path, required=True, help="the .jsonl file a row is appended to")
        if device:
            sub.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a tiny smoke run)")
        if work:
            sub.add_argument("--work", type=Path, required=True, help="scratch folder: shards, runs, nanoGPT's data")
        if timeout:
            sub.add_argument("--timeout", type=float, default=timeout, help=f"seconds (default: {timeout:g})")
        sub.set_defaults(run=run)
        return sub

    command("cuda-tests", cuda_tests, timeout=150).add_argument("--log", type=Path, required=True)
    command("data", data, work=True).add_argument("--vocab-size", type=int, default=TOKENIZER_VOCAB)
    command("flash", flash, device=True)
    for name, run in (("pretrain", pretrain), ("nanogpt", nanogpt)):
        sub = command(name, run, device=True, work=True, timeout=240)
        sub.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 300 on a GPU)")
        sub.add_argument("--log-dir", type=Path, required=True, help="where the run's output and records are kept")
        if name == "pretrain":
            sub.add_argument("--fsdp", action="store_true", help="FSDP2 on one process: parallel.dp_shard=-1 under torchrun")
        else:
            sub.add_argument("--nanogpt-dir", type=Path, default=None, help="a checkout of github.com/karpathy/nanoGPT")
    sub = command("decode", decode, device=True)
    sub.add_argument("--new-tokens", type=int, default=128)
    sub.add_argument("--batch-sizes", type=lambda s: [int(b) for b in s.split(",")], default=[1, 32])
    sub = command("table", table)
    sub.add_argument("--out", type=Path, default=None, help="also write the table here")
    sub.add_argument("--revision", default="unknown", help="which scratchlm was measured (git describe)")
    args = parser.parse_args()
    try:
        return args.run(args)
    except Exception as error:  # a crash is a failed check in the table, and the next check still runs
        import traceback

        traceback.print_exc()
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        record(args.results, {"check": args.command, "status": "failed", "detail": f"{type(error).__name__}: {first}"},
               f"{args.command}: failed: {type(error).__name__}: {first} (traceback on stderr)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
