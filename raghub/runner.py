"""One run, from a resolved request (`raghub.resolution`) to a stored record: load the model,
retrieve, evaluate resumably (`raghub.resume`), record with its provenance
(`raghub.provenance`). A finished run writes its samples-log lines, in example order, to
`samples/<record id>.jsonl` beside its record.

`run_sweep` runs resolved runs in order, loading each distinct model once and reusing the
stored record of an identical earlier run.
"""

from __future__ import annotations

import secrets
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

import raghub
from raghub import allocator, distributed
from raghub.cache import Cache, cache_root, fingerprint
from raghub.checkpoints import checkpoint_stats, generator_identity, with_trained_generator
from raghub.distributed import notice
from raghub.errors import ReturnedWrong, UsageError
from raghub.interfaces import Example, Method, Retrieved, Task
from raghub.models import LanguageModel, ModelSpec
from raghub.provenance import git_commit, plugin_origins, ranked_metrics
from raghub.record import Record
from raghub.records import append_record, read_records, samples_file
from raghub.resolution import ResolvedRun
from raghub.resume import evaluate_resumably
from raghub.retrieval import Retrieval
from raghub.stages import Stages
from raghub.worklog import work_means

#: config keys known once the model loads -> the model attribute: the weights' content and the
#: dtype that ran (`--dtype auto` picks one), so a resume file never mixes two of either
LOADED = {"model_fingerprint": "fingerprint", "model_dtype": "dtype"}


def _stored_record(results_dir: Path, config_fingerprint: str) -> Record | None:
    """The newest stored record whose config, as known before the model loads (all but the
    weights' fingerprint), has this fingerprint, if any."""
    def known_before_loading(record: Record) -> dict[str, Any]:
        return {key: value for key, value in record.config.items() if key not in LOADED}

    return next((r for r in reversed(read_records(results_dir))
                 if fingerprint(known_before_loading(r)) == config_fingerprint), None)


def run_sweep(runs: Sequence[ResolvedRun], force: bool = False) -> Iterator[Record]:
    """The record of each resolved run, in order, as each finishes: an identical earlier run's
    stored record (said on stderr; `force` runs it again, rebuilding whatever it had cached),
    else a new run's. Each distinct model (with the trained generator of a checkpoint, or
    without) loads once. Under a launcher every rank runs the sweep, and only rank 0 yields
    records."""
    models: dict[str, LanguageModel] = {}
    cache = Cache(cache_root(), stale_before=time.time() if force else None)
    main = distributed.ranks().is_main
    for resolved in runs:
        request = resolved.request
        stored = None if force else _stored_record(request.results_dir, fingerprint(resolved.config))
        if stored is not None:
            notice(f"{stored.task} · {stored.method}"
                  + (f" · k={stored.n_docs}" if stored.retriever else "")
                  + f": reusing the identical run stored in {request.results_dir} "
                  f"(finished {stored.finished_at or 'earlier'}); --force runs it again")
            if main:
                yield stored
            continue
        model_key = fingerprint(resolved.backend.name, resolved.backend.settings, request.model,
                                request.device, request.dtype, request.batch_size,
                                generator_identity(resolved.checkpoint))
        if model_key not in models:
            models[model_key] = _load_model(resolved)
        record = execute(resolved, models[model_key], cache)
        if main:
            yield record


def _load_model(resolved: ResolvedRun) -> LanguageModel:
    """The run's model, on this rank's device, with the checkpoint's generator when the method
    evaluates one."""
    request = resolved.request
    spec = ModelSpec(request.model, request.model_backend, request.model_args, request.dtype)
    return with_trained_generator(resolved.backend.load_from_spec(spec, distributed.device(request.device),
                                                                  request.batch_size), resolved.checkpoint)


def execute(resolved: ResolvedRun, model: LanguageModel | None = None,
            cache: Cache | None = None) -> Record | None:
    """Run a resolved request to completion (on `model` when it is already loaded) and append
    its record to the results store. The method and the retriever each cache their work in
    `cache` (default: the cache folder) keyed by their code. Under a launcher each rank
    evaluates its share, and rank 0 alone writes and returns the record (the others return None)."""
    request = resolved.request
    started = datetime.now(timezone.utc)
    clock = time.perf_counter()
    cache = cache or Cache(cache_root())
    if model is None:
        model = _load_model(resolved)
    task = resolved.task
    method = resolved.method_class(model, cache.scoped(resolved.code["method"]), **resolved.plugin_options["method"])
    model.counters = method.counters  # what fitting inputs into the model leaves out counts for this run
    try:
        examples = task.examples(model, request.limit)
        if not examples:
            raise UsageError(f"task '{task.name}' produced no examples")
        retrieved, corpus_label = _first_stage(resolved, method, model, cache, examples)
        # the weights' content is known once loaded: a resumed run never mixes two models
        config = {**resolved.config, **{key: getattr(model, attribute) for key, attribute in LOADED.items()}}
        resume_path = Path(request.results_dir) / ".partial" / f"{fingerprint(config)}.jsonl"
        done = evaluate_resumably(task, method, examples, retrieved, resume_path,
                                  request.batch_size, announce=request.limit is None)
        if not distributed.ranks().is_main:
            return None
        lines = [done[e.id] for e in examples]
        metrics = task.aggregate(lines)
        higher_is_better = ranked_metrics(task, metrics)
        standard_errors = task.standard_errors(lines)
        record_id = f"{started:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"
        record = Record(
            id=record_id, samples=samples_file(record_id),
            task=task.name, task_version=task.config.get("version", 1),
            family=task.family, method=method.name,
            retriever=resolved.stages.label if resolved.stages else None, model=model.name,
            n_docs=resolved.n_docs, settings=resolved.settings_label(),
            corpus=corpus_label, n_examples=len(examples), metrics=metrics,
            higher_is_better=higher_is_better,
            stderr={name: standard_errors.get(name) for name in higher_is_better},
            totals=task.totals(lines),
            method_stats={**method.record_stats(), **work_means(lines), **checkpoint_stats(resolved.checkpoint)}, config=config,
            plugins=plugin_origins(task, method, resolved),
            raghub_version=raghub.__version__, git_commit=git_commit(),
            started_at=started.isoformat(), finished_at=datetime.now(timezone.utc).isoformat(),
            duration_s=round(time.perf_counter() - clock, 2), hardware={**model.hardware(), "allocator": allocator.in_effect()},
        )
    except ReturnedWrong as error:  # a contract check: named with the plugin's origin
        raise resolved.host.returned_wrong(error.plugin, error.what) from None
    finally:
        method.close()
    append_record(request.results_dir, record, lines)
    for path in distributed.resume_files(resume_path):
        path.unlink(missing_ok=True)
    return record


def _first_stage(resolved: ResolvedRun, method: Method, model: LanguageModel, cache: Cache,
                 examples: Sequence[Example]) -> tuple[list[list[Retrieved]], str | None]:
    """Each example's first-stage passages (none without a retriever, or for a method that
    asks for its own) and the corpus label; the method is bound to the run's retrieval."""
    retrieved: list[list[Retrieved]] = [[] for _ in examples]
    if resolved.retriever_class is None:
        return retrieved, None
    retrieval = _retrieval(resolved, resolved.task, model, cache)
    n_docs = retrieval.clamp(resolved.n_docs)
    with distributed.console().status(f"retrieving top-{n_docs} with {resolved.stages.label}"):
        retrieval.open()
        if method.first_stage:
            retrieved = retrieval.first_stage(examples, n_docs, method.work)
    method.bind_retrieval(retrieval, n_docs)
    return retrieved, retrieval.corpus_label


def _retrieval(resolved: ResolvedRun, task: Task, model: LanguageModel, cache: Cache) -> Retrieval:
    """The run's retrieval service: its retrievers, reranker and refiner, each with its own
    cache keyed by its code."""
    code, options = resolved.stage_code(), resolved.plugin_options
    retrievers = [cls(cache.scoped(identity), **options[kind])
                  for (kind, cls), identity in zip(resolved.retriever_kinds(), code["retrievers"])]
    stages = {kind: cls(model, cache.scoped(code[kind]), **options[kind])
              for kind, cls in resolved.stage_kinds().items() if kind in ("reranker", "refiner") and cls}
    return Retrieval(task, retrievers[0], retrievers[0].cache,
                     Stages(retrievers[1:], resolved.stages.fusion_k, resolved.stages.depth, **stages))
