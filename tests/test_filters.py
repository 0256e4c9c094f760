import pickle
from itertools import accumulate

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scratchlm.config import build
from scratchlm.data.filters import (
    FilterConfig,
    QualityFilter,
    c4_clean,
    count_sentences,
    duplicated_ngram_chars,
    fineweb_quality,
    gopher_quality,
    gopher_repetition,
    language_filter,
)
from scratchlm.errors import ConfigError

GOOD_ENGLISH = """The old harbour town sits at the mouth of a wide river, where fishing boats have moored for centuries.
Every morning the market opens before sunrise, and traders arrive with baskets of bread, cheese and fresh vegetables.

Visitors often climb the steep path to the lighthouse, which offers a clear view of the coast on a calm day.
The museum near the square explains how the town grew from a small village into a busy port.
Local guides say that the best time to visit is late spring, when the weather is mild and the streets are quiet.

Several families still run the bakeries and workshops that their grandparents opened long ago.
In the evening, people gather on the pier to watch the sun go down behind the hills across the water.
"""

GERMAN = """Die alte Hafenstadt liegt an der Mündung eines breiten Flusses, wo seit Jahrhunderten Fischerboote anlegen.
Jeden Morgen öffnet der Markt vor Sonnenaufgang, und Händler kommen mit Körben voller Brot und Käse.
Besucher steigen oft den steilen Weg zum Leuchtturm hinauf, der an ruhigen Tagen einen Blick auf die Küste bietet.
Das Museum am Platz erklärt, wie die Stadt im achtzehnten Jahrhundert von einem kleinen Dorf zu einem Hafen wuchs.
Am Abend versammeln sich die Menschen auf dem Steg, um den Sonnenuntergang hinter den Hügeln zu beobachten.
"""

FRENCH = """La vieille ville portuaire se trouve à l'embouchure d'un large fleuve, où accostent les bateaux de pêche.
Chaque matin, le marché ouvre avant le lever du soleil, et les marchands arrivent avec du pain et du fromage.
Les visiteurs montent souvent le chemin escarpé jusqu'au phare, qui offre une belle vue sur la côte.
Le musée de la place explique comment la ville est passée d'un petit village à un port actif.
Le soir, les habitants se retrouvent sur la jetée pour regarder le soleil se coucher derrière les collines.
"""

# Every rule set off except the one under test, so a test sees exactly one rule set's verdict.
ONLY_LANGUAGE = FilterConfig(c4=False, gopher_quality=False, gopher_repetition=False, fineweb=False, languages=("en",))
REPETITION_FIELDS = [
    "dup_para_frac", "dup_para_char_frac", "dup_line_frac", "dup_line_char_frac",
    *(f"top_{n}gram_char_frac" for n in (2, 3, 4)), *(f"dup_{n}gram_char_frac" for n in range(5, 11)),
]


def only_repetition_rule(field: str) -> FilterConfig:
    """The default config with every repetition rule but `field` at its neutral value, 1.0."""
    return FilterConfig(**{name: 1.0 for name in REPETITION_FIELDS if name != field})


def only_fineweb_rule(**thresholds) -> FilterConfig:
    neutral = dict(line_punct_thr=0.0, short_line_length=0, char_duplicates_ratio=1.0, new_line_ratio=100.0)
    return FilterConfig(**{**neutral, **thresholds})


def unique_words(count: int, length: int = 5, offset: int = 0) -> list[str]:
    """`count` distinct lower-case words of exactly `length` letters (base-26 numerals)."""
    words = []
    for i in range(offset, offset + count):
        letters = []
        for _ in range(length):
            i, digit = divmod(i, 26)
            letters.append(chr(ord("a") + digit))
        words.append("".join(reversed(letters)))
    return words


def prose(n_words: int) -> str:
    """`n_words` distinct 5-letter words with two stop words among them: passes every Gopher
    quality rule when n_words is within bounds."""
    return " ".join(["the", "and", *unique_words(n_words - 2)])


# ---- the whole filter ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def english_filter() -> QualityFilter:
    return QualityFilter(FilterConfig(languages=("en",)))


def test_good_english_passes_every_filter_with_defaults(english_filter):
    cleaned, reason = english_filter(GOOD_ENGLISH)
    assert reason is None
    # C4 cleaning keeps every line here but drops the blank ones.
    assert cleaned == "\n".join(line for line in GOOD_ENGLISH.splitlines() if line)


@pytest.mark.parametrize(("text", "code"), [(GERMAN, "de"), (FRENCH, "fr")])
def test_other_languages_are_rejected_with_their_code(english_filter, text, code):
    assert language_filter(text, english_filter.config, english_filter.identify) == f"language:{code}"


def test_gopher_stop_words_already_reject_non_english_text(english_filter):
    assert english_filter(GERMAN)[1] == "gopher_quality:too_few_stop_words"


def fake_english(score: float):
    return lambda text: ("en", score)


def test_language_score_below_the_threshold_is_low_score():
    config = FilterConfig(languages=("en",), min_language_score=0.65)
    assert language_filter(GOOD_ENGLISH, config, fake_english(0.64)) == "language:low_score"
    assert language_filter(GOOD_ENGLISH, config, fake_english(0.65)) is None


def identify_as_english(text: str) -> tuple[str, float]:
    return "en", 0.99


def test_a_custom_identifier_is_used_and_sees_no_newlines():
    seen = []
    QualityFilter(ONLY_LANGUAGE, identify=lambda text: seen.append(text) or ("en", 1.0))("one\ntwo\nthree")
    assert seen == ["one two three"]


def test_without_languages_the_identifier_is_never_called():
    def refuse(text):
        raise AssertionError("language identification ran")

    config = FilterConfig(c4=False, gopher_quality=False, gopher_repetition=False, fineweb=False)
    assert QualityFilter(config, identify=refuse)(GERMAN) == (GERMAN, None)


def test_disabled_filter_returns_text_unchanged():
    garbage = "{ lorem ipsum }\n# # #\n\n"
    assert QualityFilter(FilterConfig(enabled=False, languages=("en",)))(garbage) == (garbage, None)
    config = FilterConfig(c4=False, gopher_quality=False, gopher_repetition=False, fineweb=False)
    assert QualityFilter(config)(garbage) == (garbage, None)


@pytest.mark.parametrize(
    ("switch", "text"),
    [
        ("c4", GOOD_ENGLISH + "Lorem ipsum dolor sit amet, consectetur adipiscing elit.\n"),
        ("gopher_quality", GOOD_ENGLISH + " ".join("#" + tag for tag in unique_words(40)) + ".\n"),
        ("gopher_repetition", GOOD_ENGLISH + "Buy cheap shoes online today and save money. " * 12 + "\n"),
    ],
)
def test_switching_a_rule_set_off_lets_its_rejects_through(switch, text):
    assert QualityFilter(FilterConfig())(text)[1].startswith(f"{switch}:")
    assert QualityFilter(FilterConfig(**{switch: False}))(text)[1] is None


def test_filter_survives_pickling_without_its_model(english_filter):
    assert english_filter(GOOD_ENGLISH)[1] is None  # language identification ran: the model is loaded
    data = pickle.dumps(english_filter)
    assert len(data) < 10_000  # the identifier's model (megabytes) stayed behind
    copy = pickle.loads(data)
    assert copy(GOOD_ENGLISH) == english_filter(GOOD_ENGLISH)
    assert copy.config == english_filter.config
    custom = pickle.loads(pickle.dumps(QualityFilter(ONLY_LANGUAGE, identify=identify_as_english)))
    assert custom(FRENCH)[1] is None


# ---- Gopher quality ----------------------------------------------------------------------------
def test_prose_helper_passes_gopher_quality():
    assert gopher_quality(prose(60), FilterConfig()) is None


def test_word_count_bounds():
    config = FilterConfig(min_words=50, max_words=60)
    assert gopher_quality(prose(49), config) == "gopher_quality:too_few_words"
    assert gopher_quality(prose(50), config) is None
    assert gopher_quality(prose(60), config) is None
    assert gopher_quality(prose(61), config) == "gopher_quality:too_many_words"


def test_punctuation_only_tokens_are_not_words():
    config = FilterConfig(max_symbol_word_ratio=1)
    assert gopher_quality(prose(49) + " - ... #", config) == "gopher_quality:too_few_words"


def test_mean_word_length_bounds():
    three = " ".join(["the", "and", *unique_words(48, length=3)])  # mean exactly 3
    assert gopher_quality(three, FilterConfig()) is None
    assert gopher_quality(three.replace("the", "an", 1), FilterConfig()) == "gopher_quality:mean_word_length_low"
    # 2 words of 3 letters + 46 of 10 + 2 of 17: 500 letters in 50 words, a mean of exactly 10.
    ten = " ".join(["the", "and", *unique_words(46, length=10), *unique_words(2, length=17)])
    assert gopher_quality(ten, FilterConfig()) is None
    assert gopher_quality(ten + "x", FilterConfig()) == "gopher_quality:mean_word_length_high"


@pytest.mark.parametrize(
    ("symbol", "reason"), [("#", "hash_ratio"), ("...", "ellipsis_ratio"), ("…", "ellipsis_ratio")]
)
def test_symbol_to_word_ratio(symbol, reason):
    def with_symbols(k: int) -> str:  # 100 tokens, k of them carrying the symbol
        words = prose(100).split()
        return " ".join(w + symbol if i < k else w for i, w in enumerate(words))

    assert gopher_quality(with_symbols(10), FilterConfig()) is None  # 0.10
    assert gopher_quality(with_symbols(11), FilterConfig()) == f"gopher_quality:{reason}"  # 0.11


def lines_of(count: int, words_per_line: int = 6) -> list[str]:
    words = prose(count * words_per_line).split()
    return [" ".join(words[i : i + words_per_line]) for i in range(0, len(words), words_per_line)]


def test_bullet_lines_ratio():
    def bulleted(total: int, bullets: int) -> str:
        return "\n\n".join(("• " if i < bullets else "") + line for i, line in enumerate(lines_of(total)))

    # Blank lines between the items do not dilute the ratio.
    assert gopher_quality(bulleted(10, 9), FilterConfig()) is None  # 0.90
    assert gopher_quality(bulleted(20, 19), FilterConfig()) == "gopher_quality:bullet_lines_ratio"  # 0.95
    assert gopher_quality(bulleted(20, 19).replace("•", "-"), FilterConfig()) == "gopher_quality:bullet_lines_ratio"


def test_ellipsis_lines_ratio():
    def trailing(total: int, ellipses: int) -> str:
        return "\n".join(line + ("..." if i < ellipses else ".") for i, line in enumerate(lines_of(total)))

    assert gopher_quality(trailing(10, 3), FilterConfig()) is None  # 0.3
    assert gopher_quality(trailing(10, 4), FilterConfig()) == "gopher_quality:ellipsis_lines_ratio"  # 0.4


def test_alphabetic_words_ratio():
    def with_numbers(k: int) -> str:  # 100 tokens, k of them without a letter
        words = prose(100).split()
        return " ".join(str(1900 + i) if i >= 100 - k else w for i, w in enumerate(words))

    assert gopher_quality(with_numbers(20), FilterConfig()) is None  # 80% alphabetic
    assert gopher_quality(with_numbers(21), FilterConfig()) == "gopher_quality:alpha_words_ratio"  # 79%


def test_stop_words_are_counted_case_insensitively_without_punctuation():
    words = unique_words(60)
    assert gopher_quality(" ".join(["The,", "AND", *words]), FilterConfig()) is None
    assert gopher_quality(" ".join(["the", *words]), FilterConfig()) == "gopher_quality:too_few_stop_words"


# ---- Gopher repetition ------------------------------------------------------------------------
def test_unique_text_passes_every_repetition_rule():
    assert gopher_repetition(GOOD_ENGLISH, FilterConfig()) is None


@pytest.mark.parametrize(("unit", "separator"), [("para", "\n\n"), ("line", "\n")])
def test_duplicated_item_fraction(unit, separator):
    config = only_repetition_rule(f"dup_{unit}_frac")
    items = lines_of(10)
    three = separator.join(items[:7] + [items[0]] * 3)
    four = separator.join(items[:6] + [items[0]] * 4)
    assert gopher_repetition(three, config) is None  # 3 of 10 repeat an earlier one: 0.3
    assert gopher_repetition(four, config) == f"gopher_repetition:dup_{unit}_frac"  # 0.4


@pytest.mark.parametrize(("unit", "separator"), [("para", "\n\n"), ("line", "\n")])
def test_duplicated_item_characters(unit, separator):
    config = only_repetition_rule(f"dup_{unit}_char_frac")

    def text(total: int) -> str:  # the second "bbbbbbbbbb" is 10 duplicated characters of `total`
        first = "a" * (total - 20 - 2 * len(separator))
        return separator.join([first, "b" * 10, "b" * 10])

    assert len(text(50)) == 50
    assert gopher_repetition(text(50), config) is None  # 10 / 50 = 0.2
    assert gopher_repetition(text(49), config) == f"gopher_repetition:dup_{unit}_char_frac"


def smallest_passing_length(chars: int, threshold: float) -> int:
    """The shortest document in which `chars` characters are at most `threshold` of the whole."""
    total = max(1, int(chars / threshold) - 2)
    while chars / total > threshold:
        total += 1
    return total


def padded(words: list[str], total: int) -> str:
    """`words` and one long filler word, `total` characters in all."""
    head = " ".join(words) + " "
    return head + "z" * (total - len(head))


@pytest.mark.parametrize("n", [2, 3, 4])
def test_top_ngram_character_fraction(n):
    field = f"top_{n}gram_char_frac"
    gram = unique_words(n, length=2)
    chars = 2 * (3 * n - 1)  # two occurrences of n two-letter words and their n - 1 spaces
    total = smallest_passing_length(chars, getattr(FilterConfig(), field))
    config = only_repetition_rule(field)
    assert gopher_repetition(padded(gram * 2, total), config) is None
    assert gopher_repetition(padded(gram * 2, total - 1), config) == f"gopher_repetition:{field}"


@pytest.mark.parametrize("n", range(5, 11))
def test_duplicated_ngram_character_fraction(n):
    field = f"dup_{n}gram_char_frac"
    gram = unique_words(n, length=2)
    chars = 2 * n  # the words of the second occurrence, spaces not counted
    total = smallest_passing_length(chars, getattr(FilterConfig(), field))
    config = only_repetition_rule(field)
    assert gopher_repetition(padded(gram * 2, total), config) is None
    assert gopher_repetition(padded(gram * 2, total - 1), config) == f"gopher_repetition:{field}"


def word_ends(words: list[str]) -> list[int]:
    return list(accumulate(map(len, words), initial=0))


def test_words_under_overlapping_repeats_count_once():
    words = ["a"] * 20  # every 5-gram after the first repeats it; words 1..19 are covered
    assert duplicated_ngram_chars(words, 5, word_ends(words)) == 19


def covered_chars_by_brute_force(words: list[str], n: int) -> int:
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    repeated = [i for i, gram in enumerate(grams) if gram in grams[:i]]
    return sum(len(words[j]) for j in range(len(words)) if any(i <= j < i + n for i in repeated))


@given(st.lists(st.sampled_from(["a", "bb", "ccc", "dd", "e"]), max_size=40), st.integers(2, 6))
def test_duplicated_ngram_chars_matches_the_definition(words, n):
    assert duplicated_ngram_chars(words, n, word_ends(words)) == covered_chars_by_brute_force(words, n)
    # Longer n-grams never cover more: this is what lets gopher_repetition stop early.
    assert duplicated_ngram_chars(words, n + 1, word_ends(words)) <= duplicated_ngram_chars(words, n, word_ends(words))


# ---- C4 ----------------------------------------------------------------------------------------
def test_c4_line_cleaning_keeps_prose_and_drops_boilerplate():
    text = "\n".join([
        "Home",  # too few words
        "About us today",  # three words: kept (no terminal punctuation needed, as in FineWeb)
        "The river flows past the old mill.[1]",  # citation removed
        "Please enable JavaScript to view the comments.",
        "This site uses cookies to improve your experience.",
        "Read our privacy policy before you sign up.",
        "A word of " + "x" * 1001 + " letters.",  # a word over 1000 characters
        "A word of " + "y" * 1000 + " letters.",
        "  The bakery opens at six in the morning.  ",
        "",
    ])
    cleaned, _ = c4_clean(text, FilterConfig())
    assert cleaned.split("\n") == [
        "About us today",
        "The river flows past the old mill.",
        "A word of " + "y" * 1000 + " letters.",
        "The bakery opens at six in the morning.",
    ]


def test_c4_terminal_punctuation_rule_when_switched_on():
    text = "About us today\nThe river flows past the mill.\nMore to come soon...\nHe said \"yes.\""
    cleaned, _ = c4_clean(text, FilterConfig(c4_terminal_punct=True))
    assert cleaned == "The river flows past the mill.\nHe said \"yes.\""


def test_c4_min_words_per_line():
    cleaned, _ = c4_clean("Two words.\nNow three words.", FilterConfig())
    assert cleaned == "Now three words."


def test_c4_min_sentences():
    four = "One is here. Two is here.\nThree is here. Four is here."
    assert c4_clean(four, FilterConfig())[1] == "c4:too_few_sentences"
    assert c4_clean(four + "\nFive is here.", FilterConfig())[1] is None


def test_c4_document_rules_look_only_at_kept_lines():
    body = GOOD_ENGLISH
    assert c4_clean(body + "Lorem ipsum dolor sit amet.", FilterConfig())[1] == "c4:lorem_ipsum"
    assert c4_clean(body + "Call f{x} when ready.", FilterConfig())[1] == "c4:curly_bracket"
    assert c4_clean(body + "{ }", FilterConfig())[1] is None  # a two-token line is dropped first
    assert c4_clean(body + "Enable javascript: {x} here.", FilterConfig())[1] is None  # dropped as javascript


def test_sentence_count():
    assert count_sentences("No end mark") == 1
    assert count_sentences('He left. "Why?" she asked! Then (silence.) Done') == 4
    assert count_sentences("Version 3.11 is out.") == 1  # a dot inside a number ends nothing


# ---- FineWeb -----------------------------------------------------------------------------------
def test_fineweb_line_punctuation_ratio():
    config = only_fineweb_rule(line_punct_thr=0.12)

    def text(ended: int) -> str:  # 100 lines, `ended` of them end with a full stop
        return "\n".join(line + ("." if i < ended else "") for i, line in enumerate(lines_of(100)))

    assert fineweb_quality(text(12), config) == "fineweb:line_punct_ratio"  # 0.12 is not enough
    assert fineweb_quality(text(13), config) is None


def test_fineweb_short_line_ratio():
    config = only_fineweb_rule(short_line_thr=0.67, short_line_length=30)

    def text(short: int) -> str:  # 100 lines, `short` of them exactly 30 characters long
        words = unique_words(100, length=29)
        return "\n".join((w + "." if i < short else w + " and more.") for i, w in enumerate(words))

    assert fineweb_quality(text(66), config) is None
    assert fineweb_quality(text(67), config) == "fineweb:short_line_ratio"


def test_fineweb_duplicated_line_characters():
    config = only_fineweb_rule(char_duplicates_ratio=0.01)

    def text(total: int) -> str:  # 7 duplicated characters of `total`, newlines not counted
        return "\n".join(["a" * (total - 14), "Thanks.", "Thanks."])

    assert fineweb_quality(text(700), config) == "fineweb:char_dup_ratio"  # 0.01
    assert fineweb_quality(text(701), config) is None


def test_fineweb_newlines_per_word():
    config = only_fineweb_rule(new_line_ratio=0.3)

    def text(words: int) -> str:  # 10 lines (9 newlines) sharing `words` words
        tokens = unique_words(words)
        return "\n".join(" ".join(tokens[i::10]) + "." for i in range(10))

    assert fineweb_quality(text(30), config) is None  # 9 / 30 = 0.3
    assert fineweb_quality(text(29), config) == "fineweb:list_ratio"


# ---- configuration -----------------------------------------------------------------------------
def test_config_defaults_are_the_published_ones():
    config = FilterConfig()
    assert (config.min_words, config.max_words, config.min_mean_word_length, config.max_mean_word_length) == (
        50, 100_000, 3, 10)
    assert (config.max_symbol_word_ratio, config.max_bullet_lines_ratio, config.max_ellipsis_lines_ratio,
            config.min_alpha_words_ratio, config.min_stop_words) == (0.1, 0.9, 0.3, 0.8, 2)
    assert [getattr(config, name) for name in REPETITION_FIELDS] == [
        0.3, 0.2, 0.3, 0.2, 0.2, 0.18, 0.16, 0.15, 0.14, 0.13, 0.12, 0.11, 0.10]
    assert (config.line_punct_thr, config.short_line_thr, config.short_line_length,
            config.char_duplicates_ratio, config.new_line_ratio) == (0.12, 0.67, 30, 0.01, 0.3)
    assert (config.languages, config.min_language_score) == (None, 0.65)


def test_config_loader_reads_languages_from_toml_and_command_line():
    assert build(FilterConfig, {"languages": ["en", "fr"]}).languages == ("en", "fr")
    assert build(FilterConfig, {"languages": "en, fr"}).languages == ("en", "fr")
    assert build(FilterConfig, {"languages": "none"}).languages is None
    assert build(FilterConfig, {"languages": []}).languages is None
    assert build(FilterConfig, {"min_words": "60"}).min_words == 60
    hash(FilterConfig(languages=["en"]))  # stays hashable


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"min_words": 60, "max_words": 50}, "min_words"),
        ({"min_mean_word_length": 11}, "min_mean_word_length"),
        ({"dup_line_frac": 1.5}, "dup_line_frac"),
        ({"top_3gram_char_frac": -0.1}, "top_3gram_char_frac"),
        ({"min_language_score": 2}, "min_language_score"),
        ({"c4_min_sentences": -1}, "c4_min_sentences"),
        ({"languages": [3]}, "languages"),
        ({"languages": ["en", ""]}, "languages"),
    ],
)
def test_invalid_config_is_a_config_error(values, field):
    with pytest.raises(ConfigError, match=field):
        FilterConfig(**values)


def test_unknown_config_key_is_a_config_error():
    with pytest.raises(ConfigError, match="min_words"):
        build(FilterConfig, {"min_word": 3})


# ---- bad words and blocked URLs ------------------------------------------------------------------
ONLY_VOUCHING = FilterConfig(bad_words=True, c4=False, gopher_quality=False, gopher_repetition=False, fineweb=False)


@pytest.mark.parametrize(
    "text",
    ["The page linked to porn sites.", "PORN.", "a (porno) link", "ends with bullshit", "a blow job",
     "rosy palm and her 5 sisters", "Some S&M gear", "the g-spot, they said", "two\ngirls one cup"],
)  # fmt: skip
def test_a_listed_word_or_phrase_rejects_the_document_as_toxicity_bad_word(text):
    assert QualityFilter(ONLY_VOUCHING)(GOOD_ENGLISH + text) == (GOOD_ENGLISH + text, "toxicity:bad_word")


@pytest.mark.parametrize(
    "text",
    ["Scunthorpe United won at home.", "A classic novel.", "The analysis of assets.", "Sussex and Essex.",
     "a cocktail party", "Middlesex", "passport", "shitake", "sextant", "grapefruit", "homosexuality studies"],
)  # fmt: skip
def test_a_word_that_only_contains_a_listed_word_is_kept(text):
    assert QualityFilter(ONLY_VOUCHING)(GOOD_ENGLISH + text)[1] is None


def test_bad_words_are_off_by_default_and_switch_on():
    text = GOOD_ENGLISH + "Free porn here."
    assert not FilterConfig().bad_words and FilterConfig().bad_words_languages == ("en",)
    assert QualityFilter(FilterConfig())(text)[1] is None
    assert QualityFilter(FilterConfig(bad_words=True))(text)[1] == "toxicity:bad_word"
    assert QualityFilter(FilterConfig(c4=False, gopher_quality=False, gopher_repetition=False, fineweb=False, bad_words=False))(text)[1] is None
    assert QualityFilter(FilterConfig(enabled=False))(text)[1] is None


def test_bad_words_of_other_languages_and_of_a_user_file(tmp_path):
    words = tmp_path / "words.txt"
    words.write_text("# project list\nFrobnicate\nsecret plan\n\n")
    custom = QualityFilter(FilterConfig(c4=False, gopher_quality=False, gopher_repetition=False, fineweb=False, bad_words_file=str(words)))
    assert custom(GOOD_ENGLISH + "They FROBNICATE it.")[1] == "toxicity:bad_word"
    assert custom(GOOD_ENGLISH + "The secret\n  plan.")[1] == "toxicity:bad_word"  # any whitespace between words
    assert custom(GOOD_ENGLISH + "Frobnicated.")[1] is None
    assert custom(GOOD_ENGLISH + "porn")[1] is None  # bad_words off: the user's list alone
    both = QualityFilter(FilterConfig(c4=False, gopher_quality=False, gopher_repetition=False, fineweb=False, bad_words=True, bad_words_file=str(words)))
    assert both(GOOD_ENGLISH + "porn")[1] == both(GOOD_ENGLISH + "They FROBNICATE it.")[1] == "toxicity:bad_word"
    german = QualityFilter(FilterConfig(c4=False, gopher_quality=False, gopher_repetition=False, fineweb=False, bad_words=True, bad_words_languages="de"))
    assert german(GERMAN + "Du Arschloch.")[1] == "toxicity:bad_word"
    assert german(GOOD_ENGLISH + "porn")[1] is None
    # Chinese is written without spaces: a listed word counts inside a run of characters.
    chinese = QualityFilter(FilterConfig(c4=False, gopher_quality=False, gopher_repetition=False, fineweb=False, bad_words=True, bad_words_languages=["zh"]))
    assert chinese("这是一个关于做爱的故事")[1] == "toxicity:bad_word"
    with pytest.raises(ConfigError, match="no shipped list for 'xx'"):
        FilterConfig(bad_words_languages=["en", "xx"])
    with pytest.raises(ConfigError, match="bad_words_file: .* is not a file"):
        FilterConfig(bad_words_file=str(tmp_path / "missing.txt"))
    assert build(FilterConfig, {"bad_words_languages": "en, de"}).bad_words_languages == ("en", "de")


def test_a_blocklisted_domain_and_its_subdomains_are_rejected(tmp_path):
    blocklist = tmp_path / "domains.txt"
    blocklist.write_text("# spam farms\nspam.example\nhttps://Ads.Tracker.ORG/\n")
    check = QualityFilter(FilterConfig(c4=False, gopher_quality=False, gopher_repetition=False, fineweb=False, url_blocklist=str(blocklist)))
    for url in ("https://spam.example/a", "http://www.spam.example:8080/x", "https://a.b.SPAM.example./", "spam.example/page",
                "https://user@ads.tracker.org/p", "https://x.ads.tracker.org"):  # fmt: skip
        assert check(GOOD_ENGLISH, url=url)[1] == "url:blocklisted", url
    for url in (None, "", "https://notspam.example/", "https://spam.example.org/", "https://tracker.org/", "https://[::1/"):
        assert check(GOOD_ENGLISH, url=url)[1] is None, url
    with pytest.raises(ConfigError, match="url_blocklist: .* is not a file"):
        FilterConfig(url_blocklist=str(tmp_path / "missing.txt"))


def test_a_filter_that_has_loaded_its_lists_still_pickles(tmp_path):
    blocklist = tmp_path / "domains.txt"
    blocklist.write_text("spam.example\n")
    check = QualityFilter(FilterConfig(url_blocklist=str(blocklist), bad_words=True))
    check(GOOD_ENGLISH, url="https://spam.example/")
    check(GOOD_ENGLISH)
    copy = pickle.loads(pickle.dumps(check))
    assert copy(GOOD_ENGLISH, url="https://spam.example/")[1] == "url:blocklisted"
    # A sentence: C4's line cleaning, which runs first, drops lines of fewer than three words.
    assert copy(GOOD_ENGLISH + "The site sells porn to anyone who asks.")[1] == "toxicity:bad_word"
