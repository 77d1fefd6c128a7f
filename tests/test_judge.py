"""The LLM judge: its statistics against hand computations, the `correctness` judge's yes / no
read from hand-made log-probs, and `raghub judge` of a stored run with a scripted judge model
(cached per example and prompt, so judging again asks the model nothing)."""

import json
import math

import pytest
import torch
from click.testing import CliRunner

from raghub import hookimpl
from raghub.cli import cli
from raghub.judges import Judgeable, verdict
from raghub.metrics import cohen_kappa, confusion_counts, repeated_judgement, self_agreement, yes_probability
from raghub.plugins.judges.correctness import Correctness
from scripted import ROWS, ScriptedModel, write_task


# --- the statistics, by hand ------------------------------------------------------------------

def test_yes_probability_renormalises_the_two_answers():
    assert yes_probability(math.log(0.6), math.log(0.2)) == pytest.approx(0.75)  # 0.6 / (0.6 + 0.2)
    assert yes_probability(-1.0, -1.0) == 0.5
    # at temperature 1/2 the odds 3 : 1 are squared: 9 / 10
    assert yes_probability(math.log(0.6), math.log(0.2), temperature=0.5) == pytest.approx(0.9)
    assert yes_probability(0.0, -5000.0) == 1.0  # no overflow


def test_yes_probability_is_undefined_when_the_log_odds_are():
    # neither answer possible, or a NaN log-prob: no p(yes), not one near 0 that reads as "no"
    assert math.isnan(yes_probability(-math.inf, -math.inf))
    assert math.isnan(yes_probability(math.nan, -1.0)) and math.isnan(yes_probability(-1.0, math.nan))


def test_repeated_judgement_standard_error_by_hand():
    # three questions judged three times: means 1, 1/3, 0 -> accuracy 4/9
    verdicts = [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    accuracy, se, within = repeated_judgement(verdicts)
    assert accuracy == pytest.approx(4 / 9)
    # within: the sample variances (R − 1) of each question's verdicts, 0, 1/3, 0 -> mean 1/9
    assert within == pytest.approx(1 / 9)
    # s²(m) of 1, 1/3, 0 about 4/9: (25/81 + 1/81 + 16/81) / 2 = 21/81;
    # between = 21/81 − (1/9)/3 = 18/81; se² = (18/81)/3 + (1/9)/9 = 6/81 + 1/81 = 7/81
    assert se == pytest.approx(math.sqrt(7 / 81))
    one_repeat = repeated_judgement([[1], [0], [1], [1]])
    assert one_repeat[0] == 0.75 and one_repeat[2] is None
    assert one_repeat[1] == pytest.approx(math.sqrt(0.25 / 4))  # the plain standard error of the mean


def test_self_agreement_by_hand():
    # pairs per question: 3; [1,1,1] agrees 3, [1,0,0] agrees 1, [0,1,0] agrees 1 -> (1 + 1/3 + 1/3) / 3
    assert self_agreement([[1, 1, 1], [1, 0, 0], [0, 1, 0]]) == pytest.approx(5 / 9)
    assert self_agreement([[1], [0]]) is None


def test_cohen_kappa_by_hand_and_against_sklearn():
    from sklearn.metrics import cohen_kappa_score

    judge = [1, 1, 1, 0, 0, 1, 0, 1]
    match = [1, 1, 0, 0, 0, 1, 1, 1]
    assert confusion_counts(judge, match) == {"both_1": 4, "only_a": 1, "only_b": 1, "both_0": 2}
    # p_o = 6/8; p_e = (5/8)(5/8) + (3/8)(3/8) = 34/64; kappa = (48/64 − 34/64) / (30/64) = 14/30
    assert cohen_kappa(judge, match) == pytest.approx(14 / 30)
    assert cohen_kappa(judge, match) == pytest.approx(cohen_kappa_score(judge, match))
    assert cohen_kappa([1, 1], [1, 1]) is None  # chance agrees on everything


def test_a_verdict_is_the_likelier_answer_at_temperature_zero_and_a_seeded_draw_above():
    assert verdict(0.51, 0.0, "any") == 1.0 and verdict(0.49, 0.0, "any") == 0.0
    draws = [verdict(0.7, 1.0, ("q", repeat)) for repeat in range(400)]
    assert draws == [verdict(0.7, 1.0, ("q", repeat)) for repeat in range(400)]  # reproducible
    assert 0.6 < sum(draws) / len(draws) < 0.8
    assert sum(verdict(0.7, 0.05, ("q", r)) for r in range(100)) == 100  # nearly greedy


# --- the correctness judge's read-out -----------------------------------------------------------

class JudgeModel(ScriptedModel):
    """A judge model whose log-probs of "Yes" and "No" come from `logprobs(prompt)`, each as one
    token; counts what it is asked."""

    def __init__(self, logprobs):
        super().__init__(lambda prompt: "")
        self.logprobs = logprobs
        self.asked = []

    def chat_prompt(self, message):
        return message

    def continuation_logprobs(self, prompts, continuations):
        self.asked += list(zip(prompts, continuations))
        return [torch.tensor([self.logprobs(prompt)[text]]) for prompt, text in zip(prompts, continuations)]


def test_correctness_reads_yes_against_no_from_hand_made_logprobs():
    model = JudgeModel(lambda prompt: {"Yes": math.log(0.3), "No": math.log(0.1)} if "Ulm" in prompt
                       else {"Yes": math.log(0.1), "No": math.log(0.4)})
    examples = [Judgeable("Where?", ("Ulm",), "in Ulm"), Judgeable("Where?", ("Bonn",), "Paris")]
    for prompt in range(Correctness.n_prompts):
        (p_right, raw), (p_wrong, _) = Correctness(model).p_yes(examples, prompt)
        assert p_right == pytest.approx(0.75) and p_wrong == pytest.approx(0.2)
        assert raw == {"logprob_yes": pytest.approx(math.log(0.3)), "logprob_no": pytest.approx(math.log(0.1))}
    assert len({prompt for prompt, _ in model.asked}) == 2 * Correctness.n_prompts  # paraphrases differ


# --- raghub judge on a stored run ---------------------------------------------------------------

class JudgeBackendPlugin:
    """`--judge-model judge`: the test's JudgeModel."""

    model = None

    @hookimpl
    def register_models(self, register):
        from raghub import ModelBackend

        class JudgeBackend(ModelBackend):
            name = "judge-backend"

            @classmethod
            def handles(cls, spec):
                return spec == "judge"

            def load(self, spec, device, dtype, batch_size):
                return JudgeBackendPlugin.model

        register(JudgeBackend)


@pytest.fixture
def stored_run(tmp_path, monkeypatch, add_plugin):
    """A `raghub score` run of the tiny task: q1 answered right (EM 1), q2 wrong; the judge model
    says yes to q1's prediction, and to q2's only under the first prompt."""
    monkeypatch.setenv("RAGHUB_CACHE", str(tmp_path / "cache"))
    task = write_task(tmp_path)
    (tmp_path / "p.jsonl").write_text(json.dumps({"id": "q1", "prediction": ROWS[0]["answer"]}) + "\n"
                                      + json.dumps({"id": "q2", "prediction": "the Delta River"}) + "\n")
    out = CliRunner().invoke(cli, ["score", "--task", str(task), "--data-dir", str(tmp_path / "data"), "--json",
                                   "--results-dir", str(tmp_path / "results"), str(tmp_path / "p.jsonl")])
    assert out.exit_code == 0, out.output
    sure, unsure = {"Yes": math.log(0.9), "No": math.log(0.1)}, {"Yes": math.log(0.1), "No": math.log(0.9)}
    JudgeBackendPlugin.model = JudgeModel(lambda prompt: sure if "Ulm" in prompt or prompt.startswith("Question:")
                                          else unsure)
    add_plugin(JudgeBackendPlugin())
    return tmp_path / "results", json.loads(out.stdout)


def judge(results, *args):
    return CliRunner().invoke(cli, ["judge", "latest", "--judge-model", "judge", "--json",
                                    "--results-dir", str(results), *map(str, args)])


def test_judging_a_stored_run_by_hand(stored_run):
    results, scored = stored_run
    out = judge(results, "--judge-repeats", 3)
    assert out.exit_code == 0, out.output
    record = json.loads(out.stdout)
    # q1: yes, yes, yes; q2: yes under prompt 0 only -> verdicts [1,1,1], [1,0,0]
    metrics = record["metrics"]
    assert metrics["judge_correctness"] == pytest.approx(2 / 3)
    assert record["stderr"]["judge_correctness"] == pytest.approx(
        repeated_judgement([[1, 1, 1], [1, 0, 0]])[1])
    assert metrics["judge_correctness_self_agreement"] == pytest.approx((1 + 1 / 3) / 2)
    # against EM (1 for q1, 0 for q2), every judgement: both_1 3, only judge 1, both_0 2
    assert metrics["judge_correctness_confusion_em"] == {"both_1": 3, "only_a": 1, "only_b": 0, "both_0": 2}
    assert metrics["judge_correctness_kappa_em"] == pytest.approx(cohen_kappa([1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]))
    assert metrics["em"] == scored["metrics"]["em"] and record["higher_is_better"]["judge_correctness"]
    assert record["config"]["judge"]["repeats"] == 3 and record["config"]["judged_record"] == scored["id"]
    lines = [json.loads(line) for line in (results / record["samples"]).read_text().splitlines()]
    assert lines[0]["judge"]["name"] == "correctness"
    first = lines[0]["judge"]["judgements"]
    assert [j["verdict"] for j in first] == [1.0, 1.0, 1.0] and first[0]["p_yes"] == pytest.approx(0.9)
    assert first[0]["raw"] == {"logprob_yes": pytest.approx(math.log(0.9)), "logprob_no": pytest.approx(math.log(0.1))}


def test_compare_pairs_two_judged_runs(stored_run):
    results, _ = stored_run
    one = json.loads(judge(results, "--judge-repeats", 1).stdout)  # verdicts 1, 1
    three = json.loads(judge(results, "--judge-repeats", 3).stdout)  # means 1, 1/3
    out = CliRunner().invoke(cli, ["compare", one["id"], three["id"], "--json", "--results-dir", str(results)])
    judged = json.loads(out.stdout)["metrics"]["judge_correctness"]
    assert (judged["a"], judged["b"]) == (pytest.approx(1.0), pytest.approx(2 / 3))
    assert judged["difference"] == pytest.approx(1 / 3) and (judged["wins"], judged["ties"]) == (1, 1)


def test_judging_a_judged_run_again_keeps_nothing_of_the_first_judging(stored_run):
    """Regression: judging the judged run again with one repeat, whose self-agreement is
    undefined, kept the first judging's self-agreement and within-question variance."""
    results, _ = stored_run
    assert "judge_correctness_self_agreement" in json.loads(judge(results, "--judge-repeats", 3).stdout)["metrics"]
    again = json.loads(judge(results, "--judge-repeats", 1).stdout)
    assert again["config"]["judge"]["repeats"] == 1
    assert "judge_correctness_self_agreement" not in again["metrics"]
    assert "judge_correctness_within_variance" not in again["metrics"]


def test_judging_again_reads_the_cached_judgements(stored_run):
    results, _ = stored_run
    first = judge(results, "--judge-repeats", 2)
    asked = len(JudgeBackendPlugin.model.asked)
    assert first.exit_code == 0 and asked == 2 * 2 * 2  # 2 questions, 2 prompts, Yes and No
    again = judge(results, "--judge-repeats", 3, "--judge-temperature", 0.5)
    assert again.exit_code == 0, again.output
    assert len(JudgeBackendPlugin.model.asked) == asked + 2 * 2  # only the third prompt is new


def test_a_judge_without_a_p_yes_stops_the_judging(stored_run):
    # the judge model gives q2's prediction no log-prob of either answer: a RunError naming the
    # judge and the example, not a verdict of "incorrect"; nothing stored or cached
    results, _ = stored_run
    impossible = {"Yes": -math.inf, "No": -math.inf}
    JudgeBackendPlugin.model = JudgeModel(lambda prompt: {"Yes": 0.0, "No": -5.0} if "Ulm" in prompt else impossible)
    records = (results / "records.jsonl").read_text()
    out = judge(results)
    assert out.exit_code == 1 and "judge 'correctness'" in out.output and "q2" in out.output, out.output
    assert len(out.output.strip().splitlines()) == 1
    assert (results / "records.jsonl").read_text() == records
    asked = len(JudgeBackendPlugin.model.asked)
    JudgeBackendPlugin.model = JudgeModel(lambda prompt: {"Yes": 0.0, "No": -5.0})
    assert judge(results).exit_code == 0 and len(JudgeBackendPlugin.model.asked) == asked


@pytest.mark.parametrize("args, message", [
    (("--judge", "nobody"), "unknown judge 'nobody'"),
    (("--judge-repeats", 0), "--judge-repeats"),
])
def test_bad_judge_settings_are_one_line(stored_run, args, message):
    results, _ = stored_run
    out = judge(results, *args)
    assert out.exit_code == 2 and message in out.output, out.output


def test_a_run_without_questions_and_predictions_is_not_judged(stored_run):
    results, scored = stored_run
    log = results / scored["samples"]
    log.write_text("".join(json.dumps({"id": f"w{i}", "nll": 1.0, "tokens": 1, "bytes": 1}) + "\n" for i in range(2)))
    out = judge(results)
    assert out.exit_code == 2 and "has no question, answers, prediction in its samples log" in out.output, out.output


def test_score_judges_when_asked(stored_run, tmp_path):
    results, scored = stored_run
    out = CliRunner().invoke(cli, ["score", "--task", str(tmp_path / "tiny.yaml"), "--data-dir", str(tmp_path / "data"),
                                   "--judge", "correctness", "--judge-model", "judge", "--json",
                                   "--results-dir", str(results), str(tmp_path / "p.jsonl")])
    assert out.exit_code == 0, out.output
    record = json.loads(out.stdout)
    assert record["metrics"]["judge_correctness"] == 1.0  # one repeat: prompt 0, which says yes to both
    assert record["metrics"]["em"] == scored["metrics"]["em"]
    unknown = CliRunner().invoke(cli, ["score", "--task", str(tmp_path / "tiny.yaml"), "--data-dir",
                                       str(tmp_path / "data"), "--judge", "nobody", "--results-dir",
                                       str(tmp_path / "fresh"), str(tmp_path / "p.jsonl")])
    assert unknown.exit_code == 2 and "unknown judge 'nobody'" in unknown.output
    assert not (tmp_path / "fresh").exists()  # refused before anything was scored
