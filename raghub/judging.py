"""The judging of a stored question-answering run by an LLM judge (`raghub judge`; the judges
are `raghub.judges.Judge` plugins).

Repeat r of an example asks the judge's prompt r mod `n_prompts`, and its verdict is drawn at
the judge temperature seeded by (example, prediction, judge, repeat) (`raghub.judges.verdict`).
Each p(yes) is cached per (question, prediction, judge, judge model,
prompt): judging again, with another temperature, more repeats, or after an interruption, asks
the model only what it has not answered. Judging reads the run's stored predictions and runs no
generator.

The judged run is stored as a new record: the original's, with the judged accuracy (a metric
`judge_<name>`, with its standard error including the judge's variance), the judge's
self-agreement, and its agreement with match and EM (Cohen's kappa and the confusion counts) in
the metrics, the judge's settings in `config.judge`, and each example's verdicts, p(yes) and the
judge's raw output under `judge` in its samples-log line.
"""

from __future__ import annotations

import numbers
import reprlib
import secrets
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any, Sequence

from raghub.cache import Cache, cache_root
from raghub.errors import ReturnedWrong, UsageError, amount
from raghub.judges import Judge, Judgeable, verdict
from raghub.metrics import cohen_kappa, confusion_counts, repeated_judgement, self_agreement
from raghub.models import ModelBackend, ModelSpec, choose_backend
from raghub.plugin_manager import PluginHost
from raghub.record import Record
from raghub.records import append_record, samples_file

#: the fields of a samples-log line a judge reads
JUDGED_FIELDS = ("question", "answers", "prediction")
#: the cache's kind of entry holding one (example, prompt)'s p(yes) and raw output
JUDGEMENTS = "judgements"
#: the 0/1 metrics the judge's verdicts are compared with
REFERENCE_METRICS = ("match", "em")


def _judgeable(line: dict[str, Any]) -> Judgeable:
    return Judgeable(line["question"], tuple(line["answers"]), line["prediction"])


def judge_lines(judge: Judge, judge_id: dict[str, Any], lines: Sequence[dict[str, Any]], repeats: int,
                temperature: float, cache: Cache) -> list[list[dict[str, Any]]]:
    """Each line's `repeats` judgements ({verdict, p_yes, raw}). The judge is asked, in batches
    of its model's batch size, only for the (example, prompt) pairs not cached; each answer is
    cached as it comes, so an interrupted judging resumes."""
    examples = [_judgeable(line) for line in lines]
    answers: dict[tuple[int, int], list[Any]] = {}
    for prompt in sorted({r % judge.n_prompts for r in range(repeats)}):
        keys = [{**judge_id, "prompt": prompt, "example": vars(example)} for example in examples]
        todo = [i for i, key in enumerate(keys) if not cache.is_valid(cache.entry_path(JUDGEMENTS, key))]
        for start in range(0, len(todo), judge.model.batch_size):
            batch = todo[start:start + judge.model.batch_size]
            returned = checked_p_yes(judge, judge.p_yes([examples[i] for i in batch], prompt),
                                     [lines[i]["id"] for i in batch], prompt)
            for i, (p, raw) in zip(batch, returned):
                answers[(i, prompt)] = cache.json(JUDGEMENTS, keys[i], lambda p=p, raw=raw: [p, raw])
        for i in set(range(len(examples))) - set(todo):
            answers[(i, prompt)] = cache.json(JUDGEMENTS, keys[i],
                                              lambda i=i: [*checked_p_yes(judge, judge.p_yes([examples[i]], prompt),
                                                                          [lines[i]["id"]], prompt)[0]])
    judged = []
    for i, line in enumerate(lines):
        judgements = []
        for repeat in range(repeats):
            p, raw = answers[(i, repeat % judge.n_prompts)]
            seed = (line["id"], line["prediction"], judge_id, repeat)
            judgements.append({"verdict": verdict(p, temperature, seed), "p_yes": p, "raw": raw})
        judged.append(judgements)
    return judged


def checked_p_yes(judge: Judge, returned: Any, example_ids: Sequence[str], prompt: int) -> list[tuple[float, Any]]:
    """What `judge.p_yes` returned for the examples of `example_ids`, as (p(yes), raw) pairs; a
    ReturnedWrong unless it gave one pair per example whose p(yes) is a number from 0 to 1 (a
    NaN, say from a judge model that gave neither answer a log-prob, would read as "no")."""
    if not isinstance(returned, (list, tuple)) or len(returned) != len(example_ids):
        raise ReturnedWrong("judge", judge, f"{reprlib.repr(returned)} for {amount(len(example_ids), 'example')}; "
                                            "it must return one (p_yes, raw) pair per example")
    checked = []
    for example_id, pair in zip(example_ids, returned):
        p = pair[0] if isinstance(pair, (list, tuple)) and len(pair) == 2 else None
        if not isinstance(p, numbers.Real) or isinstance(p, bool) or not 0.0 <= p <= 1.0:
            raise ReturnedWrong("judge", judge, f"{reprlib.repr(pair)} for example {example_id} under prompt {prompt}; "
                                                "it must return a (p_yes, raw) pair, p_yes from 0 to 1")
        checked.append((float(p), pair[1]))
    return checked


def judged_metric(judge_name: str) -> str:
    """The record's metric of a judge's accuracy, e.g. `judge_correctness`."""
    return f"judge_{judge_name}"


def judged_terms(line: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """A judged samples-log line's (y, x) of its judge's accuracy: the mean of its verdicts over
    one question (none for a line not judged), so that `raghub compare` pairs judged runs too."""
    if "judge" not in line:
        return {}
    verdicts = [j["verdict"] for j in line["judge"]["judgements"]]
    return {judged_metric(line["judge"]["name"]): (sum(verdicts) / len(verdicts), 1.0)}


def judge_summary(name: str, lines: Sequence[dict[str, Any]], judged: Sequence[list[dict[str, Any]]]) -> tuple[dict[str, Any], float | None]:
    """The record's judge metrics (accuracy, self-agreement, kappa and confusion counts against
    match and EM where the lines have them; None where undefined, e.g. self-agreement with one
    repeat) and the accuracy's standard error."""
    verdicts = [[j["verdict"] for j in repeats] for repeats in judged]
    accuracy, se, within = repeated_judgement(verdicts)
    metric = judged_metric(name)
    metrics: dict[str, Any] = {metric: accuracy, f"{metric}_self_agreement": self_agreement(verdicts),
                               f"{metric}_within_variance": within}
    # every judgement (question and repeat) against its question's label
    flat = [v for repeats in verdicts for v in repeats]
    for reference in REFERENCE_METRICS:
        if all(reference in line for line in lines):
            labels = [line[reference] for line, repeats in zip(lines, verdicts) for _ in repeats]
            metrics[f"{metric}_kappa_{reference}"] = cohen_kappa(flat, labels)
            metrics[f"{metric}_confusion_{reference}"] = confusion_counts(flat, labels)
    return metrics, se


def check_judge(host: PluginHost, judge_name: str, judge_model: str | None) -> ModelBackend:
    """The backend that loads the judge model, once the judge is known and the model can be seen
    to provide what it needs (UsageError otherwise); nothing is loaded."""
    found = host.registry
    if judge_name not in found.judges:
        raise UsageError(f"unknown judge '{judge_name}'; known: {', '.join(sorted(found.judges)) or 'none'}")
    backend = choose_backend(found, judge_model)
    backend.check(judge_model)
    backend.check_provides(found.judges[judge_name].requires, f"judge '{judge_name}'")
    return backend


def judge_run(host: PluginHost, record: Record, lines: Sequence[dict[str, Any]], judge_name: str, judge_model: str | None,
              repeats: int, temperature: float, results_dir: str) -> Record:
    """Judge a stored run's predictions and store the judged run as a new record (see the
    module's docstring); UsageError for a run without questions and predictions, an unknown
    judge or a judge model that lacks what the judge needs."""
    backend = check_judge(host, judge_name, judge_model)
    missing = [f for f in JUDGED_FIELDS if not all(f in line for line in lines)]
    if missing:
        raise UsageError(f"record {record.id} ({record.task}) has no {', '.join(missing)} in its samples log; "
                         "a judge judges question-answering runs")
    judge_class = host.registry.judges[judge_name]
    started = datetime.now(timezone.utc)
    model = backend.load_from_spec(ModelSpec(judge_model, dtype="float32"), None, 8)
    judge = judge_class(model)
    judge_id = {"judge": judge_name, "code": host.code_identity("judge", judge_name), "model": model.fingerprint}
    try:
        judged = judge_lines(judge, judge_id, lines, repeats, temperature, Cache(cache_root()))
    except ReturnedWrong as error:  # a contract check: named with the plugin's origin
        raise host.returned_wrong(error.plugin, error.what) from None
    summary, se = judge_summary(judge_name, lines, judged)
    # a judged run judged again keeps none of the earlier judging's metrics, defined now or not
    metrics = {**{key: value for key, value in record.metrics.items() if key not in summary},
               **{key: value for key, value in summary.items() if value is not None}}
    metric = judged_metric(judge_name)
    record_id = f"{started:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"
    settings = {"name": judge_name, "model": judge_model, "model_name": model.name,
                "model_fingerprint": model.fingerprint, "repeats": repeats, "temperature": temperature}
    judged_record = replace(
        record, id=record_id, samples=samples_file(record_id), metrics=metrics,
        higher_is_better={**record.higher_is_better, metric: True}, stderr={**record.stderr, metric: se},
        config={**record.config, "judge": settings, "judged_record": record.id},
        started_at=started.isoformat(), finished_at=datetime.now(timezone.utc).isoformat())
    judged_lines = [{**line, "judge": {"name": judge_name, "judgements": judgements}}
                    for line, judgements in zip(lines, judged)]
    append_record(results_dir, judged_record, judged_lines)
    return judged_record
