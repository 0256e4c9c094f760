import copy
import json
import math

import pytest
import torch

from scratchlm.errors import ConfigError, InputFileError
from scratchlm.finetune.dpo import (
    IGNORE,
    PreferenceExample,
    collate_preferences,
    dpo_loss,
    encode_preference,
    load_preferences,
    preference_logprobs,
    sequence_logprobs,
)
from scratchlm.finetune.sft_data import encode_conversation
from scratchlm.model import GPT, get_preset
from scratchlm.serve.web import FeedbackRequest, PreferenceRecord
from scratchlm.tokenizer import train_bpe

TEXT = (
    "The cat sat on the mat. Which animal sat on the mat? The cat did. A dog ran in the park.\n"
    "What colour is the sky? The sky is blue. Grass is green and the sun is bright.\n"
) * 20


def log_sigmoid(x: float) -> float:
    return -math.log(1.0 + math.exp(-x))


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe([TEXT], vocab_size=300, workers=1, min_frequency=1)


@pytest.fixture()
def model(tokenizer):
    torch.manual_seed(0)
    return GPT(get_preset("cpu-tiny").replace(vocab_size=tokenizer.vocab_size))


# ---- the loss --------------------------------------------------------------------------
def test_dpo_loss_matches_hand_computed_values():
    # pair 1: chosen log-ratio -5 - (-6) = 1, rejected log-ratio -7 - (-6.5) = -0.5
    # pair 2: chosen log-ratio -3 - (-2) = -1, rejected log-ratio -2 - (-2.5) = 0.5
    out = dpo_loss(torch.tensor([-5.0, -3.0]), torch.tensor([-7.0, -2.0]),
                   torch.tensor([-6.0, -2.0]), torch.tensor([-6.5, -2.5]), beta=0.1)
    loss_1 = -math.log(1.0 / (1.0 + math.exp(-0.1 * (1.0 - (-0.5)))))  # h = 0.15
    loss_2 = -math.log(1.0 / (1.0 + math.exp(-0.1 * (-1.0 - 0.5))))  # h = -0.15
    assert out.loss.item() == pytest.approx((loss_1 + loss_2) / 2, rel=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([0.1, -0.1])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.05, 0.05])
    assert out.margins.tolist() == pytest.approx([0.15, -0.15])
    assert out.accuracy.item() == 0.5


def test_conservative_dpo_label_smoothing_matches_hand_computed_value():
    out = dpo_loss(torch.tensor([-4.0]), torch.tensor([-9.0]), torch.tensor([-5.0]), torch.tensor([-8.0]),
                   beta=0.5, label_smoothing=0.2)
    h = 0.5 * ((-4.0 + 5.0) - (-9.0 + 8.0))  # = 1.0
    expected = -0.8 * log_sigmoid(h) - 0.2 * log_sigmoid(-h)
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)


def test_policy_equal_to_reference_costs_log_two_with_zero_margin():
    logps = torch.tensor([-12.0, -3.5, -40.0])
    rejected = torch.tensor([-11.0, -8.0, -1.0])
    out = dpo_loss(logps, rejected, logps.clone(), rejected.clone(), beta=0.3)
    assert out.loss.item() == pytest.approx(math.log(2.0))
    assert out.margins.tolist() == [0.0, 0.0, 0.0]
    assert out.accuracy.item() == 0.0  # a tie is not a preference


def test_dpo_loss_is_finite_for_huge_margins():
    out = dpo_loss(torch.tensor([0.0]), torch.tensor([-1e5]), torch.tensor([-1e5]), torch.tensor([0.0]), beta=1.0)
    assert out.loss.item() == 0.0
    out = dpo_loss(torch.tensor([-1e5]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([-1e5]), beta=1.0)
    assert out.loss.item() == pytest.approx(2e5)


def test_gradient_reaches_the_policy_only():
    policy = torch.tensor([-2.0, -3.0], requires_grad=True)
    reference = torch.tensor([-2.5, -2.0], requires_grad=True)
    out = dpo_loss(policy[:1], policy[1:], reference[:1], reference[1:])
    out.loss.backward()
    assert policy.grad is not None and policy.grad[0] < 0 < policy.grad[1]  # raise chosen, lower rejected
    assert reference.grad is None
    assert not out.margins.requires_grad


@pytest.mark.parametrize("beta, smoothing", [(0.0, 0.0), (-1.0, 0.0), (float("nan"), 0.0), (0.1, 0.5), (0.1, -0.1)])
def test_bad_beta_or_label_smoothing_is_a_config_error(beta, smoothing):
    x = torch.zeros(1)
    with pytest.raises(ConfigError):
        dpo_loss(x, x, x, x, beta=beta, label_smoothing=smoothing)


# ---- log-probabilities -----------------------------------------------------------------
def test_sequence_logprobs_equals_manual_gather(model, tokenizer):
    torch.manual_seed(1)
    ids = torch.randint(0, tokenizer.vocab_size, (3, 12))
    labels = torch.randint(0, tokenizer.vocab_size, (3, 12))
    labels[0, :5] = IGNORE
    labels[2, :] = IGNORE  # a row with nothing scored sums to 0
    with torch.no_grad():
        got = sequence_logprobs(model, ids, labels)
        logp = torch.log_softmax(model(ids)[0].float(), dim=-1)
    expected = torch.zeros(3)
    for b in range(3):
        for t in range(12):
            if labels[b, t] != IGNORE:
                expected[b] += logp[b, t, labels[b, t]]
    torch.testing.assert_close(got, expected)
    assert got[2].item() == 0.0


def test_labels_follow_gpt_forward_targets_convention(model, tokenizer):
    # The mean of -sequence_logprobs over scored tokens is GPT.forward's own loss on the same targets.
    ids = torch.randint(0, tokenizer.vocab_size, (2, 10))
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = IGNORE
    labels[0, :3] = IGNORE
    with torch.no_grad():
        _, loss = model(ids, targets=labels)
        summed = sequence_logprobs(model, ids, labels)
    assert (-summed.sum() / (labels != IGNORE).sum()).item() == pytest.approx(loss.item(), rel=1e-5)


def test_right_padding_does_not_change_logprobs(model, tokenizer):
    short = PreferenceExample(({"role": "user", "content": "Which animal?"},), "The cat.", "A dog ran in the park.")
    long = PreferenceExample(({"role": "user", "content": "What colour is the sky? Tell me."},), "Blue.", "Green")
    encoded = [encode_preference(tokenizer, e, 128) for e in (short, long)]
    batch = collate_preferences(encoded, pad_id=5)
    with torch.no_grad():
        chosen, rejected = preference_logprobs(model, batch)
        for n, pair in enumerate(encoded):
            alone = sequence_logprobs(model, torch.tensor([pair.chosen.input_ids]), torch.tensor([pair.chosen.targets]))
            torch.testing.assert_close(chosen[n : n + 1], alone)
            alone = sequence_logprobs(model, torch.tensor([pair.rejected.input_ids]), torch.tensor([pair.rejected.targets]))
            torch.testing.assert_close(rejected[n : n + 1], alone)


# ---- encoding --------------------------------------------------------------------------
def test_encoding_uses_the_chat_template_and_labels_only_the_answer(tokenizer):
    example = PreferenceExample(({"role": "user", "content": "Which animal sat on the mat?"},), "The cat did.", "A dog.")
    pair = encode_preference(tokenizer, example, 128)
    prompt = tokenizer.encode("<|im_start|>user\nWhich animal sat on the mat?<|im_end|>\n<|im_start|>assistant\n",
                              allowed_special="all")
    im_end = tokenizer.special_tokens["<|im_end|>"]
    for side, answer in ((pair.chosen, "The cat did."), (pair.rejected, "A dog.")):
        assert side.tokens[: len(prompt)] == prompt
        # The position reading "assistant\n" predicts the answer's first token; nothing before it is scored.
        assert side.targets[: len(prompt) - 1] == [IGNORE] * (len(prompt) - 1)
        scored = [t for t in side.targets if t != IGNORE]
        assert scored[-1] == im_end  # the model learns to end its turn
        assert tokenizer.decode(scored[:-1]) == answer
        assert side.targets == side.labels[1:] and side.input_ids == side.tokens[:-1]


def test_each_answer_is_encoded_as_sft_encodes_the_conversation_with_only_the_last_answer_labelled(tokenizer):
    earlier = ({"role": "user", "content": "Which animal?"}, {"role": "assistant", "content": "The cat."},
               {"role": "user", "content": "Where did it sit?"})
    pair = encode_preference(tokenizer, PreferenceExample(earlier, "On the mat.", "In the park."), 128)
    for side, answer in ((pair.chosen, "On the mat."), (pair.rejected, "In the park.")):
        assert side == encode_conversation(tokenizer, [*earlier, {"role": "assistant", "content": answer}], 128, train_on="last")
        assert "The cat." not in tokenizer.decode([t for t in side.labels if t != IGNORE])


def test_special_token_text_in_an_answer_does_not_end_the_turn(tokenizer):
    example = PreferenceExample(({"role": "user", "content": "Say it"},), "<|im_end|>", "no")
    pair = encode_preference(tokenizer, example, 128)
    im_end = tokenizer.special_tokens["<|im_end|>"]
    assert [lab for lab in pair.chosen.targets if lab != IGNORE].count(im_end) == 1


def test_model_without_chat_template_gets_the_plain_prompt():
    plain = train_bpe([TEXT], vocab_size=300, workers=1, min_frequency=1, special_tokens=("<|endoftext|>",))
    example = PreferenceExample(({"role": "user", "content": "The sky is"},), " blue.", " green.")
    chosen = encode_preference(plain, example, 64).chosen
    prompt = plain.encode_ordinary("The sky is")
    assert chosen.tokens == prompt + plain.encode_ordinary(" blue.") + [plain.eot_id]
    assert [t for t in chosen.targets if t != IGNORE] == chosen.tokens[len(prompt) :]
    two_turns = PreferenceExample(({"role": "system", "content": "Be brief"}, {"role": "user", "content": "Hi"}), "a", "b")
    with pytest.raises(ConfigError, match="single user message"):
        encode_preference(plain, two_turns, 64)


def test_too_long_pair_is_dropped_or_left_truncated(tokenizer):
    long_prompt = "The cat sat on the mat. " * 20
    example = PreferenceExample(({"role": "user", "content": long_prompt},), "The cat did.", "A dog ran in the park.")
    full = encode_preference(tokenizer, example, 1024)
    assert len(full.chosen.input_ids) > 40 and len(full.rejected.input_ids) > 40
    assert encode_preference(tokenizer, example, 40, truncate="drop") is None
    cut = encode_preference(tokenizer, example, 40, truncate="left")
    assert max(len(cut.chosen.input_ids), len(cut.rejected.input_ids)) == 40
    assert cut.chosen.truncated and cut.rejected.truncated
    # Answers kept whole, so they score exactly what they scored untruncated.
    assert [x for x in cut.chosen.targets if x != IGNORE] == [x for x in full.chosen.targets if x != IGNORE]
    assert [x for x in cut.rejected.targets if x != IGNORE] == [x for x in full.rejected.targets if x != IGNORE]
    # Both answers follow the same (cut) prompt: the end of the original one, the same tokens dropped from each.
    dropped = len(full.chosen.tokens) - len(cut.chosen.tokens)
    assert dropped == len(full.rejected.tokens) - len(cut.rejected.tokens)
    n_prompt = next(i for i, x in enumerate(cut.chosen.labels) if x != IGNORE)
    assert cut.rejected.tokens[:n_prompt] == cut.chosen.tokens[:n_prompt] == full.chosen.tokens[dropped:][:n_prompt]
    huge_answer = PreferenceExample(({"role": "user", "content": "Hi"},), "The cat sat on the mat. " * 30, "no")
    assert encode_preference(tokenizer, huge_answer, 40, truncate="left") is None
    with pytest.raises(ConfigError, match="truncate"):
        encode_preference(tokenizer, example, 40, truncate="right")


# ---- files -----------------------------------------------------------------------------
def test_malformed_lines_are_reported_with_line_numbers(tmp_path):
    lines = [
        json.dumps({"prompt": "Which animal?", "chosen": "The cat.", "rejected": "A dog."}),  # 1 ok
        '{"prompt": "broken", "chosen": ',  # 2 bad JSON
        json.dumps({"prompt": "Q", "rejected": "A dog."}),  # 3 missing chosen
        json.dumps({"messages": [{"role": "robot", "content": "Hi"}], "chosen": "a", "rejected": "b"}),  # 4 role
        json.dumps({"prompt": "Q", "chosen": "   ", "rejected": "b"}),  # 5 empty answer
        "",  # 6 blank: ignored
        json.dumps(["not", "an", "object"]),  # 7
        json.dumps({"prompt": "Q", "chosen": "same", "rejected": "same"}),  # 8
        json.dumps({"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sky?"}],
                    "chosen": [{"role": "assistant", "content": "Blue."}], "rejected": "Green."}),  # 9 ok, TRL shape
    ]
    path = tmp_path / "prefs.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe bad bytes\n")  # 10 not UTF-8
    examples, report = load_preferences(path)
    assert report.kept == [1, 9]
    assert [r.line for r in report.rejected] == [2, 3, 4, 5, 7, 8, 10]
    reasons = {r.line: r.reason for r in report.rejected}
    assert "not JSON" in reasons[2]
    assert "'chosen'" in reasons[3] and "missing" in reasons[3]
    assert "role 'robot'" in reasons[4]
    assert "empty answer" in reasons[5]
    assert "UTF-8" in reasons[10]
    assert examples[0] == PreferenceExample(({"role": "user", "content": "Which animal?"},), "The cat.", "A dog.",
                                            source=f"{path}:1")
    assert examples[1].messages[0] == {"role": "system", "content": "Be brief."} and examples[1].chosen == "Blue."
    assert "2 pairs kept, 7 malformed lines" in report.summary() and f"{path}:2: not JSON" in report.summary()


def test_missing_file_or_file_without_pairs_is_an_input_error(tmp_path):
    with pytest.raises(InputFileError, match="cannot read"):
        load_preferences(tmp_path / "absent.jsonl")
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps({"prompt": "Q", "chosen": "same", "rejected": "same"}) + "\n")
    with pytest.raises(InputFileError, match="no usable pairs.*:1: chosen and rejected are the same"):
        load_preferences(path)


def test_web_chat_feedback_records_convert_to_pairs(tmp_path, tokenizer):
    asked = [{"role": "user", "content": "What colour is the sky?"}]

    def record(reply_id, rating=None, edited=None, completion="Green."):
        request = FeedbackRequest.model_validate(
            {"reply_id": reply_id, "model": "tiny", "messages": asked, "completion": completion,
             "rating": rating, "edited": edited})
        return PreferenceRecord.from_feedback(request, now=0).to_json_line()

    path = tmp_path / "feedback.jsonl"
    path.write_text(
        record("r1", rating="down")  # 1: superseded by line 2
        + record("r1", rating="down", edited="Blue.")  # 2: a pair
        + record("r2", rating="up", completion="Blue.")  # 3: a rating alone
        + record("r3", edited="The sky is blue.")  # 4: superseded by line 5
        + record("r3", edited="Blue, on a clear day.")  # 5: the latest edit wins
        + record(None, rating="down")  # 6: no reply id, no pair
    )
    examples, report = load_preferences(path)
    assert report.kept == [2, 5]
    assert report.superseded == [1, 4]
    assert report.without_pair == [3, 6]
    assert report.rejected == []
    assert [(e.chosen, e.rejected) for e in examples] == [("Blue.", "Green."), ("Blue, on a clear day.", "Green.")]
    assert examples[0].messages == tuple(asked)
    assert encode_preference(tokenizer, examples[0], 128) is not None


# ---- training --------------------------------------------------------------------------
def test_a_few_dpo_steps_raise_preference_accuracy_and_margin(model, tokenizer):
    pairs = [
        PreferenceExample(({"role": "user", "content": "Which animal sat on the mat?"},), "The cat did.", "A dog ran."),
        PreferenceExample(({"role": "user", "content": "What colour is the sky?"},), "The sky is blue.", "Grass."),
        PreferenceExample(({"role": "user", "content": "Where did the dog run?"},), "In the park.", "On the mat."),
        PreferenceExample(({"role": "user", "content": "Is the sun bright?"},), "The sun is bright.", "The sky is green."),
    ]
    batch = collate_preferences([encode_preference(tokenizer, p, 128) for p in pairs])
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    with torch.no_grad():
        ref_chosen, ref_rejected = preference_logprobs(reference, batch)

    def measure():
        with torch.no_grad():
            return dpo_loss(*preference_logprobs(model, batch), ref_chosen, ref_rejected, beta=0.1)

    before = measure()
    assert before.accuracy.item() == 0.0 and before.loss.item() == pytest.approx(math.log(2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(10):
        out = dpo_loss(*preference_logprobs(model, batch), ref_chosen, ref_rejected, beta=0.1)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    after = measure()
    assert after.accuracy.item() == 1.0
    assert after.margins.min().item() > 0.0
    assert after.loss.item() < math.log(2) - 0.1
