"""int4 round-to-nearest against GPTQ on a model trained in float32, by bits per byte on held-out text.

    python benchmarks/int4_study/study.py MODEL HELD_OUT.txt CALIBRATION.txt [--chars 100000] [--groups 32 64 128]
                    [--calib-sequences 32] [--calib-length 256] [--json results.json]

MODEL is anything `scratchlm.interop.open_model` opens (a run folder, a model folder, a checkpoint).
Every mode starts from a fresh copy of the model, opened again from disk, and is scored on the same
text (the first --chars characters of HELD_OUT.txt) with `evaluate_text`, the function
`scratchlm eval --text` calls (rolling windows of the model's context, stride half of it, batch 16):

    float32, bfloat16 (prepare_for_inference), int8 (quantize_int8, per-row absmax),
    int4 round-to-nearest (quantize_int4) and int4 GPTQ (quantize_int4_gptq) per group size.

GPTQ is calibrated on CALIBRATION.txt: `calibration_tokens(encode_ordinary(text), sequences,
length)`, windows cut one after another from its start, as `scratchlm prune` does. The "seconds
to quantize" column times only the quantization call (not opening or scoring). Prints a JSON object
and a markdown table.
"""

import argparse
import json
import platform
import time

import numpy as np
import torch

from scratchlm.compress.gptq import quantize_int4_gptq
from scratchlm.compress.prune import calibration_tokens
from scratchlm.eval.language_modeling import evaluate_text
from scratchlm.eval.scoring import rolling_token_nats
from scratchlm.tokenizer.tokens import document_start
from scratchlm.interop import open_model
from scratchlm.model.quantize import prepare_for_inference, quantize_int4, quantize_int8
from scratchlm.text.reading import read_text


def read_utf8(path: str) -> str:
    text, undecodable = read_text(path)
    if undecodable:  # scratchlm eval refuses such a file too: replaced bytes change the byte count
        raise SystemExit(f"{path}: {undecodable} bytes are not UTF-8; convert it first (prep_data.py)")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("held_out")
    parser.add_argument("calibration")
    parser.add_argument("--chars", type=int, default=100_000)
    parser.add_argument("--groups", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--calib-sequences", type=int, default=32)
    parser.add_argument("--calib-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block-tokens", type=int, default=1000, help="block size of the paired standard error")
    parser.add_argument("--json", help="also write the JSON here")
    args = parser.parse_args()

    text = read_utf8(args.held_out)[: args.chars]
    first = open_model(args.model, kind="language-model")
    tokenizer, config = first.tokenizer, first.model.config
    parameters = sum(p.numel() for p in first.model.parameters())
    calibration = calibration_tokens(tokenizer.encode_ordinary(read_utf8(args.calibration)),
                                     args.calib_sequences, args.calib_length)
    ids = tokenizer.encode_ordinary(text)
    token_nats: dict[str, np.ndarray] = {}
    del first

    modes = [("float32", lambda m: m), ("bfloat16", lambda m: prepare_for_inference(m, "bfloat16")),
             ("int8 (per-row)", quantize_int8)]
    for group in args.groups:
        modes.append((f"int4 RTN g{group}", lambda m, g=group: quantize_int4(m, g)))
        modes.append((f"int4 GPTQ g{group}", lambda m, g=group: quantize_int4_gptq(m, calibration, g)))

    rows = []
    for name, quantize in modes:
        model = open_model(args.model, kind="language-model").model  # a fresh float32 copy
        started = time.perf_counter()
        model = quantize(model)
        quantize_s = time.perf_counter() - started
        started = time.perf_counter()
        with torch.inference_mode():
            score = evaluate_text(model, tokenizer, text, batch_size=args.batch_size)
            # The per-token nats evaluate_text sums (same windows), kept for paired comparisons.
            nats = rolling_token_nats(model, document_start(tokenizer) + ids, batch_size=args.batch_size)
        assert abs(nats.sum() - score.nats) < 1e-6 * score.nats, (nats.sum(), score.nats)
        token_nats[name] = nats
        rows.append({"mode": name, "bits_per_byte": score.bits_per_byte, "quantize_s": quantize_s,
                     "score_s": time.perf_counter() - started, "tokens": score.tokens, "bytes": score.bytes,
                     "nats": score.nats})
        print(f"{name:<18} {score.bits_per_byte:.4f} bits/byte  quantize {quantize_s:.1f}s", flush=True)
        del model
    base = rows[0]["bits_per_byte"]
    for row in rows:
        row["vs_float32_pct"] = 100 * (row["bits_per_byte"] / base - 1)

    # Paired uncertainty of "RTN minus GPTQ": the text cut into blocks of --block-tokens scored
    # tokens; the standard error of the summed difference is sqrt(blocks) x the std of block sums.
    comparisons = {}
    nbytes = rows[0]["bytes"]
    for group in args.groups:
        diff = token_nats[f"int4 RTN g{group}"] - token_nats[f"int4 GPTQ g{group}"]
        blocks = diff[: len(diff) // args.block_tokens * args.block_tokens].reshape(-1, args.block_tokens).sum(1)
        se = blocks.std(ddof=1) * np.sqrt(len(blocks)) / np.log(2) / nbytes
        comparisons[f"g{group}"] = {"rtn_minus_gptq_bpb": float(diff.sum() / np.log(2) / nbytes),
                                    "standard_error_bpb": float(se), "blocks": len(blocks),
                                    "gptq_better_blocks": int((blocks > 0).sum()),
                                    "tokens_gptq_better": int((diff > 0).sum()), "tokens_rtn_better": int((diff < 0).sum())}
    result = {
        "model": args.model, "parameters": parameters, "config": config.to_dict(),
        "held_out": args.held_out, "chars": len(text), "calibration": args.calibration,
        "calibration_shape": list(calibration.shape), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "machine": platform.machine(), "rows": rows,
        "gptq_vs_rtn": comparisons,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    print()
    print("| mode | bits per byte | vs float32 | seconds to quantize |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        seconds = "-" if row["mode"] == "float32" else f"{row['quantize_s']:.1f}"
        print(f"| {row['mode']} | {row['bits_per_byte']:.4f} | {row['vs_float32_pct']:+.2f}% | {seconds} |")
    by_mode = {row["mode"]: row["bits_per_byte"] for row in rows}
    print()
    for group in args.groups:
        rtn, gptq = by_mode[f"int4 RTN g{group}"], by_mode[f"int4 GPTQ g{group}"]
        share = (rtn - gptq) / (rtn - base) * 100 if rtn != base else float("nan")
        c = comparisons[f"g{group}"]
        print(f"g{group}: RTN {rtn:.4f}, GPTQ {gptq:.4f}: GPTQ {'beats' if gptq < rtn else 'does not beat'} RTN "
              f"by {rtn - gptq:+.4f} +- {c['standard_error_bpb']:.4f} (paired SE) bits per byte "
              f"({share:.0f}% of RTN's loss recovered; GPTQ better on {c['gptq_better_blocks']}/{c['blocks']} blocks "
              f"of {args.block_tokens} tokens)")


if __name__ == "__main__":
    main()
