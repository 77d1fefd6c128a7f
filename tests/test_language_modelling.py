"""The language-modelling family: text loading, windows, passages, metrics, method scoring."""

import json
import math
import os
from pathlib import Path

import pytest
import torch

from plugin_packages import ShortModel
from raghub import Method, Passage, Retrieved, RunError, UsageError, Window, mixture_logprobs, score_after_prefixes
from raghub.interfaces import PASSAGES_DROPPED
from raghub.plugins.methods.ensemble import Ensemble
from raghub.plugins.methods.incontext import InContext
from raghub.plugins.methods.none import ClosedBook
from raghub.plugins.tasks.language_modelling import LanguageModelling, chunk_passages, text_lines
from raghub.settings import read_task_definition
from raghub.worklog import first_words

TASKS = Path(__file__).resolve().parents[1] / "tasks"
TOY_ROWS = ["", " = First = \n", "", " Ab cd é.\n", " Ef gh.\n", "", " = Second = \n", "", " Ij kl.\n"]
TOY_TEXT = " = First = \n Ab cd é.\n Ef gh.\n = Second = \n Ij kl.\n"


class CharTokenizer:
    """One token per character, with the offsets a fast tokenizer reports."""

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
        return {"input_ids": [ord(ch) for ch in text],
                "offset_mapping": [(i, i + 1) for i in range(len(text))]}


class CharModel:
    tokenizer = CharTokenizer()

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


class HalfEachToken(Method):
    """A model that gives every target token probability 1/2."""

    name = "half"

    def score_windows(self, windows, retrieved):
        return [torch.full((len(w.target_ids),), math.log(0.5)) for w in windows]


def toy_task(tmp_path, rows=TOY_ROWS, **options):
    folder = tmp_path / "wikitext"
    folder.mkdir(exist_ok=True)
    (folder / "toy.test.rows.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    config = {
        "name": "toy", "family": "language-modelling",
        "data": {"hub": "none", "config": "toy", "folder": "wikitext",
                 "files": {"test": ["toy.test.rows.jsonl"], "train": ["toy.train.rows.jsonl"]}},
        "passages": {"words": 64, "min_words": 10},
        "windows": {"context_len": 3, "pred_len": 4, "retrieved_max_length": 8},
        "ralm": {"query_len": 2, "max_length": 12, "retrieved_max_length": 4},
    }
    return LanguageModelling("toy", config, str(tmp_path), **options)


def test_the_task_s_fingerprint_changes_with_the_text_it_evaluates(tmp_path):
    """Regression: the fingerprint, which recognises a stored run and names a resume file, held
    the split file's name but not its content, so a run after the text changed was served the
    old run's record."""
    before = toy_task(tmp_path).fingerprint()
    assert toy_task(tmp_path, rows=[*TOY_ROWS, " Mn op.\n"]).fingerprint() != before


def test_raw_joined_and_row_formats_give_the_same_text(tmp_path):
    raw = tmp_path / "wiki.test.raw"
    raw.write_bytes(TOY_TEXT.replace("\n", "\r\n").encode())
    joined = "\n\n".join(TOY_ROWS)
    assert text_lines([raw.read_text(encoding="utf-8")]) == text_lines(TOY_ROWS) == text_lines([joined])
    assert "".join(line + "\n" for line in text_lines(TOY_ROWS)) == TOY_TEXT


@pytest.mark.parametrize("datastore", ["train", "heldout-articles"])
def test_windows_score_every_token_after_the_first_exactly_once(tmp_path, datastore):
    task = toy_task(tmp_path, datastore=datastore)
    windows = task.examples(CharModel(), None)
    ids = [ord(ch) for ch in TOY_TEXT]
    assert [t for w in windows for t in w.target_ids] == ids[1:]
    position = 1
    for window in windows:
        assert window.context_ids == ids[max(0, position - 3) : position]
        assert len(window.target_ids) <= 5  # pred_len + 1
        position += len(window.target_ids)
    # 'é' is two bytes: the spans' bytes add up to the text's bytes after its first token
    assert sum(w.n_bytes for w in windows) == len(TOY_TEXT.encode()) - 1
    assert windows[0].query == "" and windows[1].query == TOY_TEXT[3:6]


def test_each_window_and_its_line_in_the_samples_log_start_with_its_scored_text(tmp_path):
    task = toy_task(tmp_path)
    windows = task.examples(CharModel(), None)
    assert [w.text_start for w in windows] == [first_words(CharModel().decode(w.target_ids)) for w in windows]
    assert windows[0].text_start == "= Fir"  # the 5 tokens after the first of " = First = \n"
    line = task.sample_log(windows[0], {"id": windows[0].id, "nll": 1.0, "retrieved": []})
    assert line == {"id": windows[0].id, "text": "= Fir", "nll": 1.0, "retrieved": []}


def test_heldout_windows_stay_inside_one_article_and_exclude_it(tmp_path):
    windows = toy_task(tmp_path, datastore="heldout-articles").examples(CharModel(), None)
    second_article_starts = TOY_TEXT.index(" = Second")
    position = 1
    for window in windows:
        end = position + len(window.target_ids)
        assert not position < second_article_starts < end
        assert window.exclude_group == ("First" if position < second_article_starts else "Second")
        position = end
    assert all(w.exclude_group == "" for w in toy_task(tmp_path, datastore="train").examples(CharModel(), None))


def test_heldout_text_before_the_first_article_title_is_excluded_from_its_own_windows(tmp_path):
    """Regression: the lines before the first ` = Title = ` line had no article (group ""), and
    a window with no group excludes nothing, so its passages, holding the very text the window
    scores, were retrievable by it under --datastore heldout-articles."""
    preamble = " ".join(f"w{i}" for i in range(12))
    rows = [preamble + "\n", " = First = \n", " ".join(["a"] * 12) + "\n"]
    task = toy_task(tmp_path, rows, datastore="heldout-articles")
    passages, _ = task.corpus()
    own = [p for p in passages if p.text == preamble]
    windows = task.examples(CharModel(), None)
    in_preamble = [w for w in windows if int(w.id.split("-")[1]) < len(preamble)]
    assert own and in_preamble
    assert all(w.exclude_group and w.exclude_group == own[0].group for w in in_preamble)


def test_heldout_articles_of_a_text_with_one_article_is_refused(tmp_path):
    """A text without two articles leaves every window nothing to retrieve: a run that says it
    retrieves while scoring as closed-book."""
    rows = [" ".join(["a"] * 12) + "\n", " ".join(["b"] * 12) + "\n"]
    with pytest.raises(UsageError, match="heldout-articles needs at least two articles"):
        toy_task(tmp_path, rows, datastore="heldout-articles").corpus()


def test_ralm_stride_windows(tmp_path):
    windows = toy_task(tmp_path, stride=2).examples(CharModel(), 4)
    ids = [ord(ch) for ch in TOY_TEXT]
    assert [w.target_ids for w in windows] == [ids[1:3], ids[3:5], ids[5:7], ids[7:9]]
    # the context leaves room for a 4-token document and the span within max_length 12
    assert windows[3].context_ids == ids[1:7] and windows[3].query == TOY_TEXT[5:7]
    assert windows[3].retrieved_max_length == 4


def test_bits_per_byte_of_a_known_model_output(tmp_path):
    task = toy_task(tmp_path)
    windows = task.examples(CharModel(), None)
    metrics = task.aggregate(task.evaluate(HalfEachToken(None, None), windows, [[] for _ in windows]))
    # 51 characters, 52 bytes ('é'); 50 scored tokens of 51 bytes, each costing ln 2
    assert metrics["nats_per_token"] == pytest.approx(math.log(2))
    assert metrics["ppl"] == pytest.approx(2.0)
    assert metrics["bits_per_byte"] == pytest.approx(50 / 51)


def test_passages_are_64_word_chunks_of_rows_with_10_words_or_more():
    lines = [" ".join(f"w{i}" for i in range(130)), "too short to keep", " ".join(["x"] * 10)]
    passages = chunk_passages(lines, ["A", "B", "C"], "toy")
    assert [len(p.text.split()) for p in passages] == [64, 64, 2, 10]
    assert [p.group for p in passages] == ["A", "A", "A", "C"]


def test_heldout_corpus_comes_from_the_evaluated_split_by_article(tmp_path):
    long_rows = [" = Alpha = \n", " ".join(["a"] * 12) + "\n", " = Beta = \n", " ".join(["b"] * 12) + "\n"]
    passages, label = toy_task(tmp_path, long_rows, datastore="heldout-articles").corpus()
    assert [p.group for p in passages] == ["Alpha", "Beta"] and "heldout-articles" in label


def test_corpus_option_replaces_the_datastore(tmp_path):
    text_file = tmp_path / "notes.txt"
    text_file.write_text(" = Gamma = \n" + " ".join(["g"] * 70) + "\n")
    passages, label = toy_task(tmp_path, corpus=str(text_file), datastore="heldout-articles").corpus()
    assert [len(p.text.split()) for p in passages] == [64, 6] and label == "corpus file notes.txt"
    assert toy_task(tmp_path, corpus=str(text_file), datastore="heldout-articles").heldout_articles is False


def test_missing_train_split_names_the_file_and_where_to_get_it(tmp_path):
    with pytest.raises(UsageError, match=r"toy.train.rows.jsonl .*load_dataset"):
        toy_task(tmp_path, datastore="train").corpus()


def test_auto_datastore_is_train_when_present_else_heldout_articles_with_a_notice(tmp_path, capsys):
    task = toy_task(tmp_path)
    task.check()
    assert task.datastore == "heldout-articles" and "heldout-articles" in task.corpus()[1]
    assert capsys.readouterr().err == ""  # said when the windows are made, not while checking
    task.examples(CharModel(), None)
    assert "no train split" in capsys.readouterr().err
    (tmp_path / "wikitext" / "toy.train.rows.jsonl").write_text(json.dumps({"text": TOY_ROWS[3]}) + "\n")
    with_train = toy_task(tmp_path)
    assert with_train.datastore == "train" and with_train.fingerprint()["datastore"] == "train"
    assert with_train.corpus()[1].startswith("toy train") and capsys.readouterr().err == ""


def test_the_no_train_split_notice_comes_from_rank_0_only(tmp_path, capsys, monkeypatch):
    """Regression: under torchrun every rank printed it."""
    from raghub import distributed

    monkeypatch.setattr(distributed, "ranks", lambda: distributed.Ranks(rank=1, world_size=2, local_rank=1))
    toy_task(tmp_path).examples(CharModel(), None)
    assert capsys.readouterr().err == ""


def test_a_hub_failure_is_one_line_saying_what_to_do(tmp_path, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'Salesforce/wikitext' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    task = toy_task(tmp_path)
    task.data_dir = None  # no data folder: the hub
    with pytest.raises(UsageError, match=r"hub could not provide none \(toy, test\): Couldn't reach .*"
                                         r"set RAGHUB_DATA_DIR"):
        task.lines


# --- windows and passages longer than the model takes -------------------------------------

def window(context: int = 3, targets: int = 5) -> Window:
    return Window(id="w", query="q", context_ids=[99] * context, target_ids=[98] * targets, retrieved_max_length=8)


def ranked_passages(count: int) -> list[Retrieved]:
    """`count` passages that each become 8 tokens (7 characters and a newline), best first."""
    return [Retrieved(Passage(f"p{rank}", str(rank) * 20), -float(rank)) for rank in range(1, count + 1)]


def test_passages_that_would_not_fit_the_model_are_left_out_lowest_ranked_first_and_counted(capsys):
    model = ShortModel(length=30)  # the window's 8 tokens leave room for two passages of 8
    InContext(model, None).score_windows([window(), window()], [ranked_passages(4), ranked_passages(2)])
    assert model.scored == [[ord(c) for c in "1111111\n2222222\n"] + [99] * 3 + [98] * 5] * 2
    assert model.counters[PASSAGES_DROPPED] == 2
    notices = capsys.readouterr().err.splitlines()
    assert len(notices) == 1 and "window w: its 4 passages and its tokens are more than the 30 short takes" in notices[0]


def test_an_ensemble_passage_that_would_not_fit_is_left_out_and_counted():
    model = ShortModel(length=15)  # the window's 8 tokens leave room for 7: no passage of 8
    Ensemble(model, None).score_windows([window()], [ranked_passages(2)])
    assert model.scored == [[99] * 3 + [98] * 5] * 2
    assert model.counters[PASSAGES_DROPPED] == 2


def test_a_window_or_prefix_longer_than_the_model_takes_is_one_line():
    with pytest.raises(RunError, match="window w: its 12 tokens of context and targets are more than the 10 short takes"):
        ClosedBook(ShortModel(length=10), None).score_windows([window(4, 8)], [[]])
    with pytest.raises(RunError, match="window w: the 3 tokens put before it leave it no room within the 10 tokens"):
        score_after_prefixes(ShortModel(length=10), [window()], [[1, 2, 3]])


@pytest.mark.real_model
def test_real_test_split_reads_the_same_from_every_file():
    folder = Path(os.environ.get("RAGHUB_DATA_DIR", "../shared/data")) / "wikitext"
    if not folder.is_dir():
        pytest.skip("needs RAGHUB_DATA_DIR with wikitext/")
    definition = read_task_definition(TASKS / "wikitext2.yaml")
    texts = []
    for name in definition["data"]["files"]["test"]:
        if (folder / name).is_file():
            definition["data"]["files"]["test"] = [name]
            texts.append(LanguageModelling("wikitext2", definition, str(folder.parent)).lines)
    assert len(texts) == 3 and texts[0] == texts[1] == texts[2]


@pytest.fixture(scope="module")
def model():
    from raghub.models import load_model

    return load_model(None)


@pytest.fixture(scope="module")
def real_windows(model):
    data_dir = os.environ.get("RAGHUB_DATA_DIR", "../shared/data")
    if not (Path(data_dir) / "wikitext").is_dir():
        pytest.skip("needs RAGHUB_DATA_DIR with wikitext/")
    definition = read_task_definition(TASKS / "wikitext2.yaml")
    task = LanguageModelling("wikitext2", definition, data_dir, context_len=32, pred_len=47)
    return task.examples(model, 4)


@pytest.mark.real_model
def test_none_matches_a_plain_transformers_forward_pass(model, real_windows):
    from transformers import AutoModelForCausalLM

    from raghub.plugins.models.huggingface import GGUF

    plain = AutoModelForCausalLM.from_pretrained(GGUF().location(None)[1], dtype=torch.float32).eval()
    ours = ClosedBook(model, None).score_windows(real_windows, [[] for _ in real_windows])
    for window, scored in zip(real_windows, ours):
        ids = torch.tensor([window.context_ids + window.target_ids])
        with torch.no_grad():
            logits = plain(ids).logits[0, len(window.context_ids) - 1 : -1]
        expected = logits.log_softmax(-1).gather(-1, ids[0, len(window.context_ids):, None])[:, 0]
        assert torch.allclose(scored, expected, atol=1e-4)


@pytest.mark.real_model
def test_batched_ensemble_equals_mixing_single_passage_scores(model, real_windows):
    short = Passage("p1", "The Bill is a British police drama .", group="g")
    long = Passage("p2", "Robert Boulter is an English film , television and theatre actor . " * 3)
    docs = [Retrieved(short, 2.0), Retrieved(long, 1.0)]
    windows = real_windows[1:3]
    mixed = Ensemble(model, None).score_windows(windows, [docs, docs[:1]])
    single = [InContext(model, None).score_windows(windows, [[d]] * 2) for d in docs]
    expected = mixture_logprobs(torch.stack([single[0][0], single[1][0]]), torch.tensor([2.0, 1.0]))
    assert torch.allclose(mixed[0], expected, atol=1e-4)
    assert torch.allclose(mixed[1], single[0][1], atol=1e-4)
