"""Open each file named on standard input the way a user's command would, under a memory limit
and a per-file time limit, and print one JSON line per file saying how it ended.

Run by test_fuzz_files.py as a subprocess, so that a file that hangs the reader, exhausts
memory or kills the interpreter cannot take the test run with it; the caller names the file
after the last one reported as the culprit. Input (JSON): {"paths": [...], "opener": "gguf" or
"tokenizer", "seconds": per-file limit, "memory_bytes": allowance above the warmed-up process}.
"""

import json
import resource
import signal
import sys
import traceback
from pathlib import Path


class Timeout(BaseException):
    """Raised by the alarm; a BaseException so that no `except Exception` in the code under test
    can swallow it."""


def _on_alarm(signum, frame):
    raise Timeout


def _openers(kind: str):
    """(name, function) pairs: every way a user's command opens a file of this kind."""
    from scratchlm.interop.load import open_model
    from scratchlm.tokenizer import load_tokenizer

    if kind == "gguf":
        return [("model", open_model), ("tokenizer", load_tokenizer)]
    return [("tokenizer", load_tokenizer)]


def _virtual_memory_bytes() -> int | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:  # not Linux: no way to read it, so no limit (RLIMIT_AS is Linux's anyway)
        return None
    kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmSize:"))
    return kib * 1024


def _outcome(opener, path: str, seconds: float) -> dict:
    from scratchlm.errors import ScratchLMError

    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        opener(path)
        return {"outcome": "loaded"}
    except ScratchLMError as exc:
        return {"outcome": "refused", "type": type(exc).__name__, "message": str(exc)}
    except Timeout:
        return {"outcome": "hang", "message": f"still running after {seconds} s"}
    except BaseException as exc:  # noqa: BLE001 - anything else is the bug this script looks for
        last = traceback.extract_tb(exc.__traceback__)[-1]
        return {"outcome": "bug", "type": type(exc).__name__, "message": f"{str(exc)[:300]} at {last.filename}:{last.lineno}"}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def main() -> None:
    spec = json.load(sys.stdin)
    import torch

    torch.set_num_threads(1)  # no thread pool growing (and reserving memory) halfway through
    openers = _openers(spec["opener"])
    # Warm up on the unmutated file, so that lazily built tables and imports are not charged to
    # the first mutant, then cap the address space a fixed allowance above what that needed:
    # absolute numbers differ between CPU and CUDA builds of torch by gigabytes.
    for _, opener in openers:
        opener(spec["warmup"])
    used = _virtual_memory_bytes()
    if used is not None:
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        limit = used + int(spec["memory_bytes"])
        resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    signal.signal(signal.SIGALRM, _on_alarm)
    for path in spec["paths"]:
        result = {name: _outcome(opener, path, spec["seconds"]) for name, opener in openers}
        print(json.dumps({"path": path, **result}), flush=True)


if __name__ == "__main__":
    main()
