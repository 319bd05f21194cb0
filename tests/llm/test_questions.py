"""The factual question set: at least 30 questions, keywords matched as whole words,
scores counted from the answers given."""

from __future__ import annotations

import torch

from pvtune.llm.questions import QUESTIONS, Question, ask_pvtune, score


def test_the_set_is_large_and_well_formed():
    assert len(QUESTIONS) >= 30
    assert len({q.text for q in QUESTIONS}) == len(QUESTIONS)
    assert all(q.keywords and q.text.endswith("?") for q in QUESTIONS)


def test_keywords_match_whole_words_case_insensitively():
    q = Question("What is the capital of France?", ("Paris",))
    assert q.is_answered_by("The capital of France is paris.")
    assert not q.is_answered_by("Parisian cafés are famous.")
    assert not q.is_answered_by("Lyon")
    four = Question("What is 2 plus 2?", ("4", "four"))
    assert four.is_answered_by("2 + 2 = 4") and not four.is_answered_by("It is 14.")
    assert four.is_answered_by("It is 4.") and not four.is_answered_by("about 12.4 or 4.5")
    zero = Question("What is the freezing point of water in degrees Celsius?", ("0",))
    assert zero.is_answered_by("0 degrees") and not zero.is_answered_by("100.0 degrees")


def test_score_counts_correct_answers():
    answers = {q.text: (q.keywords[0] if i % 2 == 0 else "I do not know")
               for i, q in enumerate(QUESTIONS)}
    result = score(answers.__getitem__)
    assert result.correct == (len(QUESTIONS) + 1) // 2
    assert result.accuracy == result.correct / len(QUESTIONS)
    record = result.to_dict()
    assert record["total"] == len(QUESTIONS) and len(record["answers"]) == len(QUESTIONS)


def test_pvtune_answers_through_the_chat_template(tmp_path):
    from tests.llm.conftest import build_model, build_tokenizer

    tok = build_tokenizer(tmp_path)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                         "{% endfor %}assistant:")
    model = build_model("llama", len(tok)).eval()
    seen = []
    answer = ask_pvtune(model, tok, max_new_tokens=3)
    original = tok.apply_chat_template

    def spy(turns, **kwargs):
        seen.append(turns)
        return original(turns, **kwargs)

    tok.apply_chat_template = spy
    with torch.no_grad():
        text = answer("What is the capital of France?")
    assert isinstance(text, str)
    assert seen == [[{"role": "user", "content": "What is the capital of France?"}]]
