"""Parametric RAG: the summed merge against a hand-computed delta, the five training examples,
QA parsing and its retries, batched training equal to the sequential peft loop, caching, and
one real-model training step."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from raghub.cache import Cache
from raghub import Passage, PromptTemplate, Question, Retrieved, UsageError
from raghub.models import load_model
from raghub.plugins.methods.parametric.augmentation import (
    AUGMENTATION_STYLES, Augmentation, QAPair, augment_passages, parse_fewshot_qa_pairs, parse_qa_pairs,
    training_texts)
from raghub.plugins.methods.parametric.method import Parametric
from raghub.plugins.methods.parametric.training import AdapterBank, LoraSettings, token_losses
from raghub.plugins.models.huggingface import TransformersLM

PASSAGE = Passage(id="p1", title="Ulm", text="Ulm is a city on the Danube in Germany.")
AUGMENTATION = Augmentation(
    rewrite="Ulm , a German city , lies on the Danube .",
    qa_pairs=(QAPair("Where is Ulm", "Germany", "Ulm is in Germany."),
              QAPair("Which river flows through Ulm?", "the Danube", "The Danube flows through Ulm."),
              QAPair("What is Ulm?", "a city.", "Ulm is a city.")))
GOOD_QA = ('[{"question": "Where is Ulm?", "answer": "Germany", "full_answer": "Ulm is in Germany."}, '
           '{"question": "What river?", "answer": "Danube", "full_answer": "The Danube."}, '
           '{"question": "What is Ulm?", "answer": "a city", "full_answer": "Ulm is a city."}]')


def completion_question(text: str = "Where was Einstein born?") -> Question:
    return Question(id="q", query=text, question=text, answers=["Ulm"], max_new_tokens=3,
                    template=PromptTemplate(style="completion"))


# --------------------------------------------------------------------------- merging


class OneLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up_proj = torch.nn.Linear(2, 2, bias=False)

    def forward(self, x):
        return self.up_proj(x)


def test_merged_adapters_add_up_to_the_sum_of_the_passage_deltas():
    bank = AdapterBank(OneLayer(), LoraSettings(rank=1, alpha=2.0, targets=("up_proj",)))
    a_key, b_key = sorted(bank.initial_state)  # ...lora_A.weight [1, 2], ...lora_B.weight [2, 1]
    first = {a_key: torch.tensor([[1.0, 0.0]]), b_key: torch.tensor([[1.0], [2.0]])}
    second = {a_key: torch.tensor([[0.0, 1.0]]), b_key: torch.tensor([[3.0], [1.0]])}
    # (alpha / r) (B1 A1 + B2 A2) = 2 ([[1, 0], [2, 0]] + [[0, 3], [0, 1]])
    expected_delta = torch.tensor([[2.0, 6.0], [4.0, 2.0]])
    layer = bank.lora_layers[a_key.removesuffix(".lora_A.weight")]
    with bank.merged([first, second]):
        merged_delta = layer.get_delta_weight(layer.active_adapters[0])
        output = bank.peft_model(torch.eye(2))
    torch.testing.assert_close(merged_delta, expected_delta)
    torch.testing.assert_close(output, torch.eye(2) @ (layer.base_layer.weight + expected_delta).T)
    torch.testing.assert_close(bank.peft_model(torch.eye(2)), layer.base_layer(torch.eye(2)))


# --------------------------------------------------------------------------- augmentation


def test_five_training_examples_per_passage_in_the_task_prompt_format():
    texts = training_texts(completion_question(), PASSAGE, AUGMENTATION)
    passage_block = "Passage 1: Ulm\nUlm is a city on the Danube in Germany.\n\n"
    rewrite_block = "Passage 1: Ulm , a German city , lies on the Danube .\n\n"
    assert texts == [
        (passage_block + "Question: Where is Ulm?\nAnswer:", "The answer is Germany."),
        (rewrite_block + "Question: Where is Ulm?\nAnswer:", "The answer is Germany."),
        (passage_block + "Question: Which river flows through Ulm?\nAnswer:", "The answer is the Danube."),
        (rewrite_block + "Question: Which river flows through Ulm?\nAnswer:", "The answer is the Danube."),
        ("Question: What is Ulm?\nAnswer:", "The answer is a city."),
    ]


@pytest.mark.parametrize("generated, expected_answers", [
    (GOOD_QA, ["Germany", "Danube", "a city"]),
    ("Sure! " + GOOD_QA.removesuffix("]") + ",", ["Germany", "Danube", "a city"]),  # cut off
    ('[{"question": "Q1?", "answer": "A"\n "full_answer": "F"}, {"question": "Q2?", "answer": ["x", "y"]},'
     ' {"question": "Q3?", "answer": null}]', ["A", "x, y", "Unknown"]),  # PRAG's example's missing comma
    ('[{"question": "What is the capital of France?", "answer": "Paris"},' + GOOD_QA[1:], 
     ["Germany", "Danube", "a city"]),  # the prompt's example is not a pair of the passage
    ('[{"question": "Q1?", "answer": "A"}, {"question": "Q2?"}, {"question": "Q3?", "answer": "C"}]', None),
    ("I cannot do that.", None),
])
def test_parse_qa_pairs(generated, expected_answers):
    pairs = parse_qa_pairs(generated)
    assert ([pair.answer for pair in pairs] if pairs else None) == expected_answers


@pytest.mark.parametrize("generated, expected", [
    (" Where is Ulm?\nAnswer: Germany\nQuestion: What river?\nAnswer:  the Danube \n"
     "Question: What is Ulm?\nAnswer: a city\n\n", [("Where is Ulm?", "Germany"),
                                                     ("What river?", "the Danube"), ("What is Ulm?", "a city")]),
    (" In which city is the Eiffel Tower?\nAnswer: Paris\nQuestion: Where is Ulm?\nAnswer: Germany\n"
     "Question: What river?\nAnswer: Danube\nQuestion: What is Ulm?\nAnswer: a city\nQuestion: Extra?\nAnswer: x",
     [("Where is Ulm?", "Germany"), ("What river?", "Danube"), ("What is Ulm?", "a city")]),  # copy skipped
    (" Where is Ulm?\nAnswer: Germany\nQuestion: What river?\nAnswer:\nQuestion: What is Ulm?\nAnswer: a city",
     None),  # an empty answer leaves two pairs
    (" Where is Ulm?\nAnswer: Germany\nQuestion: where is ulm?\nAnswer: Europe\nQuestion: What is Ulm?\n"
     "Answer: a city", None),  # a repeated question leaves two different pairs
])
def test_parse_fewshot_qa_pairs(generated, expected):
    pairs = parse_fewshot_qa_pairs(generated)
    assert ([(pair.question, pair.answer) for pair in pairs] if pairs else None) == expected


def test_fewshot_style_asks_for_completions_and_cuts_the_rewrite_at_a_blank_line():
    style = AUGMENTATION_STYLES["fewshot"]
    assert not style.chat and style.qa_prompt.format(passage="Ulm is a city.").endswith(
        "Passage: Ulm is a city.\nQuestion:")
    assert style.read_rewrite(" Ulm, a city.\n\nPassage: more") == "Ulm, a city."


def test_fewshot_style_asks_one_question_per_question_word():
    style = AUGMENTATION_STYLES["fewshot"]
    requests = style.qa_requests("Ulm is a city.")
    assert [r.removeprefix(style.qa_prompt.format(passage="Ulm is a city.")) for r in requests] == [
        " What", " Who", " When"]
    replies = [" is Ulm?\nAnswer: a city\nQuestion: Where?", " founded Ulm?\nAnswer: nobody knows\n\nPassage:",
               " was Ulm founded?\nAnswer: 850"]
    assert [(p.question, p.answer) for p in style.read_qa(replies)] == [
        ("What is Ulm?", "a city"), ("Who founded Ulm?", "nobody knows"), ("When was Ulm founded?", "850")]
    assert style.read_qa([" is Ulm?\nAnswer: a city", " founded Ulm?\nAnswer:\n", " was it?\nAnswer: 850"]) == ()


def test_qa_output_that_never_parses_is_retried_then_left_empty():
    calls = []

    def generate(messages, attempt):
        calls.append((len(messages), attempt))
        return [GOOD_QA if "passage two" in m and "three different questions" in m else "no json"
                for m in messages]

    made = augment_passages(["passage one", "passage two"], generate, retries=2)
    assert calls == [(2, 0), (2, 0), (1, 1), (1, 2)]  # rewrites, QA, then only the failure twice more
    assert made[0].qa_pairs == () and len(made[1].qa_pairs) == 3
    assert made[0].rewrite == "no json"


# --------------------------------------------------------------------------- training


def tiny_language_model() -> TransformersLM:
    words = sorted(set((" ".join([PASSAGE.as_text(), AUGMENTATION.rewrite, GOOD_QA, "The answer is"] +
                                  [p.question + " " + p.answer for p in AUGMENTATION.qa_pairs])).split()))
    vocab = {"[PAD]": 0, "[UNK]": 1, **{word: i + 2 for i, word in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                        eos_token="[PAD]")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %} Reply:"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=0, eos_token_id=0)
    return TransformersLM(LlamaForCausalLM(config), tokenizer, "tiny-llama", batch_size=4)


def test_batched_training_gives_the_adapters_of_the_sequential_peft_loop():
    bank = AdapterBank(tiny_language_model().hf_model, LoraSettings(learning_rate=1e-2, epochs=2))
    generator = torch.Generator().manual_seed(1)
    examples = [[torch.randint(1, 20, (length,), generator=generator).tolist() for length in lengths]
                for lengths in ([5, 9, 3], [12, 4, 7], [6, 6, 11])]
    sequential, batched = bank.train_sequential(examples), bank.train_batched(examples)
    for one_by_one, together in zip(sequential, batched):
        assert one_by_one.keys() == together.keys() == bank.initial_state.keys()
        for key in one_by_one:
            torch.testing.assert_close(together[key], one_by_one[key], rtol=1e-4, atol=1e-5)
    moved = max((sequential[0][key] - bank.initial_state[key]).abs().max() for key in bank.initial_state)
    assert moved > 1e-3  # training changed the adapter, so the comparison means something


def fake_sample(messages, attempt):
    return [GOOD_QA if "three different questions" in m else AUGMENTATION.rewrite for m in messages]


def parametric(tmp_path, model, **options) -> Parametric:
    augmenter = Parametric(model, Cache(tmp_path), parallel_adapters=2, **options)
    augmenter.sample = fake_sample
    return augmenter


def count_trained(monkeypatch) -> list[int]:
    trained: list[int] = []
    train = Parametric._train

    def spy(self, examples_per_passage):
        trained.append(len(examples_per_passage))
        return train(self, examples_per_passage)

    monkeypatch.setattr(Parametric, "_train", spy)
    return trained


def test_cached_adapters_are_not_trained_again(tmp_path, monkeypatch):
    trained = count_trained(monkeypatch)
    model = tiny_language_model()
    other = Passage(id="p2", title="Danube", text="The Danube flows through Ulm .")
    questions = [completion_question(), completion_question("Where is Ulm?")]
    retrieved = [[Retrieved(PASSAGE, 2.0), Retrieved(other, 1.0)], [Retrieved(other, 3.0)]]

    first = parametric(tmp_path, model)
    assert len(first.answer(questions, retrieved)) == 2
    first.close()
    assert trained == [2]
    assert first.run_stats() == {"passages_augmented": 2, "adapters_trained": 2, "adapters_from_cache": 0,
                                 "passages_unparseable": 0}

    again = parametric(tmp_path, model, combine=True)  # same training settings: same adapters
    again.answer(questions, retrieved)
    again.close()
    assert trained == [2]
    assert again.run_stats()["adapters_from_cache"] == 2 and again.run_stats()["passages_augmented"] == 0

    retrained = parametric(tmp_path, model, learning_rate=1e-3)
    retrained.answer(questions[:1], retrieved[:1])
    retrained.close()
    assert trained == [2, 2]


def test_unparseable_passage_is_skipped_and_counted(tmp_path, monkeypatch):
    trained = count_trained(monkeypatch)
    model = tiny_language_model()
    prompts: list[str] = []
    generate = model.generate
    monkeypatch.setattr(model, "generate", lambda batch, n: prompts.extend(batch) or generate(batch, n))
    augmenter = parametric(tmp_path, model, augment_retries=1, combine=True)
    augmenter.sample = lambda messages, attempt: ["not json"] * len(messages)
    answers = augmenter.answer([completion_question()], [[Retrieved(PASSAGE, 1.0)]])
    augmenter.close()
    assert len(answers) == 1 and trained == []
    assert augmenter.run_stats()["passages_unparseable"] == 1
    assert PASSAGE.text in prompts[-1]  # --combine still shows the passage, as PRAG does


def test_bad_settings_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="--lora-rank"):
        Parametric(tiny_language_model(), Cache(tmp_path), lora_rank=0)
    augmenter = Parametric(tiny_language_model(), Cache(tmp_path), lora_targets="no_such_layer")
    with pytest.raises(UsageError, match="--lora-targets"):
        augmenter.bank


@pytest.mark.real_model
def test_one_adapter_on_the_real_model_lowers_its_training_loss(tmp_path):
    augmenter = Parametric(load_model(None), Cache(tmp_path))
    examples = [augmenter._token_ids(*text) for text in training_texts(completion_question(), PASSAGE, AUGMENTATION)]

    def loss(adapters):
        with augmenter.bank.merged(adapters), torch.no_grad():
            return sum(float(token_losses(augmenter.bank.peft_model(input_ids=torch.tensor([ids])).logits,
                                          torch.tensor([ids]), torch.ones(1, len(ids)))) for ids in examples)

    [adapter] = augmenter.bank.train_sequential([examples])
    assert loss([adapter]) < loss([]) - 0.1
    augmenter.close()
