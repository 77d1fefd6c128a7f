"""A complete third-party raghub plugin, written against the public API only.

- `uniform` (language modelling): every token of the vocabulary equally likely, the score
  of a model that knows nothing.
- `top1` (question answering): standard RAG with only the best retrieved passage in the
  prompt, optionally cut to its first `--passage-words` words.
- `two-hop` (question answering): asks for its passages itself, twice: with the question,
  then with the question and the best passage's title (the bridge to a second hop).
- `random` (a retriever): k passages drawn at random for each query, the floor that a
  retriever must beat.
- `title-words` (a reranker): the candidates ordered by how many of the query's words their
  title holds.
- `capitals` (a QA task): `capitals.yaml` beside this file, whose questions and passages are
  `capitals.jsonl`, shipped in this package.

torch is imported where it is used, so that `raghub --help` and `raghub plugins` stay fast.
"""

import math
import random
from importlib.resources import files

from raghub import Method, Option, Passage, Reranker, Retriever, hookimpl, read_task_definition


class Uniform(Method):
    name = "uniform"
    description = "every token equally likely: ln p = -ln |vocabulary|"
    needs_retrieval = False

    def score_windows(self, windows, retrieved):
        """ln p = -ln |vocabulary| for every target token of every window."""
        import torch

        log_p = -math.log(self.model.vocab_size)
        return [torch.full((len(w.target_ids),), log_p) for w in windows]


class Top1(Method):
    name = "top1"
    description = "standard RAG with only the best retrieved passage in the prompt"
    options = {
        "passage_words": Option(int, 0, "keep the passage's first N words (0: all)", at_least=0),
    }

    def answer(self, questions, retrieved):
        """One greedy generation per question, in one batch, each prompt holding the best
        passage (or none when nothing was retrieved)."""
        prompts = [question.prompt([self.shortened(hits[0].passage)] if hits else [])
                   for question, hits in zip(questions, retrieved)]
        generations = self.model.generate(prompts, max(q.max_new_tokens for q in questions))
        return [question.extract(g.text) for question, g in zip(questions, generations)]

    def shortened(self, passage):
        """The passage cut to `--passage-words` words."""
        keep = self.settings["passage_words"]
        if not keep:
            return passage
        text = " ".join(passage.text.split()[:keep])
        return Passage(passage.id, text, passage.title, passage.group)


class TwoHop(Method):
    name = "two-hop"
    description = "retrieves with the question, then with the best passage's title added"
    first_stage = False

    def answer(self, questions, retrieved):
        """Two `retrieve` calls of `--n-docs` passages each (logged in the samples log), then
        one batched generation with both hops' passages in each prompt."""
        first = self.retrieve(questions, [q.question for q in questions], self.n_docs)
        bridges = [f"{q.question} {hits[0].passage.title}" if hits else q.question
                   for q, hits in zip(questions, first)]
        second = self.retrieve(questions, bridges, self.n_docs)
        passages = [list({hit.passage.id: hit.passage for hit in [*one, *two]}.values())
                    for one, two in zip(first, second)]
        prompts = [q.prompt(own) for q, own in zip(questions, passages)]
        generations = self.generate(questions, prompts, max(q.max_new_tokens for q in questions), one_line=True)
        return [q.answer_from(g.text) for q, g in zip(questions, generations)]


class RandomPassages(Retriever):
    name = "random"
    description = "k passages drawn at random for each query: the floor a retriever must beat"
    options = {"draw_seed": Option(int, 0, "seed of the random retriever's draws")}

    def index(self, passages, corpus_fingerprint):
        """Nothing to build: the draws need only the number of passages."""
        self.size = len(passages)

    def search(self, queries, k):
        """k distinct passages per query, scored 0; the same query and seed draw the same."""
        draws = []
        for query in queries:
            rng = random.Random(f"{self.settings['draw_seed']} {query}")
            draws.append([(position, 0.0) for position in rng.sample(range(self.size), min(k, self.size))])
        return draws


class TitleWords(Reranker):
    name = "title-words"
    description = "orders the candidates by the query's words in their title"

    def score(self, queries, candidates):
        """Per query, each candidate's count of query words in its title (lower case)."""
        return [[float(len(set(query.lower().split()) & set(passage.title.lower().split())))
                 for passage in passages] for query, passages in zip(queries, candidates)]


@hookimpl
def register_methods(register):
    register(Uniform)
    register(Top1)
    register(TwoHop)


@hookimpl
def register_retrievers(register):
    register(RandomPassages)


@hookimpl
def register_rerankers(register):
    register(TitleWords)


@hookimpl
def register_tasks(register):
    register(read_task_definition(files(__name__) / "capitals.yaml"))
