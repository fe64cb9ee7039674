"""Answer matching on realistic chat-model replies, including the near misses that must fail."""

import pytest

from eu_jax.eval.answers import extract_number, is_correct, normalize_text, numeric_match, text_match


@pytest.mark.parametrize("response, answer, expected", [
    ("42", "42", True),
    ("The answer is 42.", "42", True),
    ("42.0", "42", True),
    ("**42**", "42", True),
    ("-4", "-4", True),
    ("It is −4", "-4", True),  # U+2212 minus
    ("The result is -4.", "-4", True),
    ("1,234", "1234", True),
    ("That makes 1,234 apples.", "1234", True),
    ("1234", "1,234", True),
    ("+7", "7", True),
    ("0.5", ".5", True),
    ("142", "42", False),
    ("4", "-4", False),
    ("-4", "4", False),
    ("42.5", "42", False),
    ("x2 = 5", "2", False),  # a digit inside a word is not a number
    ("5 + 3 = 8", "8", True),  # a worked sum is read after its last "="
    ("2 * 6 = 12, 12 + 1 = 13. The answer is 13.", "13", True),
    ("3 - 4 = 1", "-1", False),
    ("5 + 3 =", "8", False),
    ("It is 7 or maybe 8", "8", False),  # only one number counts
    ("I don't know", "42", False),
    ("", "42", False),
])
def test_numeric_match(response, answer, expected):
    assert numeric_match(response, answer) is expected


@pytest.mark.parametrize("response, answer, aliases, expected", [
    ("Paris.", "Paris", (), True),
    ("Paris", "paris", (), True),
    ("The capital of France is Paris", "Paris", (), True),
    ("paris is the capital", "Paris", (), True),
    ("It is Paris, France.", "Paris", (), True),
    ("Einstein", "Albert Einstein", ("Einstein",), True),
    ("It was painted by Leonardo da Vinci.", "Leonardo da Vinci", (), True),
    ("The blue whale", "blue whale", (), True),
    ("Sao Paulo", "São Paulo", (), True),
    ("Mia's dog", "Mia", (), True),
    ("Parisian", "Paris", (), False),
    ("The capital of France is Lyon", "Paris", (), False),
    ("I don't know", "Paris", (), False),
    ("whale", "blue whale", (), False),
    ("Leonardo", "Leonardo da Vinci", (), False),
    ("returns", "return", (), False),
    ("", "Paris", (), False),
])
def test_text_match(response, answer, aliases, expected):
    assert text_match(response, answer, aliases) is expected


@pytest.mark.parametrize("text, number", [
    ("The answer is 42.", "42"),
    ("It is −4", "-4"),
    ("1,234", "1234"),
    ("-1,234.50 dollars", "-1234.50"),
    ("3.14 and 2", "3.14"),
    ("x-4", "4"),  # a hyphen after a word is not a sign
    ("v1.2 then 7", "7"),
    ("Paris.", None),
])
def test_extract_number(text, number):
    assert extract_number(text) == number


@pytest.mark.parametrize("text, normal", [
    ("The Capital of FRANCE!", "capital of france"),
    ("  an   apple, a day  ", "apple day"),
    ("São Paulo", "sao paulo"),
    ("theory of the atom", "theory of atom"),
    ("Paris,France", "paris france"),
])
def test_normalize_text(text, normal):
    assert normalize_text(text) == normal


def test_is_correct_dispatches_on_kind_and_number_aliases():
    assert is_correct("There are 8 legs.", "8", "number")
    assert is_correct("A spider has eight legs.", "8", "number", aliases=("eight",))
    assert not is_correct("A spider has six legs.", "8", "number", aliases=("eight",))
    assert is_correct("It is Tokyo.", "Tokyo", "text")
    assert not is_correct("It is Kyoto.", "Tokyo", "text")
    with pytest.raises(ValueError, match="answer kind 'date'"):
        is_correct("x", "x", "date")


def test_answers_that_cannot_be_compared_are_errors():
    with pytest.raises(ValueError, match="holds no number"):
        numeric_match("42", "forty-two")
    with pytest.raises(ValueError, match="empty once normalised"):
        text_match("the", "The")
