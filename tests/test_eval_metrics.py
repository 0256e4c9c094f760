import pytest

from scratchlm.errors import ConfigError
from scratchlm.eval.metrics import (
    GENERATION_METRICS,
    accuracy,
    bleu,
    chrf,
    confusion_matrix,
    exact_match,
    generation_metrics,
    macro_f1,
    normalize_answer,
    rouge,
    token_f1,
)


# ---- SQuAD-style ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [("The Cat, sat.", "cat sat"), ("  An   apple!\tA pear", "apple pear"), ("theory", "theory"), ("", "")],
)
def test_normalize_answer_lowercases_and_drops_punctuation_articles_and_extra_space(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_ignores_case_punctuation_and_articles():
    assert exact_match("The Cat sat.", ["cat  sat"]) == 1.0
    assert exact_match("cat sat on", ["cat sat"]) == 0.0


def test_exact_match_takes_the_best_reference():
    assert exact_match("Paris", ["London", "paris"]) == 1.0


def test_token_f1_of_the_squad_example_is_two_thirds():
    # 'cat sat' against 'cat sat on mat': precision 2/2, recall 2/4.
    assert token_f1("the cat sat", ["cat sat on mat"]) == pytest.approx(2 / 3)


def test_token_f1_counts_repeated_words_once_per_occurrence():
    # one 'x' in common: precision 1/3, recall 1/1, F1 1/2
    assert token_f1("x x x", ["x"]) == pytest.approx(0.5)


def test_token_f1_takes_the_best_reference_and_scores_two_empty_answers_as_agreement():
    assert token_f1("cat sat", ["dog", "cat sat"]) == 1.0
    assert token_f1("the", [""]) == 1.0  # both normalise to nothing
    assert token_f1("cat", [""]) == 0.0


def test_references_must_be_a_list_not_a_string():
    with pytest.raises(ConfigError, match="list of strings"):
        exact_match("a", "a")
    with pytest.raises(ConfigError):
        token_f1("a", [])


# ---- BLEU, chrF, ROUGE ---------------------------------------------------------------------
def test_bleu_of_identical_texts_is_100():
    assert bleu(["the cat sat on the mat"], [["the cat sat on the mat"]]) == pytest.approx(100.0)


def test_bleu_with_no_overlap_is_near_zero():
    assert bleu(["alpha beta gamma delta"], [["one two three four"]]) < 1.0


def test_bleu_smooths_a_missing_4gram_as_sacrebleu_does():
    # 1-4-gram precisions 3/4, 2/3, 1/2 and 0/1 -> exp smoothing 1/2: (3/4 * 2/3 * 1/2 * 1/2) ** (1/4)
    assert bleu(["a b c d"], [["a b c e"]]) == pytest.approx(100 * 0.125**0.25, abs=1e-6)


def test_bleu_is_corpus_level_not_a_mean_of_sentence_scores():
    # Summed statistics 7/8, 5/6, 3/4, 1/2; the mean of sentence BLEU would be (100 + 59.46) / 2.
    score = bleu(["a b c d", "a b c d"], [["a b c d"], ["a b c e"]])
    assert score == pytest.approx(100 * (7 / 8 * 5 / 6 * 3 / 4 * 1 / 2) ** 0.25, abs=1e-6)


def test_bleu_and_chrf_accept_a_different_number_of_references_per_example():
    predictions = ["a b c d", "w x y z"]
    references = [["q q q q", "a b c d"], ["w x y z"]]
    assert bleu(predictions, references) == pytest.approx(100.0)
    assert chrf(predictions, references) == pytest.approx(100.0)


def test_chrf_is_100_for_identical_texts_and_0_for_disjoint_characters():
    assert chrf(["hello world"], [["hello world"]]) == pytest.approx(100.0)
    assert chrf(["abc"], [["xyz"]]) == 0.0


def test_rouge_f_measures_of_a_hand_computed_case():
    # 'the cat sat' in 'the cat sat on the mat': 3 of 6 unigrams, 2 of 5 bigrams, LCS 3; precision 1.
    scores = rouge(["the cat sat"], [["the cat sat on the mat"]])
    assert scores["rouge1"] == pytest.approx(2 * 0.5 / 1.5)
    assert scores["rouge2"] == pytest.approx(2 * 0.4 / 1.4)
    assert scores["rougeL"] == pytest.approx(2 * 0.5 / 1.5)


def test_rouge_takes_the_best_reference_and_averages_over_examples():
    scores = rouge(["the cat sat", "a dog"], [["the cat sat on the mat", "The cat sat"], ["a dog"]], types=["rouge1"])
    assert scores == {"rouge1": pytest.approx(1.0)}
    scores = rouge(["the cat sat", "a dog"], [["the cat sat on the mat"], ["a dog"]], types=["rouge1"])
    assert scores["rouge1"] == pytest.approx((2 / 3 + 1) / 2)


def test_corpus_metrics_refuse_mismatched_lengths_and_unknown_names():
    with pytest.raises(ConfigError, match="2 predictions but 1"):
        bleu(["a", "b"], [["a"]])
    with pytest.raises(ConfigError, match="rouge3"):
        rouge(["a"], [["a"]], types=["rouge3"])
    with pytest.raises(ConfigError, match="'blue'"):
        generation_metrics(["a"], [["a"]], ["blue"])


def test_generation_metrics_compare_predictions_without_surrounding_whitespace():
    scores = generation_metrics([" Paris\n"], [["Paris"]])
    assert list(scores) == list(GENERATION_METRICS)
    assert scores["exact_match"] == 1.0 and scores["f1"] == 1.0 and scores["chrf"] == pytest.approx(100.0)


def test_generation_metrics_report_only_the_metrics_asked_for():
    assert set(generation_metrics(["a"], [["b"]], ["f1", "rougeL"])) == {"f1", "rougeL"}


# ---- classification ------------------------------------------------------------------------
def test_accuracy_is_the_fraction_right():
    assert accuracy(["a", "b", "b", "a"], ["a", "b", "a", "a"]) == 0.75
    assert accuracy([], []) == 0.0


def test_macro_f1_of_a_hand_computed_case():
    # label a: TP 2, FN 1 -> F1 4/5; label b: TP 1, FP 1 -> F1 2/3
    assert macro_f1(["a", "a", "b", "b"], ["a", "a", "a", "b"]) == pytest.approx((4 / 5 + 2 / 3) / 2)


def test_macro_f1_punishes_always_answering_the_majority_label():
    truths = ["a", "a", "a", "b"]
    always_a = ["a"] * 4
    assert accuracy(always_a, truths) == 0.75
    assert macro_f1(always_a, truths) == pytest.approx((6 / 7 + 0) / 2)


def test_confusion_matrix_counts_true_rows_against_predicted_columns():
    matrix = confusion_matrix(["a", "b", "b", "b", "c"], ["a", "a", "b", "c", "c"], ["a", "b", "c"])
    assert matrix == [[1, 1, 0], [0, 1, 0], [0, 1, 1]]


def test_confusion_matrix_refuses_a_label_outside_the_list():
    with pytest.raises(ConfigError, match="'d'"):
        confusion_matrix(["d"], ["a"], ["a", "b"])


def test_classification_metrics_refuse_mismatched_lengths():
    with pytest.raises(ConfigError, match="1 predictions but 2"):
        accuracy(["a"], ["a", "b"])


def test_generation_metrics_refuse_a_prediction_without_references():
    with pytest.raises(ConfigError, match="2 predictions but 1"):
        generation_metrics(["a", "b"], [["a"]], ["exact_match"])
