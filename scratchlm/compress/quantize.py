"""`scratchlm quantize`: a model's linear layers to int8 or int4, saved as a model folder.

    rtn    round to nearest (`scratchlm.model.quantize`): int8 with a scale per output row, int4
           with a (scale, zero) per group of `group_size` inputs; no data needed
    gptq   int4 calibrated on activations (`scratchlm.compress.gptq`): each rounding error moved
           onto the weights not yet rounded, as the calibration text's inputs weigh them

The folder (format_version 3, `scratchlm.model.folder`) holds the quantized tensors and the
rest in bfloat16; every command that runs a model opens it as it is, and `export` writes its
dequantized weights. The embedding table stays bfloat16 (a lookup reads one row), so a tied head
gets a quantized copy of its own.
"""

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn

from scratchlm.compress.prune import check_calibration_size, check_out_folder, read_calibration
from scratchlm.errors import ConfigError
from scratchlm.model.quantize import GROUP_SIZES, check_int4, quantization_of, quantize_int4, quantize_int8, require_float

TARGETS = ("int8", "int4")
METHODS = ("rtn", "gptq")
REPORT = "quantize_report.json"


@dataclass
class QuantizeReport:
    to: str
    method: str
    group_size: int | None  # int4's
    layers: int  # linear layers quantized
    float_layers: list[str]  # linear layers left in bfloat16 (the int4 kernel cannot pack them)
    calibration: str | None  # gptq: where its text came from, and how much
    seconds: float
    bytes: int  # model.safetensors

    def to_dict(self) -> dict:
        return asdict(self)


def check_settings(to: str, method: str, group_size: int, calibration: str | Path | None) -> None:
    if to not in TARGETS:
        raise ConfigError(f"quantize: --to must be one of {', '.join(TARGETS)}, not {to!r}")
    if method not in METHODS:
        raise ConfigError(f"quantize: unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "gptq" and to != "int4":
        raise ConfigError("quantize: gptq writes int4; use --to int4 (int8 rounds to nearest within 0.1% of float)")
    if method == "rtn" and calibration is not None:
        raise ConfigError("quantize: round-to-nearest uses no calibration text; pass --method gptq to use it")
    if to == "int4" and group_size not in GROUP_SIZES:
        raise ConfigError(f"quantize: int4 group size must be one of {', '.join(map(str, GROUP_SIZES))}, not {group_size}")


def quantize_model(model_path: str | Path, out: str | Path, to: str = "int8", method: str = "rtn", group_size: int = 64,
                   calibration: str | Path | None = None, sequences: int = 32, length: int = 256, force: bool = False,
                   note: Callable[[str], None] | None = None) -> QuantizeReport:
    """Quantize the language model at `model_path` (anything `open_model` opens, in float) and
    write it as the model folder `out`, with quantize_report.json. GPTQ's calibration text: the
    file `calibration`, else the embedded corpus. Every check runs before anything is written."""
    from scratchlm.atomic_io import write_text_atomic
    from scratchlm.compress.gptq import quantize_int4_gptq
    from scratchlm.interop import open_model
    from scratchlm.model.folder import WEIGHTS, save_model_folder

    check_settings(to, method, group_size, calibration)
    target = check_out_folder(out, force)
    if method == "gptq":
        check_calibration_size(sequences, length)
    start = time.perf_counter()
    opened = open_model(model_path, "cpu", kind="language-model")
    model, tokenizer = opened.model, opened.tokenizer
    require_float(model, model_path, "quantizing")
    if to == "int4":
        check_int4(model, group_size)
    source = None
    if method == "gptq":
        tokens = read_calibration(tokenizer, calibration, sequences, min(length, model.config.block_size), note)
        source = f"{calibration or 'the embedded corpus'}: {tokens.shape[0]} sequences of {tokens.shape[1]} tokens"
        model = quantize_int4_gptq(model, tokens, group_size,
                                   on_block=(lambda done, total: note(f"quantized block {done}/{total}")) if note else None)
    elif to == "int4":
        model = quantize_int4(model, group_size)
    else:
        model = quantize_int8(model)
    info = quantization_of(model)
    assert info is not None
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    save_model_folder(target, model, tokenizer)
    report = QuantizeReport(to, method, group_size if to == "int4" else None, len(info["layers"]), linears, source,
                            round(time.perf_counter() - start, 1), (target / WEIGHTS).stat().st_size)
    write_text_atomic(target / REPORT, json.dumps(report.to_dict(), indent=2) + "\n")
    return report
