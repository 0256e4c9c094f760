#!/usr/bin/env python3
"""llama.cpp (llama-cpp-python) as a reference for scratchlm: GGUF load check, logit parity, decode speed.

llama-cpp-python is not a dependency: build it in a venv of its own, from its source package
(about 16 minutes on 2 cores), then run this file with that venv's Python:

    python3 -m venv /tmp/llamacpp && /tmp/llamacpp/bin/pip install numpy
    CMAKE_ARGS="-DGGML_NATIVE=ON" /tmp/llamacpp/bin/pip install --no-binary :all: llama-cpp-python
    scratchlm export SmolLM2-135M-Instruct.Q4_1.gguf --format gguf --dtype q4_0 --out smollm2-q4_0.gguf
    /tmp/llamacpp/bin/python benchmarks/llamacpp_reference.py smollm2-q4_0.gguf [FILE.gguf ...] \
        --scratchlm-python .venv/bin/python [--threads 2] [--new-tokens 32] [--repeats 3] \
        [--no-speed] [--no-parity] [--out results.json]

Run it with a Python that has llama_cpp and numpy. For each file:

- parity: llama.cpp loads it (n_ctx=512, logits_all=True), tokenizes TEXT (no BOS, no special
  parsing), evaluates those ids and keeps the logits of every position. A second process, the
  scratchlm venv's Python running this same file with --worker, opens the same file with
  scratchlm.interop.open_model (float32), encodes TEXT with its tokenizer and computes the logits
  of llama.cpp's ids with GPT.forward. Reported: whether the token ids are equal, max abs
  difference of the logits, how many positions have the same argmax. Also the greedy 32 tokens of
  the speed prompt from both, to compare.
- speed: batch 1, --threads threads, PROMPT tokenized without BOS, greedy (temp 0), exactly
  --new-tokens tokens (end-of-sequence ignored, as benchmarks/decode_speed.py does). Each run
  resets the context first, so the prompt is prefilled in every run (no prefix-cache reuse).
  One warm-up, then --repeats timed runs; median reported of:
  total_tokens_per_s = N / (time of the whole generate, prefill included),
  decode_tokens_per_s = (N - 1) / (total - time to first token),
  and llama.cpp's own perf counters (llama_perf_context): prompt eval and eval tokens/s.
Prints one JSON object.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

TEXT = "The quick brown fox jumps over the lazy dog. It was a dark and stormy night."
PROMPT = "Once upon a time"


def worker(path: str, ids: list[int], prompt_ids: list[int], new_tokens: int, out_npy: str) -> dict:
    """Runs in scratchlm's venv: tokens, logits and greedy tokens of scratchlm for `path`."""
    import numpy as np
    import torch
    from scratchlm.interop import open_model
    from scratchlm.model.sampling import SamplingConfig, generate_tokens

    torch.set_num_threads(2)
    opened = open_model(path)
    model, tok = opened.model, opened.tokenizer
    with torch.inference_mode():
        out = model(torch.tensor([ids]))
    logits = out[0] if isinstance(out, tuple) else out
    np.save(out_npy, logits[0].float().numpy())
    greedy = [step[0] for step in generate_tokens(model, prompt_ids, SamplingConfig(temperature=0.0, max_new_tokens=new_tokens))]
    return {"encode": tok.encode(TEXT), "encode_ordinary": tok.encode_ordinary(TEXT),
            "prompt_encode": tok.encode(PROMPT), "greedy": greedy, "dtype": str(logits.dtype),
            "torch": torch.__version__}


def parity(path: str, args) -> dict:
    import numpy as np
    import llama_cpp

    row: dict = {"file": path}
    try:
        llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_threads=args.threads, logits_all=True, verbose=False)
    except Exception as e:  # noqa: BLE001 - the load result is what we report
        row.update(loads=False, error=f"{type(e).__name__}: {e}")
        return row
    row["loads"] = True
    row["add_bos_default"] = llm.tokenize(b"x", add_bos=True) != llm.tokenize(b"x", add_bos=False)
    ids = llm.tokenize(TEXT.encode(), add_bos=False, special=False)
    prompt_ids = llm.tokenize(PROMPT.encode(), add_bos=False, special=False)
    llm.reset()
    llm.eval(ids)
    ours = np.array(llm.scores[: len(ids)], dtype=np.float32)
    # llama.cpp's greedy continuation of PROMPT, for comparison with scratchlm's
    llm.reset()
    greedy = []
    for t in llm.generate(prompt_ids, temp=0.0, top_k=1, reset=True):
        greedy.append(int(t))
        if len(greedy) == args.new_tokens:
            break
    del llm
    row.update(n_tokens=len(ids), llama_ids=ids)
    if args.scratchlm_python:
        npy = f"/tmp/llamacpp/_logits_{os.getpid()}.npy"
        cmd = [args.scratchlm_python, os.path.abspath(__file__), "--worker", path, "--ids", json.dumps(ids),
               "--prompt-ids", json.dumps(prompt_ids), "--new-tokens", str(args.new_tokens), "--npy", npy]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            row["scratchlm_error"] = res.stderr[-2000:]
            return row
        w = json.loads(res.stdout.strip().splitlines()[-1])
        theirs = np.load(npy)
        os.remove(npy)
        diff = np.abs(ours - theirs)
        agree = (ours.argmax(-1) == theirs.argmax(-1))
        n_agree_greedy = next((i for i, (a, b) in enumerate(zip(greedy, w["greedy"])) if a != b), min(len(greedy), len(w["greedy"])))
        row.update(
            tokens_equal_encode=w["encode"] == ids, tokens_equal_encode_ordinary=w["encode_ordinary"] == ids,
            prompt_tokens_equal=w["prompt_encode"] == prompt_ids,
            max_abs_diff=float(diff.max()), mean_abs_diff=float(diff.mean()),
            max_abs_logit=float(np.abs(theirs).max()),
            max_abs_diff_per_position=[round(float(x), 4) for x in diff.max(-1)],
            argmax_agree=f"{int(agree.sum())}/{len(ids)}",
            argmax_disagree_positions=[int(i) for i in np.nonzero(~agree)[0]],
            greedy32_leading_agreement=f"{n_agree_greedy}/{args.new_tokens}",
            llama_greedy=greedy, scratchlm_greedy=w["greedy"],
        )
        if w["encode"] != ids:
            row["scratchlm_ids"] = w["encode"]
    return row


def speed(path: str, args) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_threads=args.threads, n_threads_batch=args.threads,
                          n_batch=512, logits_all=False, verbose=False)
    prompt_ids = llm.tokenize(PROMPT.encode(), add_bos=False, special=False)
    ctx = llm._ctx.ctx

    def one() -> dict:
        llm.reset()  # n_tokens = 0: no prefix reuse, the prompt is evaluated again
        llama_cpp.llama_perf_context_reset(ctx)
        start = time.perf_counter()
        first, toks = None, []
        for t in llm.generate(prompt_ids, temp=0.0, top_k=1, reset=True):
            toks.append(int(t))
            if first is None:
                first = time.perf_counter()
            if len(toks) == args.new_tokens:
                break
        total = time.perf_counter() - start
        perf = llama_cpp.llama_perf_context(ctx)
        n = len(toks)
        return {"total_s": total, "ttft_s": first - start, "n": n,
                "total_tokens_per_s": n / total, "decode_tokens_per_s": (n - 1) / (total - (first - start)),
                "perf_prompt_eval": {"n": perf.n_p_eval, "ms": perf.t_p_eval_ms},
                "perf_eval": {"n": perf.n_eval, "ms": perf.t_eval_ms},
                "perf_eval_tokens_per_s": perf.n_eval / (perf.t_eval_ms / 1000) if perf.t_eval_ms else None,
                "perf_prompt_tokens_per_s": perf.n_p_eval / (perf.t_p_eval_ms / 1000) if perf.t_p_eval_ms else None,
                "tokens": toks}

    one()  # warm-up
    runs = [one() for _ in range(args.repeats)]
    med = lambda k: statistics.median(r[k] for r in runs)  # noqa: E731
    return {"file": path, "prompt_tokens": len(prompt_ids), "new_tokens": args.new_tokens, "threads": args.threads,
            "total_tokens_per_s_median": round(med("total_tokens_per_s"), 2),
            "decode_tokens_per_s_median": round(med("decode_tokens_per_s"), 2),
            "ttft_ms_median": round(med("ttft_s") * 1000, 1),
            "perf_eval_tokens_per_s_median": round(med("perf_eval_tokens_per_s"), 2),
            "perf_prompt_tokens_per_s_median": round(med("perf_prompt_tokens_per_s"), 2),
            "runs": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k != "tokens"} for r in runs],
            "same_tokens_every_run": all(r["tokens"] == runs[0]["tokens"] for r in runs),
            "tokens": runs[0]["tokens"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*")
    p.add_argument("--scratchlm-python", default=None, help="the scratchlm venv's python, for the parity comparison")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--no-parity", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--ids", default=None, help=argparse.SUPPRESS)
    p.add_argument("--prompt-ids", default=None, help=argparse.SUPPRESS)
    p.add_argument("--npy", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, json.loads(args.ids), json.loads(args.prompt_ids), args.new_tokens, args.npy)))
        return
    import llama_cpp
    import numpy

    report = {"llama_cpp_python": llama_cpp.__version__, "numpy": numpy.__version__,
              "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
              "system_info": llama_cpp.llama_print_system_info().decode(),
              "loadavg_start": os.getloadavg(), "text": TEXT, "prompt": PROMPT}
    if not args.no_parity:
        report["parity"] = [parity(f, args) for f in args.files]
    if not args.no_speed:
        report["loadavg_before_speed"] = os.getloadavg()
        report["speed"] = [speed(f, args) for f in args.files]
        report["loadavg_after_speed"] = os.getloadavg()
    text = json.dumps(report, indent=1)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
