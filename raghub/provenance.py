"""What a record says of where its numbers came from: each example's samples-log line, the
metrics it ranks, the raghub commit and the plugins behind each part of the run.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import raghub
from raghub.interfaces import Example, Method, Retrieved, Task
from raghub.worklog import passage_fields

if TYPE_CHECKING:
    from raghub.resolution import ResolvedRun

def sample_line(task: Task, example: Example, stats: dict[str, Any], retrieved: Sequence[Retrieved],
                work: dict[str, Any]) -> dict[str, Any]:
    """The example's line of the samples log: its id, stats, first-stage passages (id, title,
    score, rank) and what the method logged of its work, with the fields its task adds."""
    return task.sample_log(example, {"id": example.id, **stats, "retrieved": passage_fields(retrieved), **work})


def ranked_metrics(task: Task, metrics: dict[str, Any]) -> dict[str, bool]:
    """Whether higher is better, for each metric the task ranks by (its `recall@k` covers every
    recall@N); counts such as `n_questions` are reported but not ranked."""
    directions = {}
    for name, value in metrics.items():
        key = re.sub(r"@\d+$", "@k", name)
        if key in task.higher_is_better and isinstance(value, (int, float)):
            directions[name] = task.higher_is_better[key]
    return directions


def git_commit() -> str | None:
    """The commit of the raghub checkout that runs (None outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(raghub.__file__).parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def plugin_origins(task: Task, method: Method, resolved: ResolvedRun) -> dict[str, str | None]:
    """Which installed plugin (built-in, or distribution and version) provided each part (the
    retrievers of a hybrid `+`-joined; a reranker and a refiner when the run has them)."""
    found = resolved.host.registry
    kinds = resolved.stage_kinds()
    retrievers = [found.origin("retriever", cls.name) for _, cls in resolved.retriever_kinds()]
    return {"task family": found.origin("task family", task.family), "method": found.origin("method", method.name),
            "retriever": " + ".join(retrievers) or None,
            **{kind: found.origin(kind, kinds[kind].name) for kind in ("reranker", "refiner") if kinds.get(kind)}}
