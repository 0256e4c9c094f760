"""The lm-evaluation-harness adapter, offline: local task YAMLs over small JSONL files, a tiny
random model, and the expected metric computed here with our own scoring. A random model is
enough: the harness must report exactly what our primitives give, whatever the model knows."""

import json
import math
import os
import sys

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model

from scratchlm.errors import ConfigError, ContextTooLongError, ScratchLMError
from scratchlm.eval import harness
from scratchlm.eval.harness import generation_config, run_harness
from scratchlm.eval.language_modeling import evaluate_text
from scratchlm.eval.scoring import greedy_generate, score_continuations, split_context
from scratchlm.tokenizer.tokens import document_start
from scratchlm.model import GPT, get_preset
from scratchlm.model.folder import save_model_folder
from scratchlm.tokenizer import train_bpe

TEXT = (
    "The quick brown fox jumps over the lazy dog. A café in the old town serves crème brûlée.\n"
    "Seven cats sat on a warm mat; two birds sang in the tall green tree near the river.\n"
) * 15
BLOCK = 48


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe([TEXT], vocab_size=320, workers=1, min_frequency=1)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return GPT(get_preset("cpu-tiny").replace(vocab_size=tokenizer.vocab_size, block_size=BLOCK)).eval()


@pytest.fixture(scope="module")
def lm(model, tokenizer):
    return harness.ScratchLMEval(model=model, tokenizer=tokenizer, batch_size=4, progress=False)


def write_task(folder, name: str, docs: list[dict], body: str) -> None:
    """A task YAML reading `docs` from a JSONL file beside it, through the `json` dataset builder
    (no hub access; the cache stays inside the test's folder)."""
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        f"  cache_dir: {folder / 'hf_cache'}\ntest_split: test\n" + body
    )


def ll(context: str, continuation: str) -> Instance:
    return Instance(request_type="loglikelihood", doc={}, arguments=(context, continuation), idx=0)


# ---- the adapter's three request types ---------------------------------------------------------
def test_adapter_is_registered_under_scratchlm_and_builds_from_a_model_folder(model, tokenizer, lm, tmp_path):
    assert get_model("scratchlm") is harness.ScratchLMEval
    save_model_folder(tmp_path / "model", model, tokenizer)
    from_args = get_model("scratchlm").create_from_arg_string(f"pretrained={tmp_path / 'model'},progress=false", {"batch_size": 2})
    requests = [ll("The quick brown", " fox"), ll("Seven cats", " sat on a warm mat")]
    for a, b in zip(from_args.loglikelihood(requests), lm.loglikelihood(requests)):
        assert a[0] == pytest.approx(b[0], abs=1e-5) and a[1] == b[1]


def test_loglikelihood_routes_through_split_context_and_score_continuations(model, tokenizer, lm):
    pairs = [("The quick brown ", "fox"), ("", "Seven cats"), ("A café in the old", " town serves")]
    got = lm.loglikelihood([ll(c, x) for c, x in pairs])
    expected = score_continuations(model, [split_context(tokenizer, c, x, document_start(tokenizer)) for c, x in pairs])
    assert [g[1] for g in got] == [e.greedy for e in expected]
    np.testing.assert_allclose([g[0] for g in got], [e.logprob for e in expected], atol=1e-5)
    assert all(g[0] < 0 for g in got)


def test_loglikelihood_rolling_scores_every_token_of_the_document(model, tokenizer, lm):
    text = TEXT[:400]  # longer than the context: several windows
    (got,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    expected = evaluate_text(model, tokenizer, text, stride=BLOCK)
    assert got == pytest.approx(-expected.nats, rel=1e-9)
    assert expected.tokens == len(tokenizer.encode_ordinary(text))


def test_generate_until_is_greedy_and_honours_until_and_max_gen_toks(model, tokenizer, lm):
    prompts = ["The quick brown", "Seven cats"]
    free = lm.generate_until([Instance("generate_until", {}, (p, {"max_gen_toks": 10}), 0) for p in prompts])
    assert free == greedy_generate(model, tokenizer, prompts, max_new_tokens=10)
    stop = free[0][3:5]
    (cut,) = lm.generate_until([Instance("generate_until", {}, (prompts[0], {"until": [stop], "max_gen_toks": 10, "do_sample": False}), 0)])
    assert cut == free[0][: free[0].index(stop)]


def test_sampled_generation_is_reproducible_and_unsupported_settings_are_refused(lm):
    sampled = [Instance("generate_until", {}, ("The quick", {"do_sample": True, "temperature": 1.0, "max_gen_toks": 8}), 0)] * 2
    first = lm.generate_until(sampled)
    assert first == lm.generate_until(sampled)  # a fixed base seed
    with pytest.raises(ConfigError, match="num_beams"):
        lm.generate_until([Instance("generate_until", {}, ("x", {"num_beams": 4}), 0)])


def test_generation_kwargs_are_normalised_as_lm_eval_does():
    config = generation_config({"until": "\n\n", "max_new_tokens": 5})
    assert config.temperature == 0 and config.max_new_tokens == 5 and config.stop == ("\n\n",)
    sampled = generation_config({"do_sample": True, "temperature": 0.7, "top_p": 0.9, "min_p": 0.05, "seed": 3})
    assert (sampled.temperature, sampled.top_p, sampled.min_p, sampled.seed, sampled.max_new_tokens) == (0.7, 0.9, 0.05, 3, 256)
    assert generation_config({"do_sample": False, "temperature": 0.7}).temperature == 0


def test_context_too_long_is_an_error_unless_truncate(model, tokenizer):
    long_context = TEXT[:600]
    strict = harness.ScratchLMEval(model=model, tokenizer=tokenizer, progress=False)
    with pytest.raises(ContextTooLongError, match="pass --truncate"):
        strict.loglikelihood([ll(long_context, " fox")])
    lenient = harness.ScratchLMEval(model=model, tokenizer=tokenizer, truncate=True, progress=False)
    ((logprob, _),) = lenient.loglikelihood([ll(long_context, " fox")])
    assert math.isfinite(logprob) and logprob < 0


def test_constructor_needs_a_source_or_a_model_and_tokenizer(model):
    with pytest.raises(ConfigError, match="either pretrained"):
        harness.ScratchLMEval(model=model)
    with pytest.raises(ConfigError, match="either pretrained"):
        harness.ScratchLMEval()


# ---- whole tasks through lm_eval.simple_evaluate ----------------------------------------------------
def test_multiple_choice_accuracy_equals_our_own_scoring(model, tokenizer, tmp_path):
    questions = ["The quick brown", "A café in the", "Seven cats sat on", "two birds sang in", "The lazy", "near the", "crème", "warm"]
    choices = [["fox jumps", "dog", "old town"], ["old town", "river", "mat"], ["a warm mat", "the tree", "fox"],
               ["the tall tree", "a café", "dog"], ["dog", "cat sat", "birds"], ["river", "town", "quick fox"],
               ["brûlée", "green", "sang"], ["mat", "tree", "café"]]
    prefix = document_start(tokenizer)
    docs, correct, correct_norm = [], [], []
    for n, (question, options) in enumerate(zip(questions, choices)):
        # lm-eval's request: context = the question, continuation = " " + choice (target_delimiter).
        scores = score_continuations(model, [split_context(tokenizer, question, " " + c, prefix) for c in options])
        lls = np.array([s.logprob for s in scores])
        best = int(lls.argmax())
        answer = best if n % 2 == 0 else (best + 1) % 3  # half right, whatever the random model prefers
        docs.append({"question": question, "choices": options, "answer": answer})
        correct.append(best == answer)
        correct_norm.append(int(np.argmax(lls / np.array([len(c) for c in options]))) == answer)
    write_task(tmp_path, "tiny_mc", docs, "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
               "doc_to_choice: choices\ndoc_to_target: answer\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    results = run_harness((model, tokenizer), ["tiny_mc"], include_path=tmp_path, batch_size=5, bootstrap_iters=0)
    metrics = results["results"]["tiny_mc"]
    assert metrics["acc,none"] == pytest.approx(np.mean(correct)) == pytest.approx(0.5)
    assert metrics["acc_norm,none"] == pytest.approx(np.mean(correct_norm))
    json.dumps(results)  # the results dict is JSON-ready


def test_generation_task_exact_match_equals_our_greedy_completions(model, tokenizer, tmp_path):
    prompts = ["The quick brown", "Seven cats", "A café", "two birds"]
    completions = greedy_generate(model, tokenizer, prompts, max_new_tokens=6, stop=["\n"])
    targets = [c if n % 2 == 0 else c + "#" for n, c in enumerate(completions)]
    docs = [{"prompt": p, "target": t} for p, t in zip(prompts, targets)]
    write_task(tmp_path, "tiny_gen", docs, "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: target\n"
               "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 6\n  do_sample: false\n"
               "metric_list:\n  - metric: exact_match\n")
    results = run_harness((model, tokenizer), ["tiny_gen"], include_path=tmp_path, bootstrap_iters=0)
    assert results["results"]["tiny_gen"]["exact_match,none"] == pytest.approx(0.5)


def test_perplexity_task_bits_per_byte_equal_our_language_model_score(model, tokenizer, tmp_path):
    texts = [TEXT[:150], TEXT[100:420], TEXT[50:90]]
    write_task(tmp_path, "tiny_ppl", [{"text": t} for t in texts], "output_type: loglikelihood_rolling\ndoc_to_text: ''\n"
               "doc_to_target: '{{text}}'\nmetric_list:\n  - metric: bits_per_byte\n  - metric: byte_perplexity\n"
               "  - metric: word_perplexity\n")
    results = run_harness((model, tokenizer), ["tiny_ppl"], include_path=tmp_path, limit=3, bootstrap_iters=0)
    metrics = results["results"]["tiny_ppl"]
    scores = [evaluate_text(model, tokenizer, t, stride=BLOCK) for t in texts]
    bpb = sum(s.nats for s in scores) / math.log(2) / sum(s.bytes for s in scores)
    assert metrics["bits_per_byte,none"] == pytest.approx(bpb, rel=1e-6)
    assert metrics["byte_perplexity,none"] == pytest.approx(2**bpb, rel=1e-6)
    assert results["n-samples"]["tiny_ppl"]["effective"] == 3


@pytest.mark.slow  # indexes lm-eval's ~14,000 built-in task files
def test_unknown_task_names_are_a_one_line_error_with_a_hint(model, tokenizer, tmp_path):
    with pytest.raises(ScratchLMError, match=r"unknown lm-eval task 'hellaswagg' \(did you mean 'hellaswag'.*lm-eval ls tasks"):
        run_harness((model, tokenizer), ["hellaswagg"], include_path=tmp_path)


def test_without_lm_eval_the_harness_says_how_to_install_it(model, tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now fails as if not installed
    with pytest.raises(ScratchLMError, match="pip install lm_eval"):
        run_harness((model, tokenizer), ["anything"])


@pytest.mark.slow  # a fresh interpreter importing torch
def test_scratchlm_imports_without_lm_eval():
    import subprocess

    code = (
        "import sys; sys.modules['lm_eval'] = None\n"
        "import scratchlm, scratchlm.eval.scoring, scratchlm.eval.language_modeling, scratchlm.eval.harness\n"
        "try:\n    scratchlm.eval.harness.ScratchLMEval\nexcept scratchlm.errors.ScratchLMError as e:\n    print(e)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "pip install lm_eval" in result.stdout


# ---- a real model ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_loglikelihood_of_a_likely_continuation_is_finite_and_negative(smollm2):
    model, tokenizer = smollm2
    lm = harness.ScratchLMEval(model=model, tokenizer=tokenizer, progress=False)
    (right, wrong) = lm.loglikelihood([ll("The capital of France is", " Paris"), ll("The capital of France is", " banana")])
    assert math.isfinite(right[0]) and right[0] < 0
    assert right[0] > wrong[0]
