"""A fixed set of short factual questions: does a compressed model still answer?

Each question is asked alone through the model's chat template (no system prompt, greedy
decoding, at most :data:`MAX_ANSWER_TOKENS` new tokens) and scored correct when the answer
contains one of its accepted keywords (case-insensitive, whole words). The same questions
run in pvtune (:func:`ask_pvtune`) and in llama.cpp on a GGUF file
(:func:`pvtune.export.llamacpp.ask_llamacpp`), so a file is judged as its engine runs it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

MAX_ANSWER_TOKENS = 40


@dataclass(frozen=True)
class Question:
    """A question and the keywords any of which makes an answer correct."""

    text: str
    keywords: tuple[str, ...]

    def is_answered_by(self, answer: str) -> bool:
        """Whether ``answer`` contains one of the keywords as a whole word (a number only as
        a whole number: "0" is not in "100.0", "7" not in "12.7")."""
        return any(re.search(rf"(?<!\w)(?<!\d\.){re.escape(k)}(?!\w)(?!\.\d)", answer,
                             re.IGNORECASE) for k in self.keywords)


QUESTIONS: tuple[Question, ...] = (
    Question("What is the capital of France?", ("Paris",)),
    Question("What is the capital of Japan?", ("Tokyo",)),
    Question("What is the capital of Italy?", ("Rome",)),
    Question("What is the capital of Germany?", ("Berlin",)),
    Question("What is the capital of Spain?", ("Madrid",)),
    Question("What is the capital of the United Kingdom?", ("London",)),
    Question("What is the capital of Russia?", ("Moscow",)),
    Question("What is the capital of Egypt?", ("Cairo",)),
    Question("What is the largest planet in our solar system?", ("Jupiter",)),
    Question("Which planet is known as the Red Planet?", ("Mars",)),
    Question("What star does the Earth orbit?", ("Sun",)),
    Question("What is the chemical symbol for water?", ("H2O", "H₂O")),
    Question("What gas do plants absorb from the air for photosynthesis?",
             ("carbon dioxide", "CO2", "CO₂")),
    Question("What is the freezing point of water in degrees Celsius?", ("0", "zero")),
    Question("How many days are there in a week?", ("7", "seven")),
    Question("How many continents are there on Earth?", ("7", "seven")),
    Question("How many legs does a spider have?", ("8", "eight")),
    Question("What is 2 plus 2?", ("4", "four")),
    Question("What is 10 times 10?", ("100", "one hundred", "a hundred")),
    Question("Who wrote the play Romeo and Juliet?", ("Shakespeare",)),
    Question("Who painted the Mona Lisa?", ("Leonardo", "da Vinci")),
    Question("Who was the first president of the United States?", ("Washington",)),
    Question("Who developed the theory of relativity?", ("Einstein",)),
    Question("What is the largest ocean on Earth?", ("Pacific",)),
    Question("What is the longest river in Africa?", ("Nile",)),
    Question("What is the tallest mountain in the world?", ("Everest",)),
    Question("What language is mainly spoken in Brazil?", ("Portuguese",)),
    Question("What is the official language of Mexico?", ("Spanish",)),
    Question("What color is the sky on a clear day?", ("blue",)),
    Question("What do bees make?", ("honey",)),
    Question("What is the largest mammal?", ("blue whale", "whale")),
    Question("What is the boiling point of water in degrees Celsius?", ("100",)),
    Question("In which country are the pyramids of Giza?", ("Egypt",)),
    Question("What is the hardest natural substance?", ("diamond", "diamonds")),
    Question("Which organ pumps blood through the human body?", ("heart",)),
    Question("What is the currency of the United States?", ("dollar", "dollars", "USD")),
    Question("How many hours are there in a day?", ("24", "twenty-four")),
    Question("What is the main ingredient of guacamole?", ("avocado", "avocados")),
    Question("Which animal is known as the king of the jungle?", ("lion",)),
    Question("What is the opposite of hot?", ("cold",)),
)


@dataclass
class QuestionResult:
    """One question, the answer given and whether it was correct."""

    question: str
    answer: str
    correct: bool


@dataclass
class QuestionScore:
    """The answers to a question set and how many were correct."""

    results: list[QuestionResult]

    @property
    def correct(self) -> int:
        """Correct answers."""
        return sum(r.correct for r in self.results)

    @property
    def accuracy(self) -> float:
        """Share of questions answered correctly."""
        return self.correct / len(self.results) if self.results else 0.0

    def to_dict(self) -> dict:
        """JSON-ready record."""
        return {"correct": self.correct, "total": len(self.results), "accuracy": self.accuracy,
                "answers": [vars(r) for r in self.results]}


def score(answer_fn: Callable[[str], str],
          questions: Sequence[Question] = QUESTIONS) -> QuestionScore:
    """Ask every question through ``answer_fn(question) -> answer`` and score the answers."""
    results = []
    for q in questions:
        answer = answer_fn(q.text).strip()
        results.append(QuestionResult(q.text, answer, q.is_answered_by(answer)))
    return QuestionScore(results)


def ask_pvtune(model: nn.Module, tokenizer,
               max_new_tokens: int = MAX_ANSWER_TOKENS) -> Callable[[str], str]:
    """An ``answer_fn`` for :func:`score`: greedy chat-template answers from a pvtune model."""
    from pvtune.llm.chat import stream_generate

    def answer(question: str) -> str:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                            add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
        text, _ = stream_generate(model, tokenizer, ids, max_new_tokens)
        return text

    return answer
