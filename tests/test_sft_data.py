import json

import pytest
import torch
import torch.nn.functional as F

from scratchlm.errors import ConfigError, InputFileError
from scratchlm.finetune.sft_data import (
    IGNORE,
    EncodedExample,
    encode_conversation,
    encode_conversations,
    load_instructions,
    pack_examples,
    pad_batch,
    stack_rows,
)
from scratchlm.model import GPT, get_preset
from scratchlm.model.model import document_mask
from scratchlm.tokenizer import train_bpe

TRAIN_TEXT = (
    "You are a helpful assistant. What is the capital of France? The capital of France is Paris.\n"
    "How many legs has a spider? A spider has eight legs. Thanks! You are welcome.\n"
) * 20
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
USER = {"role": "user", "content": "What is the capital of France?"}
ANSWER = {"role": "assistant", "content": "The capital of France is Paris."}
USER2 = {"role": "user", "content": "How many legs has a spider?"}
ANSWER2 = {"role": "assistant", "content": "A spider has eight legs."}


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe([TRAIN_TEXT], vocab_size=300, workers=1, min_frequency=1)


def trained_ids(example: EncodedExample) -> list[int]:
    return [label for label in example.labels if label != IGNORE]


def write_jsonl(tmp_path, lines: list[str]):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ---- the loss mask ---------------------------------------------------------------------


def test_mask_covers_exactly_the_answer_and_its_im_end(tokenizer):
    example = encode_conversation(tokenizer, [SYSTEM, USER, ANSWER], block_size=256)
    im_end = tokenizer.special_tokens["<|im_end|>"]
    assert trained_ids(example) == tokenizer.encode(ANSWER["content"]) + [im_end]
    # The trained tokens are one contiguous run, and the text before it is system + user + template.
    positions = [i for i, label in enumerate(example.labels) if label != IGNORE]
    assert positions == list(range(positions[0], positions[-1] + 1))
    before = tokenizer.decode(example.tokens[: positions[0]])
    assert before.endswith("<|im_start|>assistant\n")
    assert SYSTEM["content"] in before and USER["content"] in before
    assert tokenizer.decode(example.tokens[positions[-1] + 1 :]) == "\n"


def test_two_turn_conversation_labels_both_answers_and_no_user_text(tokenizer):
    example = encode_conversation(tokenizer, [USER, ANSWER, USER2, ANSWER2], block_size=256)
    im_end = tokenizer.special_tokens["<|im_end|>"]
    expected = tokenizer.encode(ANSWER["content"]) + [im_end] + tokenizer.encode(ANSWER2["content"]) + [im_end]
    assert trained_ids(example) == expected
    runs = tokenizer.decode(trained_ids(example)).split("<|im_end|>")
    assert runs == [ANSWER["content"], ANSWER2["content"], ""]


def test_targets_are_the_next_tokens_labels_as_gpt_forward_expects(tokenizer):
    example = encode_conversation(tokenizer, [USER, ANSWER], block_size=256)
    assert example.input_ids == example.tokens[:-1]
    assert example.targets == example.labels[1:]
    # The position that reads "assistant\n" must predict the answer's first token.
    first = next(i for i, t in enumerate(example.targets) if t != IGNORE)
    assert example.targets[first] == tokenizer.encode(ANSWER["content"])[0]
    assert tokenizer.decode(example.input_ids[: first + 1]).endswith("assistant\n")
    # And the loss GPT.forward computes is cross-entropy on exactly those positions.
    torch.manual_seed(0)
    model = GPT(get_preset("cpu-tiny").replace(vocab_size=tokenizer.vocab_size)).eval()
    idx, targets = pad_batch([example], pad_id=0)
    logits, loss = model(idx, targets)
    keep = targets[0] != IGNORE
    assert torch.allclose(loss, F.cross_entropy(logits[0][keep], targets[0][keep]))


def test_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    tokenizer = train_bpe([TRAIN_TEXT], vocab_size=300, workers=1, min_frequency=1)
    # Counts the messages in the header: a shorter conversation is not a prefix of a longer one.
    tokenizer.metadata["chat_template"] = (
        "{{ messages|length }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(ConfigError, match="prefix"):
        encode_conversation(tokenizer, [USER, ANSWER], block_size=256)


def test_template_without_end_of_turn_token_is_refused(tokenizer):
    tokenizer = train_bpe([TRAIN_TEXT], vocab_size=300, workers=1, min_frequency=1)
    tokenizer.metadata["chat_template"] = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ConfigError, match="learn to stop"):
        encode_conversation(tokenizer, [USER, ANSWER], block_size=256)


def test_train_on_last_labels_only_the_last_answer(tokenizer):
    messages = [USER, ANSWER, USER2, ANSWER2]
    every = encode_conversation(tokenizer, messages, block_size=256)
    last = encode_conversation(tokenizer, messages, block_size=256, train_on="last")
    im_end = tokenizer.special_tokens["<|im_end|>"]
    assert last.tokens == every.tokens
    assert trained_ids(last) == tokenizer.encode(ANSWER2["content"]) + [im_end]
    with pytest.raises(ConfigError, match="train_on"):
        encode_conversation(tokenizer, messages, block_size=256, train_on="first")


def test_special_token_text_in_an_answer_is_trained_as_text(tokenizer):
    # At inference the model generates ids, never the string "<|im_end|>"'s special token; an
    # answer quoting it must not teach the model to end its turn there.
    quoting = {"role": "assistant", "content": "Write <|im_end|> to end a turn."}
    example = encode_conversation(tokenizer, [USER, quoting], block_size=256)
    im_end = tokenizer.special_tokens["<|im_end|>"]
    assert trained_ids(example) == tokenizer.encode_ordinary(quoting["content"]) + [im_end]
    assert trained_ids(example).count(im_end) == 1


def test_model_without_chat_template_trains_on_plain_prompt_and_answer():
    plain = train_bpe([TRAIN_TEXT], vocab_size=300, workers=1, min_frequency=1, special_tokens=("<|endoftext|>",))
    example = encode_conversation(plain, [USER, ANSWER], block_size=256)
    prompt = plain.encode_ordinary(USER["content"])
    assert example.tokens == prompt + plain.encode_ordinary(ANSWER["content"]) + [plain.eos_id]
    assert example.labels == [IGNORE] * len(prompt) + example.tokens[len(prompt) :]
    with pytest.raises(ConfigError, match="single user message"):
        encode_conversation(plain, [SYSTEM, USER, ANSWER], block_size=256)


# ---- too long ----------------------------------------------------------------------------


def test_too_long_examples_are_dropped_or_truncated_and_counted(tokenizer):
    short, long = [USER, ANSWER], [USER, {"role": "assistant", "content": "A spider has eight legs. " * 20}]
    whole = encode_conversation(tokenizer, long, block_size=10_000)
    block = len(whole.input_ids) - 5
    assert encode_conversation(tokenizer, long, block_size=block, truncate="drop") is None
    cut = encode_conversation(tokenizer, long, block_size=block, truncate="left")
    assert cut.truncated and len(cut.input_ids) == block
    # Cut from the start: the answer and its <|im_end|> are all still there.
    assert cut.tokens == whole.tokens[-(block + 1) :] and cut.labels == whole.labels[-(block + 1) :]
    assert trained_ids(cut) == trained_ids(whole)

    examples, stats = encode_conversations(tokenizer, [short, long, short], block_size=block, truncate="drop")
    assert (len(examples), stats.kept, stats.truncated, stats.dropped) == (2, 2, 0, 1)
    examples, stats = encode_conversations(tokenizer, [short, long, short], block_size=block, truncate="left")
    assert (len(examples), stats.kept, stats.truncated, stats.dropped) == (3, 2, 1, 0)


def test_left_truncation_never_cuts_into_the_last_answer(tokenizer):
    messages = [SYSTEM, USER, ANSWER, USER2, ANSWER2]
    whole = encode_conversation(tokenizer, messages, block_size=256)
    last_answer = tokenizer.encode(ANSWER2["content"]) + [tokenizer.special_tokens["<|im_end|>"]]
    start = len(whole.labels) - 1 - whole.labels[::-1].index(last_answer[0])  # the last answer's first token
    assert whole.labels[start : start + len(last_answer)] == last_answer
    # The smallest context that keeps it: from the token before it (which must predict it) to the end.
    smallest = len(whole.tokens) - start
    cut = encode_conversation(tokenizer, messages, block_size=smallest, truncate="left")
    assert cut.tokens == whole.tokens[start - 1 :]
    assert [t for t in cut.targets if t != IGNORE] == last_answer
    assert encode_conversation(tokenizer, messages, block_size=smallest - 1, truncate="left") is None


def test_unknown_truncate_mode_is_a_config_error(tokenizer):
    with pytest.raises(ConfigError, match="truncate"):
        encode_conversation(tokenizer, [USER, ANSWER], block_size=64, truncate="right")


# ---- JSONL shapes and bad records --------------------------------------------------------


def test_each_jsonl_shape_becomes_a_conversation(tmp_path):
    path = write_jsonl(
        tmp_path,
        [
            json.dumps({"instruction": "Translate.", "input": "bonjour", "output": "hello"}),
            json.dumps({"instruction": "Say hi.", "output": "hi"}),
            json.dumps({"messages": [SYSTEM, USER, ANSWER]}),
            json.dumps({"prompt": "2+2?", "completion": "4"}),
            json.dumps({"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}),
        ],
    )
    conversations, report = load_instructions(path)
    assert report.kept == [1, 2, 3, 4, 5] and report.rejected == []
    assert conversations == [
        [{"role": "user", "content": "Translate.\n\nbonjour"}, {"role": "assistant", "content": "hello"}],
        [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}],
        [SYSTEM, USER, ANSWER],
        [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
    ]


def test_malformed_lines_are_counted_with_their_line_numbers(tmp_path):
    good = json.dumps({"prompt": "2+2?", "completion": "4"})
    path = write_jsonl(
        tmp_path,
        [
            good,  # 1
            "{not json",  # 2
            json.dumps({"instruction": "Say hi."}),  # 3: missing output
            json.dumps({"messages": [{"role": "robot", "content": "beep"}, ANSWER]}),  # 4: wrong role
            json.dumps({"prompt": "2+2?", "completion": "  "}),  # 5: empty answer
            "",  # 6: blank, ignored
            json.dumps({"messages": [USER, ANSWER, USER2]}),  # 7: ends with the user
            json.dumps({"text": "plain"}),  # 8: unknown shape
            json.dumps([1, 2]),  # 9: not an object
            json.dumps({"messages": [SYSTEM, ANSWER]}),  # 10: no user before the answer
            good,  # 11
        ],
    )
    conversations, report = load_instructions(path)
    assert report.kept == [1, 11] and len(conversations) == 2
    lines = [line for line, _ in report.rejected]
    assert lines == [2, 3, 4, 5, 7, 8, 9, 10]
    reasons = dict(report.rejected)
    assert "not JSON" in reasons[2]
    assert "'output'" in reasons[3]
    assert "'robot'" in reasons[4]
    assert "empty answer" in reasons[5]
    assert "last message" in reasons[7]
    assert "no known shape" in reasons[8]
    assert "not a JSON object" in reasons[9]
    assert "before any user" in reasons[10]
    assert f"{path}:3:" in report.summary()


def test_invalid_utf8_line_is_rejected_not_raised(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff", "completion": "b"}\n')
    _, report = load_instructions(path)
    assert report.kept == [1] and report.rejected == [(2, "not UTF-8 text")]


def test_file_without_usable_records_or_missing_raises_input_file_error(tmp_path):
    with pytest.raises(InputFileError, match="no usable conversations.*:1: not JSON"):
        load_instructions(write_jsonl(tmp_path, ["{bad"]))
    with pytest.raises(InputFileError, match="cannot read"):
        load_instructions(tmp_path / "absent.jsonl")


# ---- padding, packing, document mask ---------------------------------------------------


def example_of(tokens: list[int], trained_from: int) -> EncodedExample:
    return EncodedExample(tokens, [IGNORE] * trained_from + tokens[trained_from:])


def test_pad_batch_pads_right_with_ignored_targets():
    a, b = example_of([1, 2, 3, 4, 5], 3), example_of([6, 7, 8], 1)
    idx, targets = pad_batch([a, b], pad_id=0)
    assert idx.shape == targets.shape == (2, 4) and idx.dtype == torch.long
    assert idx.tolist() == [[1, 2, 3, 4], [6, 7, 0, 0]]
    assert targets.tolist() == [[IGNORE, IGNORE, 4, 5], [7, 8, IGNORE, IGNORE]]


def test_pack_examples_fills_rows_and_keeps_targets_inside_each_document():
    examples = [example_of([1, 2, 3, 4], 2), example_of([5, 6, 7], 0), example_of([8, 9, 10, 11, 12], 1), example_of([13, 14], 0)]
    rows = pack_examples(examples, block_size=6)
    assert all(len(r.input_ids) == len(r.targets) == len(r.doc_ids) == 6 for r in rows)
    assert [r.input_ids for r in rows] == [[1, 2, 3, 5, 6, 0], [8, 9, 10, 11, 13, 0]]
    assert [r.doc_ids for r in rows] == [[0, 0, 0, 1, 1, -1], [0, 0, 0, 0, 1, -1]]
    assert [r.targets for r in rows] == [[IGNORE, 3, 4, 6, 7, IGNORE], [9, 10, 11, 12, 14, IGNORE]]
    # No target crosses a boundary: the last position of a document predicts its own last token.
    for row in rows:
        for t in range(5):
            if row.doc_ids[t] != row.doc_ids[t + 1] and row.targets[t] != IGNORE:
                assert row.targets[t] != row.input_ids[t + 1]
    idx, targets, docs = stack_rows(rows)
    assert idx.shape == targets.shape == docs.shape == (2, 6)


def test_packed_chat_examples_end_each_document_with_an_ignored_target(tokenizer):
    examples, _ = encode_conversations(tokenizer, [[USER, ANSWER], [USER2, ANSWER2]] * 3, block_size=64)
    rows = pack_examples(examples, block_size=64)
    assert sum(len(e.input_ids) for e in examples) == sum(d >= 0 for r in rows for d in r.doc_ids)
    for row in rows:
        for t in range(63):
            if row.doc_ids[t] != row.doc_ids[t + 1]:
                assert row.targets[t] == IGNORE  # after <|im_end|> comes only the template's newline


def test_pack_rejects_an_example_longer_than_the_row():
    with pytest.raises(ConfigError, match="does not fit"):
        pack_examples([example_of(list(range(10)), 0)], block_size=4)


def test_document_mask_is_causal_and_blocks_cross_document_attention():
    docs = torch.tensor([[0, 0, 1, 1, 1, -1], [0, 0, 0, 0, 0, 0]])
    mask = document_mask(docs)
    assert mask.shape == (2, 1, 6, 6) and mask.dtype == torch.bool
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [0, 0, 1, 0, 0, 0],
            [0, 0, 1, 1, 0, 0],
            [0, 0, 1, 1, 1, 0],
            [0, 0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask[0, 0], expected)
    assert torch.equal(mask[1, 0], torch.ones(6, 6, dtype=torch.bool).tril())


def test_document_mask_makes_packed_attention_equal_separate_attention():
    # What the mask is for: attention over a packed row gives each document the outputs it
    # would get alone.
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 7, 8) for _ in range(3))
    docs = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])
    packed = F.scaled_dot_product_attention(q, k, v, attn_mask=document_mask(docs))
    first = F.scaled_dot_product_attention(q[:, :, :3], k[:, :, :3], v[:, :, :3], is_causal=True)
    second = F.scaled_dot_product_attention(q[:, :, 3:], k[:, :, 3:], v[:, :, 3:], is_causal=True)
    assert torch.allclose(packed, torch.cat([first, second], dim=2), atol=1e-6)


# ---- a real model's template -------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_template_mask_decodes_to_the_answer_and_im_end(smollm2):
    _, tokenizer = smollm2
    for messages in ([USER, ANSWER], [SYSTEM, USER, ANSWER, USER2, ANSWER2]):
        example = encode_conversation(tokenizer, messages, block_size=512)
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        assert tokenizer.decode(trained_ids(example)) == "".join(a + "<|im_end|>" for a in answers)
        # Without a system message SmolLM2's template adds its default one; none of it is trained on.
        default_system = messages[0]["role"] != "system"
        assert ("SmolLM" in tokenizer.decode(example.tokens)) == default_system
        assert "SmolLM" not in tokenizer.decode(trained_ids(example))
