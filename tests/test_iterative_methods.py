"""The methods that retrieve while they work, each on the two-question task with a scripted
model: its exact retrieval queries and final answers, derived by hand from the script and the
overlap retriever (a passage scores the words of four letters or more it shares with the
query; equal scores in corpus order: Alpha Film, Bea Mann, Ulm, Gamma River, Delta River,
Einstein)."""

import pytest

from raghub import PromptTemplate, answer_after, first_sentence
from scripted import BRIDGE, COMPARISON, Overlap, ScriptedBackend, ScriptedModel, scripted, tail, titles  # noqa: F401


def scripted_replies(replies):
    """A reply function: the reply for the prompt's tail (after its last "Question: "); an
    unexpected prompt fails the test, naming its tail."""
    def reply(prompt):
        assert tail(prompt) in replies, f"no reply scripted for {tail(prompt)!r}"
        return replies[tail(prompt)]
    return reply


def asked(lines):
    """Each example's queries, from its samples-log trace."""
    return [[call["query"] for call in line.get("retrievals", [])] for line in lines]


# --- the helpers the methods share ----------------------------------------------------------

@pytest.mark.parametrize("text, sentence", [
    (" Ulm is in Germany. So the answer is: Ulm.", " Ulm is in Germany."),
    ("Born in the U.S. in 1990. Next", "Born in the U.S. in 1990."),
    (" a line \nthe next", " a line"),
    ("no end", "no end"),
])
def test_first_sentence_ends_at_a_full_stop_after_a_word_or_at_a_line_end(text, sentence):
    assert first_sentence(text) == sentence


def test_first_sentence_takes_a_line_that_states_the_answer_whole():
    assert first_sentence(" So the answer is: St. Louis. More\nnext", "So the answer is:") == \
        " So the answer is: St. Louis. More"
    assert first_sentence(" So the answer is: St. Louis. More") == " So the answer is: St."


def test_answer_after_reads_the_line_that_holds_the_mark():
    assert answer_after("Ulm is a city.\nSo the answer is: Ulm.\nmore", "So the answer is:") == "Ulm"
    assert answer_after("no answer here", "So the answer is:") is None


def test_frame_gives_a_methods_prompt_in_the_tasks_style():
    blocks = ["Question: demo?\nThought: d.", "Question: Where?"]
    completion = PromptTemplate(style="completion").frame("Think.", blocks, "Thought:")
    assert completion == "Question: demo?\nThought: d.\n\nQuestion: Where?\nThought:"
    chat = PromptTemplate(style="chat", chat=lambda body: f"<user>{body}</user>").frame("Think.", blocks, "Thought:")
    assert chat == "<user>Think.\n\nQuestion: demo?\nThought: d.\n\nQuestion: Where?</user>Thought:"


# --- ircot ----------------------------------------------------------------------------------

IRCOT_SCRIPT = {
    f"{BRIDGE}\nThought:": " The director is Bea Mann, a German director.\n",
    f"{BRIDGE}\nThought: The director is Bea Mann, a German director.": " So the answer is: Ulm.\n",
    f"{COMPARISON}\nThought:": " The Gamma River is 500 km long. The Delta River is 300 km long.\n",
    f"{COMPARISON}\nThought: The Gamma River is 500 km long.": " The Delta River is 300 km long.\n",
    f"{COMPARISON}\nThought: The Gamma River is 500 km long. The Delta River is 300 km long.": " Both are rivers.\n",
    f"{COMPARISON}\nAnswer:": " Gamma River\n",  # the reader, after a chain without an answer
}


def test_ircot_queries_each_new_sentence_and_reads_the_answer_line(scripted):
    ScriptedBackend.model = ScriptedModel(scripted_replies(IRCOT_SCRIPT))
    record, lines = scripted.run("ircot", "--n-docs", 1, "--max-steps", 3)
    # first stage (top 1): Alpha Film (2 shared words, before Bea Mann's 2); Gamma River.
    # "The director is Bea Mann, a German director." -> Bea Mann (director, mann, german): new.
    # "The Gamma River is 500 km long." -> Gamma River again; "The Delta River ..." -> Delta River: new.
    # The comparison's third sentence states no answer and is the last step: no retrieval after it.
    assert asked(lines) == [["The director is Bea Mann, a German director."],
                            ["The Gamma River is 500 km long.", "The Delta River is 300 km long."]]
    assert Overlap.asked == [BRIDGE, COMPARISON, "The director is Bea Mann, a German director.",
                             "The Gamma River is 500 km long.", "The Delta River is 300 km long."]
    assert [line["prediction"] for line in lines] == ["Ulm", "Gamma River"]
    assert lines[0]["generation"] == "Thought: The director is Bea Mann, a German director. So the answer is: Ulm."
    assert lines[1]["generation"].endswith("Both are rivers.\nReader: Gamma River\n")
    prompts = ScriptedBackend.model.prompts
    assert titles(prompts[2]) == ["Alpha Film", "Bea Mann"]  # the bridge's second step
    assert titles(prompts[-1]) == ["Gamma River", "Delta River"]  # the reader's
    # tokens: 9 + 6 for the bridge; 15 + 8 + 4 and the reader's 3 for the comparison
    assert [line["generated_tokens"] for line in lines] == [15, 30]
    assert record["method_stats"] == {"answer_line_rate": 0.5, "retrieval_calls_per_example": 1.5,
                                      "generated_tokens_per_example": 22.5}


def test_ircot_gathers_at_most_max_passages(scripted):
    ScriptedBackend.model = ScriptedModel(scripted_replies(IRCOT_SCRIPT))
    scripted.run("ircot", "--n-docs", 1, "--max-steps", 3, "--max-passages", 1)
    assert all(len(titles(prompt)) == 1 for prompt in ScriptedBackend.model.prompts)


def test_a_chain_that_states_an_empty_answer_is_answered_by_the_reader(scripted):
    """A one-line generation stops at the line end after "So the answer is:", so a model that
    puts its answer on the next line states none: the reader answers, as for a chain that never
    got there."""
    script = {f"{BRIDGE}\nThought:": " So the answer is:\n", f"{BRIDGE}\nAnswer:": " Ulm\n"}
    ScriptedBackend.model = ScriptedModel(scripted_replies(script))
    record, [line] = scripted.run("ircot", "--n-docs", 1, "--limit", 1)
    assert line["prediction"] == "Ulm" and line["generation"].endswith("\nReader: Ulm\n")
    assert record["method_stats"]["answer_line_rate"] == 0


# --- iter-retgen ----------------------------------------------------------------------------

def replies_by_first_passage(replies):
    """A reply function: the reply for the title of the prompt's first passage."""
    return lambda prompt: replies[titles(prompt)[0]]


def test_iter_retgen_asks_with_the_question_and_the_last_generation(scripted):
    replies = {"Alpha Film": " German director\n", "Bea Mann": " Ulm\n", "Gamma River": " Gamma River\n"}
    ScriptedBackend.model = ScriptedModel(replies_by_first_passage(replies))
    record, lines = scripted.run("iter-retgen", "--n-docs", 1, "--iterations", 2)
    # round 1 reads the first stage: Alpha Film, Gamma River. The bridge's round-2 query adds
    # "German director": Bea Mann shares director, born, german (3), Alpha Film alpha, film (2)
    assert asked(lines) == [[f"{BRIDGE} German director"], [f"{COMPARISON} Gamma River"]]
    assert [titles(prompt) for prompt in ScriptedBackend.model.prompts] == [
        ["Alpha Film"], ["Gamma River"], ["Bea Mann"], ["Gamma River"]]
    assert [line["prediction"] for line in lines] == ["Ulm", "Gamma River"]
    assert record["method_stats"]["retrieval_calls_per_example"] == 1


def test_iter_retgen_with_one_iteration_is_standard_rag(scripted):
    replies = {"Alpha Film": " German director\n", "Gamma River": " Gamma River\n"}
    ScriptedBackend.model = ScriptedModel(replies_by_first_passage(replies))
    _, lines = scripted.run("iter-retgen", "--n-docs", 1, "--iterations", 1)
    assert asked(lines) == [[], []] and Overlap.asked == [BRIDGE, COMPARISON]
    assert [line["prediction"] for line in lines] == ["German director", "Gamma River"]


# --- adaptive -------------------------------------------------------------------------------

def adaptive_reply(prompt):
    """Closed book: unsure of the bridge (mean ln p (-2.0 - 0.1) / 2 = -1.05), sure of the
    comparison (-0.35 / 3); with passages: Ulm."""
    if titles(prompt):
        return " Ulm\n"
    if BRIDGE in tail(prompt):
        return [(" Paris", -2.0), ("\n", -0.1)]
    return [(" Gamma", -0.2), (" River", -0.1), ("\n", -0.05)]


def test_adaptive_retrieves_only_for_the_unsure_answer(scripted):
    ScriptedBackend.model = ScriptedModel(adaptive_reply)
    record, lines = scripted.run("adaptive", "--n-docs", 2)  # threshold 0.4: ln 0.4 = -0.92
    assert Overlap.asked == [BRIDGE]  # no first stage
    assert asked(lines) == [[BRIDGE], []]
    assert titles(ScriptedBackend.model.prompts[-1]) == ["Alpha Film", "Bea Mann"]
    assert [line["prediction"] for line in lines] == ["Ulm", "Gamma River"]
    assert record["method_stats"] == {"retrieved_fraction": 0.5, "retrieval_calls_per_example": 0.5,
                                      "generated_tokens_per_example": 3.5}  # (2 + 2) and 3


def test_adaptive_below_the_answers_confidence_retrieves_nothing(scripted):
    ScriptedBackend.model = ScriptedModel(adaptive_reply)
    record, lines = scripted.run("adaptive", "--n-docs", 2, "--threshold", 0.3)  # ln 0.3 = -1.20 < -1.05
    assert Overlap.asked == [] and asked(lines) == [[], []]
    assert [line["prediction"] for line in lines] == ["Paris", "Gamma River"]
    assert record["method_stats"]["retrieved_fraction"] == 0


# --- flare ----------------------------------------------------------------------------------

def flare_replies(replies):
    """A reply function: the reply for the prompt's tail and the titles of its passages."""
    def reply(prompt):
        key = (tail(prompt), tuple(titles(prompt)))
        assert key in replies, f"no reply scripted for {key!r}"
        return replies[key]
    return reply


SURE, UNSURE = -0.1, -2.0  # ln p; the default threshold 0.4 is ln p = -0.92
FLARE_SCRIPT = {
    # the bridge: "Tom" and "Hanks." are unlikely; " He" lies past the sentence's end
    (f"{BRIDGE}\nAnswer:", ()): [(" Alpha", SURE), (" Film", SURE), (" was", SURE), (" directed", SURE),
                                  (" by", SURE), (" Tom", UNSURE), (" Hanks.", -1.5), (" He", UNSURE), ("\n", SURE)],
    (f"{BRIDGE}\nAnswer:", ("Alpha Film",)): " Alpha Film was directed by Bea Mann. Bea\n",
    (f"{BRIDGE}\nAnswer: Alpha Film was directed by Bea Mann.", ()): " Bea Mann was born in Ulm.\n",
    (f"{BRIDGE}\nAnswer: Alpha Film was directed by Bea Mann. Bea Mann was born in Ulm.", ()):
        " So the answer is: Ulm.\n",
    # the comparison: "ma", a piece of "Gamma", and "500" are unlikely
    (f"{COMPARISON}\nAnswer:", ()): [(" The", SURE), (" Gam", SURE), ("ma", UNSURE), (" River", SURE), (" is", SURE),
                                      (" 500", -1.2), (" km", SURE), (" long.", SURE), ("\n", SURE)],
    (f"{COMPARISON}\nAnswer:", ("Gamma River",)): " The Gamma River is 500 km long.\n",
    (f"{COMPARISON}\nAnswer: The Gamma River is 500 km long.", ()): " So the answer is: Gamma River.\n",
}


def test_flare_retrieves_with_the_unsure_sentence_masked_and_writes_it_again(scripted):
    ScriptedBackend.model = ScriptedModel(flare_replies(FLARE_SCRIPT))
    record, lines = scripted.run("flare", "--n-docs", 1)
    # "Alpha Film was directed by" -> Alpha Film (alpha, film, directed); "The River is km long."
    # (the whole word "Gamma" masked) -> Gamma River (river, long: 2, before Delta River's 2);
    # both in one call, no first stage
    assert Overlap.asked == ["Alpha Film was directed by", "The River is km long."]
    assert asked(lines) == [["Alpha Film was directed by"], ["The River is km long."]]
    assert [line["prediction"] for line in lines] == ["Ulm", "Gamma River"]
    assert lines[0]["generation"] == ("Answer: Alpha Film was directed by Bea Mann. Bea Mann was born in Ulm. "
                                      "So the answer is: Ulm.")
    assert record["method_stats"]["answer_line_rate"] == 1


def test_flare_keeps_a_sentence_whose_tokens_clear_the_threshold(scripted):
    script = {**FLARE_SCRIPT, (f"{BRIDGE}\nAnswer: Alpha Film was directed by Tom Hanks.", ()):
              " So the answer is: Tom Hanks.\n"}
    ScriptedBackend.model = ScriptedModel(flare_replies(script))
    _, [line] = scripted.run("flare", "--n-docs", 1, "--limit", 1, "--threshold", 0.1)  # ln 0.1 = -2.30
    assert Overlap.asked == [] and "retrievals" not in line
    assert line["prediction"] == "Tom Hanks"


def test_flare_answers_an_unfinished_chain_with_the_tasks_prompt(scripted):
    chain = flare_replies(FLARE_SCRIPT)
    ScriptedBackend.model = ScriptedModel(lambda prompt: chain(prompt) if "Magic Flute" in prompt else " Bea Mann\n")
    record, [line] = scripted.run("flare", "--n-docs", 1, "--limit", 1, "--max-steps", 1)
    assert line["prediction"] == "Bea Mann"
    assert line["generation"] == "Answer: Alpha Film was directed by Bea Mann.\nReader: Bea Mann\n"
    assert titles(ScriptedBackend.model.prompts[-1]) == ["Alpha Film"]  # the passages retrieved last
    assert record["method_stats"]["answer_line_rate"] == 0


# --- self-ask -------------------------------------------------------------------------------

NEEDED = "Are follow up questions needed here:"
SELF_ASK_SCRIPT = {
    f"{BRIDGE}\n{NEEDED}": " Yes.\n",
    f"{BRIDGE}\n{NEEDED} Yes.\n": "Follow up: Who directed Alpha Film?\n",
    f"{BRIDGE}\n{NEEDED} Yes.\nFollow up: Who directed Alpha Film?\nIntermediate answer:": " Bea Mann.\n",
    f"{BRIDGE}\n{NEEDED} Yes.\nFollow up: Who directed Alpha Film?\nIntermediate answer: Bea Mann.\n":
        "Follow up: Where was Bea Mann born?\n",
    f"{BRIDGE}\n{NEEDED} Yes.\nFollow up: Who directed Alpha Film?\nIntermediate answer: Bea Mann.\n"
    "Follow up: Where was Bea Mann born?\nIntermediate answer:": " Ulm.\n",
    f"{BRIDGE}\n{NEEDED} Yes.\nFollow up: Who directed Alpha Film?\nIntermediate answer: Bea Mann.\n"
    "Follow up: Where was Bea Mann born?\nIntermediate answer: Ulm.\n": "So the final answer is: Ulm\n",
    f"{COMPARISON}\n{NEEDED}": " No.\n",
    f"{COMPARISON}\n{NEEDED} No.\n": "So the final answer is: Gamma River\n",
    f"{BRIDGE}\nAnswer:": " Bea Mann\n",  # the task's prompt, for a reply without a final answer
}


def test_self_ask_retrieves_for_each_follow_up_question(scripted):
    ScriptedBackend.model = ScriptedModel(scripted_replies(SELF_ASK_SCRIPT))
    record, lines = scripted.run("self-ask", "--n-docs", 1)
    # "Who directed Alpha Film?" -> Alpha Film (directed, alpha, film);
    # "Where was Bea Mann born?" -> Bea Mann (mann, born: 2, before Alpha Film's and Einstein's 1)
    assert asked(lines) == [["Who directed Alpha Film?", "Where was Bea Mann born?"], []]
    assert Overlap.asked == ["Who directed Alpha Film?", "Where was Bea Mann born?"]
    prompts = ScriptedBackend.model.prompts
    assert [titles(p) for p in prompts if tail(p).endswith("Intermediate answer:")] == [["Alpha Film"], ["Bea Mann"]]
    assert [line["prediction"] for line in lines] == ["Ulm", "Gamma River"]
    assert lines[1]["generation"] == f"{NEEDED} No.\nSo the final answer is: Gamma River"
    assert record["method_stats"]["answer_line_rate"] == 1


def test_self_ask_stops_at_max_steps_follow_ups_and_reads_the_last_passages(scripted):
    ScriptedBackend.model = ScriptedModel(scripted_replies(SELF_ASK_SCRIPT))
    record, [line] = scripted.run("self-ask", "--n-docs", 1, "--limit", 1, "--max-steps", 1)
    assert asked([line]) == [["Who directed Alpha Film?"]]
    assert line["prediction"] == "Bea Mann" and line["generation"].endswith("\nReader: Bea Mann\n")
    assert titles(ScriptedBackend.model.prompts[-1]) == ["Alpha Film"]
    assert record["method_stats"]["answer_line_rate"] == 0


# --- react ----------------------------------------------------------------------------------

ALPHA_SEEN = ("Thought: I need the director of Alpha Film.\nAction: Search[Alpha Film director]\n"
              "Observation: [Alpha Film] Alpha Film is a 1990 drama directed by Bea Mann.\n")
REACT_SCRIPT = {
    f"{BRIDGE}\nThought:": " I need the director of Alpha Film.\nAction: Search[Alpha Film director]\nObservation: x",
    f"{BRIDGE}\n{ALPHA_SEEN}Thought:": " Bea Mann directed it.\nSearch[Bea Mann birthplace born]\n",
    f"{BRIDGE}\n{ALPHA_SEEN}Thought: Bea Mann directed it.\nAction: Search[Bea Mann birthplace born]\n"
    "Observation: [Bea Mann] Bea Mann is a German director born in Ulm.\nThought:":
        " She was born in Ulm.\nAction: Finish[Ulm]\n",
    f"{COMPARISON}\nThought:": " I will guess.\nAction: Lookup[rivers]\n",  # not an action of the agent
    f"{COMPARISON}\nThought: I will guess.\nObservation: Invalid action. Write Action: Search[query] or "
    "Action: Finish[answer].\nThought:": " The Gamma River is longer.\nAction: Finish[Gamma River]",
    f"{BRIDGE}\nAnswer:": " Bea Mann\n",  # the task's prompt, for an agent that never finished
}


def test_react_searches_observes_and_finishes_counting_malformed_actions(scripted):
    ScriptedBackend.model = ScriptedModel(scripted_replies(REACT_SCRIPT))
    record, lines = scripted.run("react", "--n-docs", 1)
    # "Alpha Film director" -> Alpha Film (alpha, film: 2; Bea Mann's director: 1);
    # "Bea Mann birthplace born" -> Bea Mann (mann, born: 2; Alpha Film and Einstein: 1)
    assert asked(lines) == [["Alpha Film director", "Bea Mann birthplace born"], []]
    assert [line["prediction"] for line in lines] == ["Ulm", "Gamma River"]
    assert lines[1]["generation"].startswith("Thought: I will guess.\nObservation: Invalid action.")
    assert record["method_stats"]["finish_rate"] == 1
    assert record["method_stats"]["malformed_actions_per_question"] == 0.5


def test_react_that_never_finishes_is_read_from_the_last_search(scripted):
    ScriptedBackend.model = ScriptedModel(scripted_replies(REACT_SCRIPT))
    record, [line] = scripted.run("react", "--n-docs", 1, "--limit", 1, "--max-steps", 1)
    assert asked([line]) == [["Alpha Film director"]]
    assert line["prediction"] == "Bea Mann" and line["generation"].endswith("Reader: Bea Mann")
    assert titles(ScriptedBackend.model.prompts[-1]) == ["Alpha Film"]
    assert record["method_stats"]["finish_rate"] == 0


# --- options --------------------------------------------------------------------------------

@pytest.mark.parametrize("method, option, value, message", [
    ("ircot", "--max-steps", 0, "--max-steps must be at least 1, not 0"),
    ("react", "--max-steps", 21, "--max-steps must be at most 20, not 21"),
    ("ircot", "--max-passages", 0, "--max-passages must be at least 1, not 0"),
    ("iter-retgen", "--iterations", 11, "--iterations must be at most 10, not 11"),
    ("flare", "--threshold", 0, "--threshold must be above 0, not 0.0"),
    ("adaptive", "--threshold", 1.5, "--threshold must be at most 1, not 1.5"),
])
def test_loop_bounds_are_checked_before_the_model_loads(scripted, method, option, value, message):
    out = scripted.invoke(method, option, value)
    assert out.exit_code == 2 and message in out.output and ScriptedBackend.loads == 0


class WithoutTokenIds(ScriptedModel):
    """A backend's model that gives no token ids."""

    def generation(self, prompt, max_new_tokens, one_line):
        generation = super().generation(prompt, max_new_tokens, one_line)
        generation.token_ids = []
        return generation


def test_flare_without_token_ids_asks_with_the_whole_unsure_sentence(scripted):
    ScriptedBackend.model = WithoutTokenIds(flare_replies(FLARE_SCRIPT))
    _, lines = scripted.run("flare", "--n-docs", 1)
    assert asked(lines) == [["Alpha Film was directed by Tom Hanks."], ["The Gamma River is 500 km long."]]
    assert [line["prediction"] for line in lines] == ["Ulm", "Gamma River"]


class ReencodedIds(ScriptedModel):
    """A server backend's model whose generated pieces did not map to one id each: its ids are
    its text encoded again, fewer than its log-probs ("Gam" and "ma" are one token here)."""

    def generation(self, prompt, max_new_tokens, one_line):
        generation = super().generation(prompt, max_new_tokens, one_line)
        generation.token_ids = self.encode(generation.text)
        return generation


def test_flare_masks_by_token_ids_only_when_there_is_one_per_log_prob(scripted):
    """Ids that do not match the log-probs one to one would mask the words of other tokens'
    probabilities ("River" and "km" for "Gamma" and "500"): the sentence is asked unmasked."""
    ScriptedBackend.model = ReencodedIds(flare_replies(FLARE_SCRIPT))
    _, lines = scripted.run("flare", "--n-docs", 1)
    assert asked(lines) == [["Alpha Film was directed by"], ["The Gamma River is 500 km long."]]
    assert [line["prediction"] for line in lines] == ["Ulm", "Gamma River"]
