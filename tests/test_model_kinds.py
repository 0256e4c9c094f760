"""One model folder format for language models and classifiers: the versioned config.json
header, older folders still opening, `open_model` telling the kinds apart, and a classifier
evaluated by `scratchlm eval` and served on /v1/classify."""

import json

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file

from scratchlm.cli import main
from scratchlm.errors import InputFileError
from scratchlm.finetune.classify import finetune_classifier
from scratchlm.finetune.config import ClassifyConfig
from scratchlm.interop import detect_model, open_model
from scratchlm.model import GPT, get_preset
from scratchlm.model.classifier import SequenceClassifier, TextClassifier
from scratchlm.model.folder import FLOAT_FORMAT_VERSION, FORMAT_VERSION, load_classifier, save_model_folder
from scratchlm.serve.server import create_app
from scratchlm.tokenizer import train_bpe

TEXT = ("win a free prize now, click the link. meeting moved to friday, see the notes on asyncio. "
        "urgent: claim your cash today! can you review my pull request? ") * 30
PAIRS = [("win a free prize now, click the link", "spam"), ("urgent: claim your cash today", "spam"),
         ("meeting moved to friday", "ham"), ("can you review my pull request", "ham")]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe([TEXT], vocab_size=300, workers=1, min_frequency=1)


def tiny_gpt(tokenizer) -> GPT:
    torch.manual_seed(0)
    return GPT(get_preset("cpu-tiny").replace(vocab_size=tokenizer.vocab_size)).eval()


@pytest.fixture(scope="module")
def classifier_folder(tokenizer, tmp_path_factory):
    """A classifier trained for two steps by `finetune_classifier`, as test_classify does."""
    root = tmp_path_factory.mktemp("kinds")
    base = save_model_folder(root / "base", tiny_gpt(tokenizer), tokenizer)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in PAIRS * 4), encoding="utf-8")
    finetune_classifier(base, data, root / "spam", ClassifyConfig(max_steps=2, val_fraction=0.25, checkpoint_every=2), progress=False)
    return root / "spam"


def read_config(folder) -> dict:
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))


# ---- the header ----------------------------------------------------------------------------
def test_a_language_model_folder_has_the_versioned_header_and_opens_again(tokenizer, tmp_path):
    model = tiny_gpt(tokenizer)
    folder = save_model_folder(tmp_path / "lm", model, tokenizer)
    header = read_config(folder)
    assert (header["format"], header["format_version"], header["kind"]) == ("scratchlm-model", FLOAT_FORMAT_VERSION, "language-model")
    assert header["tokenizer"] == "tokenizer.json" and header["model"] == model.config.to_dict()
    assert "labels" not in header and header["architecture"].startswith(f"{model.config.n_layer} layers")
    opened = open_model(folder)
    assert (opened.kind, opened.format, opened.labels) == ("language-model", "scratchlm", None)
    torch.testing.assert_close(opened.model.state_dict()["embed.weight"], model.state_dict()["embed.weight"])


def test_a_classifier_folder_has_the_header_and_its_labels(classifier_folder):
    header = read_config(classifier_folder)
    assert (header["kind"], header["labels"], header["pooling"]) == ("classifier", ["ham", "spam"], "last")
    assert (classifier_folder / "model.safetensors").is_file() and not (classifier_folder / "classifier.safetensors").exists()
    opened = open_model(classifier_folder)
    assert opened.kind == "classifier" and opened.labels == ["ham", "spam"] and isinstance(opened.model, TextClassifier)
    assert detect_model(classifier_folder).kind == "classifier" and detect_model(classifier_folder.parent / "base").kind == "language-model"


def test_a_classifier_runs_checkpoint_opens_as_the_classifier_it_was(classifier_folder):
    """Step 2 is the last step: the checkpoint holds the weights the run folder was saved with."""
    checkpoint = open_model(classifier_folder / "checkpoints" / "step_000002")
    final = open_model(classifier_folder)
    assert (checkpoint.kind, checkpoint.labels, checkpoint.model.max_length) == ("classifier", final.labels, final.model.max_length)
    texts = [text for text, _ in PAIRS]
    assert checkpoint.model.probabilities(texts) == final.model.probabilities(texts)


def test_an_old_flat_config_still_opens(tokenizer, tmp_path):
    model = tiny_gpt(tokenizer)
    folder = save_model_folder(tmp_path / "old", model, tokenizer)
    (folder / "config.json").write_text(json.dumps(model.config.to_dict()), encoding="utf-8")  # before format_version 1
    loaded = open_model(folder, kind="language-model").model
    assert loaded.config == model.config
    assert open_model(folder).kind == "language-model"


def test_an_old_classifier_folder_still_opens(classifier_folder, tmp_path):
    new = read_config(classifier_folder)
    old = tmp_path / "old-clf"
    old.mkdir()
    (old / "classifier.safetensors").write_bytes((classifier_folder / "model.safetensors").read_bytes())
    (old / "tokenizer.json").write_bytes((classifier_folder / "tokenizer.json").read_bytes())
    (old / "config.json").write_text(json.dumps({"format": "scratchlm-classifier", "labels": new["labels"], "pooling": "last",
                                                 "max_length": new["max_length"], "model_config": new["model"]}))
    texts = [text for text, _ in PAIRS]
    expected = load_classifier(classifier_folder).probabilities(texts)
    opened = open_model(old)
    assert opened.kind == "classifier"
    for got, want in zip(opened.model.probabilities(texts), expected):
        assert got == pytest.approx(want, abs=1e-6)


def fused_v1_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """`model`'s weights as format_version 1 stored them: q|k|v in one attn.qkv, SwiGLU's gate|up
    in one mlp.up, a tied head under the embedding's name only."""
    state = {name: t.contiguous() for name, t in model.state_dict().items()}
    if model.config.tie_embeddings:
        del state["head.weight"]
    for i in range(model.config.n_layer):
        block = f"blocks.{i}."
        for kind in ("weight", "bias") if model.config.bias else ("weight",):
            state[f"{block}attn.qkv.{kind}"] = torch.cat([state.pop(f"{block}attn.{p}.{kind}") for p in "qkv"])
            if model.config.mlp == "swiglu":
                gate, up = state.pop(f"{block}mlp.gate.{kind}"), state.pop(f"{block}mlp.up.{kind}")
                state[f"{block}mlp.up.{kind}"] = torch.cat([gate, up])
    return state


@pytest.mark.parametrize("changes", [{}, {"n_kv_head": 2, "tie_embeddings": False},
                                     {"positions": "learned", "norm": "layernorm", "mlp": "gelu", "bias": True}],
                         ids=["llama-tied", "llama-gqa-untied", "gpt2-bias"])
def test_a_format_version_1_folder_gives_the_logits_of_the_model_it_was_made_from(changes, tokenizer, tmp_path):
    torch.manual_seed(0)
    model = GPT(get_preset("cpu-tiny").replace(vocab_size=tokenizer.vocab_size, **changes)).eval()
    folder = save_model_folder(tmp_path / "v1", model, tokenizer)
    save_file(fused_v1_tensors(model), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({**read_config(folder), "format_version": 1}))
    loaded = open_model(folder).model
    ids = torch.randint(0, tokenizer.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(ids)[0], model(ids)[0])  # the same numbers in the same matmuls
    assert (loaded.head.weight is loaded.embed.weight) == model.config.tie_embeddings


def test_a_newer_format_version_is_one_line(tokenizer, tmp_path):
    folder = save_model_folder(tmp_path / "future", tiny_gpt(tokenizer), tokenizer)
    header = read_config(folder)
    (folder / "config.json").write_text(json.dumps({**header, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(InputFileError, match=rf"config\.json: model folder format_version {FORMAT_VERSION + 1} is newer"):
        open_model(folder)


def test_a_classifier_with_the_wrong_number_of_labels_is_not_saved(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="2 outputs"):
        save_model_folder(tmp_path / "c", SequenceClassifier(tiny_gpt(tokenizer), 2), tokenizer, labels=["a", "b", "c"])
    assert not (tmp_path / "c").exists()


# ---- the kinds kept apart ----------------------------------------------------------------------
def test_a_language_model_command_refuses_a_classifier_in_one_line(classifier_folder, capsys):
    with pytest.raises(InputFileError, match=r"spam: holds a classifier, and this needs a language-model"):
        open_model(classifier_folder, kind="language-model")
    assert main(["generate", str(classifier_folder), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds a classifier" in err


# ---- eval ----------------------------------------------------------------------------------
def write_task(path, labels, rename: dict[str, str] | None = None) -> str:
    rename = rename or {}
    lines = [{"task": {"name": path.stem, "labels": labels}}] + [{"text": t, "label": rename.get(l, l)} for t, l in PAIRS]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return str(path)


def test_eval_runs_classification_tasks_on_a_classifier_and_skips_the_rest(classifier_folder, tmp_path, capsys):
    task = write_task(tmp_path / "spam-task.jsonl", ["ham", "spam"])
    out = tmp_path / "results"
    assert main(["eval", str(classifier_folder), "--tasks", f"{task},python-docs-cloze", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "python-docs-cloze" in printed and "skipped" in printed
    results = json.loads((out / "results.json").read_text())
    assert set(results["tasks"]) == {"spam-task"} and "python-docs-cloze" in results["skipped"]
    assert results["model"]["kind"] == "classifier" and results["tasks"]["spam-task"]["n"] == len(PAIRS)
    predictions = [json.loads(line) for line in (out / "predictions-spam-task.jsonl").read_text().splitlines()]
    expected = load_classifier(classifier_folder).classify([t for t, _ in PAIRS])
    assert [p["prediction"] for p in predictions] == expected
    assert results["tasks"]["spam-task"]["metrics"]["accuracy"] == sum(e == l for e, (_, l) in zip(expected, PAIRS)) / len(PAIRS)


def test_eval_says_when_label_sets_differ(classifier_folder, tmp_path, capsys):
    loose = write_task(tmp_path / "loose.jsonl", ["Ham", "spam", "promo"], {"ham": "Ham"})  # "Ham" matches ham; promo has no head output
    assert main(["eval", str(classifier_folder), "--tasks", loose, "--out", str(tmp_path / "r")]) == 0
    assert "label sets differ" in capsys.readouterr().out and "promo" in json.loads(
        (tmp_path / "r" / "results.json").read_text())["tasks"]["loose"]["note"]
    (tmp_path / "other.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n')
    assert main(["eval", str(classifier_folder), "--tasks", str(tmp_path / "other.jsonl"), "--out", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "share none with the classifier's (ham, spam)" in err


# ---- serve ---------------------------------------------------------------------------------
@pytest.fixture
def classifier_client(classifier_folder, tmp_path):
    opened = open_model(classifier_folder)
    app = create_app(opened.model, opened.tokenizer, "spam", feedback_path=tmp_path / "fb.jsonl")
    with TestClient(app) as client:
        yield client, opened.model


def test_serve_classifies_one_text_or_a_list(classifier_client):
    client, classifier = classifier_client
    texts = [t for t, _ in PAIRS]
    reply = client.post("/v1/classify", json={"model": "spam", "input": texts})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert [r["label"] for r in body["data"]] == classifier.classify(texts)
    for result, want in zip(body["data"], classifier.probabilities(texts)):
        assert set(result["probabilities"]) == {"ham", "spam"} and result["probabilities"] == pytest.approx(want, abs=1e-6)
        assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
    one = client.post("/v1/classify", json={"input": texts[0]}).json()["data"]
    assert len(one) == 1 and one[0]["label"] == body["data"][0]["label"]
    card = client.get("/v1/models").json()["data"][0]
    assert (card["id"], card["kind"], card["labels"]) == ("spam", "classifier", ["ham", "spam"])
    assert client.get("/health").json()["status"] == "ok"


def test_serve_refuses_generation_from_a_classifier_and_bad_classify_bodies(classifier_client):
    client, _ = classifier_client
    for route, body in (("/v1/chat/completions", {"model": "spam", "messages": [{"role": "user", "content": "hi"}]}),
                        ("/v1/completions", {"model": "spam", "prompt": "hi"})):
        reply = client.post(route, json=body)
        assert reply.status_code == 400 and "is a classifier" in reply.json()["error"]["message"]
    assert client.post("/v1/classify", json={"input": []}).status_code == 400
    assert client.post("/v1/classify", json={"input": ["x"] * 33}).status_code == 400
    assert client.post("/v1/classify", json={"model": "other", "input": "x"}).status_code == 404


def test_serve_refuses_classify_on_a_language_model(tokenizer, tmp_path):
    app = create_app(tiny_gpt(tokenizer), tokenizer, "lm", feedback_path=tmp_path / "fb.jsonl")
    with TestClient(app) as client:
        reply = client.post("/v1/classify", json={"input": "hi"})
    assert reply.status_code == 400 and "needs a classifier" in reply.json()["error"]["message"]
