"""device-cloud (DRAGON): the aggregation formulas, the wire, and two real processes."""

from __future__ import annotations

import math
import threading
import time
from multiprocessing import Pipe

import numpy as np
import pytest
import torch

from raghub import Passage, Retrieved, mixture_logprobs
from raghub.plugins.methods.device_cloud import wire as device_cloud_wire
from raghub.plugins.methods.device_cloud.method import DeviceCloud
from raghub.plugins.methods.device_cloud.mixing import combine_sides, deal_alternately, resolve_draft, side_weight
from raghub.plugins.methods.device_cloud.server import AUTHKEY_VARIABLE, CloudLost, start_cloud
from raghub.plugins.methods.device_cloud.sides import DocumentSide
from raghub.plugins.methods.device_cloud.wire import (
    Channel, PeerLost, decode_message, pack_distribution, unpack_distribution,
)


# --- formulas, hand-computed -----------------------------------------------------------------

def test_two_sides_recombine_into_the_union_ensemble():
    # three documents' probabilities of one token, scores 0, ln 3, ln 2: union weights 1/6, 3/6,
    # 2/6, p = (0.2 + 1.8 + 1.0) / 6 = 0.5. Device {0, 2}: W = ln 3, mixture 1/3·0.2 + 2/3·0.5
    # = 0.4; cloud {1}: W = ln 3, mixture 0.6; sides weigh 1/2 each: 0.5·0.4 + 0.5·0.6 = 0.5.
    probs = torch.tensor([[0.2], [0.6], [0.5]])
    scores = torch.tensor([0.0, math.log(3), math.log(2)])
    device, cloud = [0, 2], [1]
    assert side_weight(scores[device]) == pytest.approx(math.log(3))
    device_mix = mixture_logprobs(probs[device].log(), scores[device])
    assert device_mix.exp().item() == pytest.approx(0.4)
    joint = combine_sides(torch.stack([device_mix, mixture_logprobs(probs[cloud].log(), scores[cloud])]),
                          torch.tensor([side_weight(scores[device]), side_weight(scores[cloud])]))
    assert joint.exp().item() == pytest.approx(0.5)


def test_temperature_divides_every_score_on_both_sides():
    # scores doubled at T = 2 give the same weights as above, so the same 0.5
    probs = torch.tensor([[0.2], [0.6], [0.5]])
    scores = 2 * torch.tensor([0.0, math.log(3), math.log(2)])
    sides = [[0, 2], [1]]
    joint = combine_sides(
        torch.stack([mixture_logprobs(probs[s].log(), scores[s], temperature=2.0) for s in sides]),
        torch.tensor([side_weight(scores[s], temperature=2.0) for s in sides]))
    assert joint.exp().item() == pytest.approx(0.5)
    assert joint.item() == pytest.approx(mixture_logprobs(probs.log(), scores, temperature=2.0).item())


def test_sides_without_documents_count_equally():
    closed_book = torch.log(torch.tensor([[0.3, 0.7], [0.5, 0.5]]))
    joint = combine_sides(closed_book, torch.tensor([-math.inf, -math.inf]))
    assert torch.allclose(joint.exp(), torch.tensor([0.4, 0.6]))


def test_documents_are_dealt_alternately():
    hits = [Retrieved(Passage(str(i), "t"), float(-i)) for i in range(5)]
    device, cloud = deal_alternately(hits)
    assert [h.passage.id for h in device] == ["0", "2", "4"]
    assert [h.passage.id for h in cloud] == ["1", "3"]


def test_speculative_rule_outputs_the_target_distribution():
    # draft q = (0.6, 0.4), target p = (0.3, 0.7): token 0 is kept with probability
    # 0.6 · min(1, 0.3/0.6) = 0.3; the rejected half resamples from max(0, p - q) = (0, 0.3) -> 1
    draft_probs, target = torch.tensor([0.6, 0.4]), torch.tensor([0.3, 0.7])
    generator = torch.Generator().manual_seed(1)
    drafts = torch.multinomial(draft_probs, 20000, replacement=True, generator=generator)
    outputs = [resolve_draft(int(d), draft_probs, target, generator) for d in drafts]
    assert sum(token == 0 for token, _ in outputs) / len(outputs) == pytest.approx(0.3, abs=0.015)
    assert all(kept for (token, kept), d in zip(outputs, drafts) if int(d) == 1)  # p(1) > q(1)
    assert all(token == 1 for token, kept in outputs if not kept)  # the residual is all on 1


def test_speculative_rule_with_a_one_hot_target_keeps_only_that_token():
    generator = torch.Generator().manual_seed(0)
    target = torch.tensor([0.0, 0.0, 1.0])
    assert resolve_draft(2, torch.tensor([0.1, 0.1, 0.8]), target, generator) == (2, True)
    assert resolve_draft(0, torch.tensor([0.7, 0.1, 0.2]), target, generator) == (2, False)


# --- the wire ------------------------------------------------------------------------------

def test_uncompressed_distribution_round_trips_exactly():
    logprobs = torch.randn(50).log_softmax(0)
    arrays, compressed = pack_distribution(logprobs, "none")
    assert compressed == ()
    assert torch.equal(unpack_distribution(arrays, 50), logprobs)


def test_dragon_compression_keeps_top_p_renormalised_as_int16_offsets():
    # probabilities 0.5, 0.25, 0.15, 0.1 at ids 40000, 3, 7, 9: the top 0.8 needs three
    # tokens (cumulative 0.5, 0.75, 0.9), renormalised by 0.9
    logprobs = torch.full((40001,), -math.inf)
    logprobs[[40000, 3, 7, 9]] = torch.tensor([0.5, 0.25, 0.15, 0.1]).log()
    arrays, compressed = pack_distribution(logprobs, "dragon")
    assert set(compressed) == {"ids", "logprobs"}
    assert arrays["ids"].dtype == np.int16 and arrays["logprobs"].dtype == np.float16
    assert arrays["ids"].tolist() == [40000 - 32768, 3 - 32768, 7 - 32768]
    message = decode_message(device_cloud_wire.encode_message({"kind": "step"}, arrays, compressed))
    restored = unpack_distribution(message.arrays, 40001).exp()
    expected = torch.tensor([0.5, 0.25, 0.15]) / 0.9
    assert torch.allclose(restored[[40000, 3, 7]], expected, atol=1e-3)
    assert restored[9] == 0 and restored.sum().item() == pytest.approx(1.0, abs=1e-3)


def test_channel_delays_each_message_by_half_rtt_plus_serialisation():
    device_end, cloud_end = Pipe()
    sender = Channel(device_end)
    receiver = Channel(cloud_end, rtt_ms=200, bandwidth_mbps=1.0)
    payload = {"logprobs": np.zeros(10_000, dtype=np.float32)}  # 40 kB: 0.32 s at 1 Mbit/s
    started = time.perf_counter()
    sender.send({"kind": "step"}, payload)
    receiver.receive()
    assert 0.1 + 0.32 <= time.perf_counter() - started < 1.5
    assert sender.counters.bytes_sent == receiver.counters.bytes_received > 40_000


def test_channel_gives_up_on_a_silent_peer_and_reports_a_closed_one():
    device_end, cloud_end = Pipe()
    silent = Channel(device_end, timeout_s=0.5)
    started = time.perf_counter()
    with pytest.raises(PeerLost, match="sent nothing for 0.5 s"):
        silent.receive()
    assert time.perf_counter() - started < 2
    cloud_end.close()
    with pytest.raises(PeerLost, match="closed the connection"):
        silent.receive()


# --- two real processes --------------------------------------------------------------------

TEXT = ("The lighthouse keeper of Skerry Point kept a log of every ship that passed the rocks. "
        "In the winter of 1881 the lamp failed twice, and both times the keeper climbed the tower "
        "with an oil lantern to warn the fishing boats away from the reef.")
PASSAGES = [
    "Skerry Point lighthouse stands on a reef off the northern coast; its keeper kept a ship log.",
    "Oil lanterns were carried up lighthouse towers when the main lamp failed in winter storms.",
    "Fishing boats from the harbour sailed past the reef at dawn and returned before dark.",
    "In 1881 a series of winter gales damaged several lighthouses along the coast.",
]
SECRET = "My private diary: the keeper's daughter hid the spare lamp wick under the third stair."


@pytest.fixture(scope="module")
def model():
    from raghub.models import load_model

    return load_model(None, device="cpu")


def _windows(model, n_targets=12):
    from raghub import Window

    ids = model.encode(TEXT)
    return [Window(id=f"w{start}", query=model.decode(ids[:start]), context_ids=ids[:start],
                   target_ids=ids[start:start + n_targets], retrieved_max_length=24)
            for start in (16, 40)]


def _retrieved(texts, count=2):
    return [[Retrieved(Passage(f"p{i}", text), score) for i, (text, score) in
             enumerate(zip(texts, [2.0, 1.5, 1.2, 0.4]))] for _ in range(count)]


@pytest.fixture(scope="module")
def cloud_address():
    """A cloud started separately, as `raghub cloud serve --port 0`, its secret shared with
    the device through RAGHUB_CLOUD_AUTHKEY."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(AUTHKEY_VARIABLE, "test-device-cloud-secret")
        process, address = start_cloud()
        yield address
    process.terminate()
    process.wait(timeout=30)
    process.stdout.close()


def _bits_per_byte(logprobs, windows, model):
    nats = -sum(float(lp.sum()) for lp in logprobs)
    text_bytes = sum(len(model.decode(w.target_ids).encode()) for w in windows)
    return nats / (math.log(2) * text_bytes)


@pytest.mark.real_model
def test_synchronised_uncompressed_equals_the_centralised_ensemble(model, cloud_address, tmp_path):
    from raghub.cache import Cache
    from raghub.plugins.methods.ensemble import Ensemble

    windows, retrieved = _windows(model), _retrieved(PASSAGES)
    central = Ensemble(model, Cache(tmp_path)).score_windows(windows, retrieved)
    results = {}
    for mode, compression in [("synchronised", "none"), ("synchronised", "dragon"), ("speculative", "none")]:
        method = DeviceCloud(model, Cache(tmp_path), mode=mode, compression=compression,
                             cloud_address=cloud_address)
        try:
            results[mode, compression] = method.score_windows(windows, retrieved)
            stats = method.run_stats()
        finally:
            method.close()
        assert stats["tokens"] == sum(len(w.target_ids) for w in windows)
        assert stats["messages_per_token"] >= 2  # one distribution and one verdict per token
        if mode == "speculative":
            assert 0 <= stats["acceptance_rate_cloud"] <= 1 and stats["acceptance_rate_device"] == 1
        print(mode, compression, stats)
    for mode in ("synchronised", "speculative"):
        for distributed, centralised in zip(results[mode, "none"], central):
            assert distributed.shape == centralised.shape
            assert torch.allclose(distributed, centralised, atol=1e-4)
    exact = _bits_per_byte(central, windows, model)
    compressed = _bits_per_byte(results["synchronised", "dragon"], windows, model)
    print(f"bits per byte: centralised {exact:.4f}, dragon-compressed {compressed:.4f} "
          f"({compressed - exact:+.4f})")
    assert abs(compressed - exact) < 0.1 * exact


@pytest.mark.real_model
def test_device_documents_never_leave_the_device(model, cloud_address, tmp_path, monkeypatch):
    from raghub.cache import Cache

    sent = []
    encode = device_cloud_wire.encode_message
    monkeypatch.setattr(device_cloud_wire, "encode_message",
                        lambda *args, **kwargs: sent.append(encode(*args, **kwargs)) or sent[-1])
    windows = _windows(model, n_targets=4)[:1]
    retrieved = [[Retrieved(Passage("secret", SECRET), 3.0), Retrieved(Passage("p", PASSAGES[0]), 2.0)]]
    method = DeviceCloud(model, Cache(tmp_path), cloud_address=cloud_address)
    try:
        method.score_windows(windows, retrieved)
    finally:
        method.close()
    allowed = {"hello": {"rtt_ms", "bandwidth_mbps"},
               "open": {"request", "steps", "mode", "compression", "temperature"},
               "verdict": {"request", "step", "token", "done"}}
    secret_ids = model.encode(SECRET)[:24]
    assert {decode_message(data).kind for data in sent} == {"hello", "open", "verdict"}
    for data in sent:
        message = decode_message(data)
        assert set(message.fields) - {"kind", "sent_at"} <= allowed[message.kind]
        assert set(message.arrays) <= {"prompt_ids", "prompt_lengths", "scores", "closed_book_ids"}
        assert b"diary" not in data and b"wick" not in data
        for ids in message.arrays.values():
            text = " ".join(map(str, ids.tolist()))
            assert " ".join(map(str, secret_ids[:8])) not in text


@pytest.mark.real_model
def test_killing_the_cloud_mid_run_raises_a_clear_error_quickly(model, tmp_path):
    from raghub.cache import Cache

    windows = _windows(model, n_targets=400)[:1]
    method = DeviceCloud(model, Cache(tmp_path), rtt_ms=20, timeout_s=30)
    try:
        method._connect()  # spawns `raghub cloud serve --once`
        cloud = method.cloud_process
        threading.Timer(1.0, cloud.kill).start()
        started = time.perf_counter()
        with pytest.raises(CloudLost, match="cloud"):
            method.score_windows(windows, _retrieved(PASSAGES, count=1))
        assert time.perf_counter() - started < 10
    finally:
        method.close()
    assert cloud.poll() is not None and method.cloud_process is None


@pytest.mark.real_model
def test_rolling_back_restores_the_earlier_distribution(model):
    ids = model.encode(TEXT)
    side = DocumentSide(model, [ids[:10], ids[3:12]], [1.0, 0.5], 1.0, ids[:2], max_rollback=2)
    side.advance(ids[12])
    kept = side.mixture().clone()
    side.advance(ids[13])
    side.advance(ids[14])
    side.rollback(2)
    assert torch.equal(side.mixture(), kept)
    side.advance(ids[13])
    assert side.caches[0].get_seq_length() == 12


def _greedy_on_mixture(model, prompts, scores, max_new_tokens):
    """Greedy decoding where each token is the argmax of the REPLUG mixture over `prompts`."""
    stop_ids = {model.tokenizer.eos_token_id, model.tokenizer.pad_token_id}
    generated: list[int] = []
    while len(generated) < max_new_tokens:
        logits, lengths = model.logits([prompt + generated for prompt in prompts])
        last = logits[torch.arange(len(prompts)), lengths - 1].float().log_softmax(-1).cpu()
        token = int(mixture_logprobs(last, torch.tensor(scores)).argmax())
        if token in stop_ids:
            break
        generated.append(token)
    return generated


@pytest.mark.real_model
def test_qa_answers_are_greedy_on_the_centralised_token_mixture(model, cloud_address, tmp_path):
    """QA through device-cloud, uncompressed: every generated token is the argmax of the
    token-level mixture over both sides' passages. The cloud holds the only passage that
    answers the question, so an answer that ignored the cloud would differ."""
    from raghub.cache import Cache
    from raghub import PromptTemplate, Question

    question = Question(id="q", query="spare lamp wick", max_new_tokens=8,
                        question="Where did the keeper's daughter hide the spare lamp wick?",
                        template=PromptTemplate(style="completion"))
    # dealt alternately: PASSAGES[2] and PASSAGES[3] to the device, SECRET to the cloud
    hits = [Retrieved(Passage("a", PASSAGES[2]), 0.0), Retrieved(Passage("s", SECRET), 4.0),
            Retrieved(Passage("b", PASSAGES[3]), 0.0)]
    method = DeviceCloud(model, Cache(tmp_path), compression="none", cloud_address=cloud_address)
    try:
        [answer] = method.answer([question], [hits])
    finally:
        method.close()

    prompt_ids = [model.encode(question.prompt([hit.passage])) for hit in hits]
    union = _greedy_on_mixture(model, prompt_ids, [h.score for h in hits], question.max_new_tokens)
    device_only = _greedy_on_mixture(model, prompt_ids[::2], [0.0, 0.0], question.max_new_tokens)
    assert union != device_only
    assert answer == question.extract(model.decode(union))
