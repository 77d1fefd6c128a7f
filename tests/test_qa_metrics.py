"""EM / F1 / match of raghub.metrics on hand-computed cases, and against torchmetrics' SQuAD metric."""

import pytest

from raghub.metrics import answer_match, best_over_aliases, exact_match, f1, normalize_answer


@pytest.mark.parametrize("raw, normalised", [
    ("The Denver Broncos!", "denver broncos"),           # case, article, punctuation
    ("  an   apple,  a day ", "apple day"),              # articles a/an, whitespace collapsed
    ("Theatre of the Absurd", "theatre of absurd"),      # 'the' only as a whole word
    ("U.S.A.", "usa"),                                   # punctuation removed, not spaced
    ("24–10", "24–10"),                                  # the en dash is not ASCII punctuation
])
def test_normalize_answer(raw, normalised):
    assert normalize_answer(raw) == normalised


def test_exact_match_ignores_case_articles_and_punctuation():
    assert exact_match("the Carolina Panthers.", "Carolina Panthers") == 1.0
    assert exact_match("Carolina", "Carolina Panthers") == 0.0


def test_f1_hand_computed():
    # "cat sat on mat" vs "cat on mat": overlap 3, precision 3/4, recall 3/3 -> F1 = 6/7
    assert f1("the cat sat on the mat", "a cat on a mat") == pytest.approx(6 / 7)
    # repeated tokens count once per match: "new new york" vs "new york": overlap 2,
    # precision 2/3, recall 1 -> F1 = 0.8
    assert f1("new new york", "New York") == pytest.approx(0.8)
    assert f1("Paris", "London") == 0.0


def test_best_over_aliases_takes_the_best_alias():
    aliases = ["Mask of Fu Manchu", "The Mask of Fu Manchu", "Fu Manchu"]
    assert best_over_aliases(exact_match, "the mask of fu manchu", aliases) == 1.0
    # "fu manchu film" vs "fu manchu": precision 2/3, recall 1 -> 0.8 (best of the three)
    assert best_over_aliases(f1, "Fu Manchu film", aliases) == pytest.approx(0.8)
    assert best_over_aliases(f1, "anything", []) == 0.0


def test_yes_no_answers_score_only_when_equal():
    """HotpotQA's official rule: a yes/no/noanswer side must match exactly to earn F1."""
    assert f1("yes", "yes") == 1.0
    assert f1("Yes.", "yes") == 1.0
    assert f1("yes it is", "yes") == 0.0       # plain SQuAD F1 would give 2·(1/3)·1/(4/3) = 0.5
    assert f1("no", "no way") == 0.0
    assert exact_match("No", "no") == 1.0


@pytest.mark.parametrize("prediction, gold, expected", [
    ("Paris", "Paris", 1.0),                                    # the same answer
    ("It is Paris, the capital of France.", "paris", 1.0),      # inside a sentence
    ("The Denver Broncos won Super Bowl 50", "Denver Broncos", 1.0),
    ("the Broncos", "The Broncos!", 1.0),                       # normalised on both sides
    ("Parisian cafés", "Paris", 0.0),                           # inside a word: no match
    ("at Parisville", "Paris", 0.0),
    ("1850s", "1850", 0.0),                                     # a number inside a longer one
    ("in 1850, the act", "1850", 1.0),
    ("Denver", "Denver Broncos", 0.0),                          # only part of the gold
    ("Broncos Denver", "Denver Broncos", 0.0),                  # its words, in another order
    ("", "Paris", 0.0),
    ("anything at all", "The", 0.0),                            # a gold that normalises to nothing
    ("Yes, both are American.", "yes", 1.0),                    # yes / no: the first word
    ("yes", "Yes", 1.0),
    ("No.", "no", 1.0),
    ("There is no doubt, yes", "no", 0.0),                      # 'no' inside, not the answer
    ("There is no doubt, yes", "yes", 0.0),
    ("nobody knows", "no", 0.0),
    ("no", "no way", 0.0),                                      # a yes / no prediction, other gold
])
def test_answer_match_hand_labelled(prediction, gold, expected):
    assert answer_match(prediction, gold) == expected


def test_match_takes_any_alias():
    aliases = ["Mask of Fu Manchu", "Fu Manchu"]
    assert best_over_aliases(answer_match, "I think it was Fu Manchu himself", aliases) == 1.0
    assert best_over_aliases(answer_match, "Manchuria", aliases) == 0.0


def test_em_f1_equal_torchmetrics_squad():
    """On predictions without yes/no (where HotpotQA's rule departs from SQuAD's), the mean
    of best-alias EM / F1 equals torchmetrics' local copy of the official SQuAD script."""
    from torchmetrics.text import SQuAD

    cases = [
        ("the Denver Broncos", ["Denver Broncos", "Broncos"]),
        ("Carolina", ["Carolina Panthers"]),
        ("Santa Clara, California", ["Santa Clara", "Levi's Stadium in Santa Clara"]),
        ("gold-themed initiatives", ["golden anniversary"]),
        ("an 1850s Act", ["the Act of 1850"]),
    ]
    predictions = [{"prediction_text": p, "id": str(i)} for i, (p, _) in enumerate(cases)]
    targets = [{"answers": {"answer_start": [0] * len(g), "text": g}, "id": str(i)}
               for i, (_, g) in enumerate(cases)]
    reference = SQuAD()(predictions, targets)
    ours_em = sum(best_over_aliases(exact_match, p, g) for p, g in cases) / len(cases)
    ours_f1 = sum(best_over_aliases(f1, p, g) for p, g in cases) / len(cases)
    assert 100 * ours_em == pytest.approx(float(reference["exact_match"]), abs=1e-4)
    assert 100 * ours_f1 == pytest.approx(float(reference["f1"]), abs=1e-4)
