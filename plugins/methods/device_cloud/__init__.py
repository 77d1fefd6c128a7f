"""`device-cloud`: DRAGON's distributed RAG, a device and a cloud process mixing distributions.

Each side runs the model over its own documents and keeps one KV cache per document. At every
step it forms its own mixture ℓ_side = logsumexp_g(log softmax(s/T)_g + log p_g) and its total
weight W_side = logsumexp(s/T); the cloud sends (ℓ_cloud, W_cloud) and the device, the
aggregator, mixes p = Σ_side softmax([W_device, W_cloud])_side · exp(ℓ_side), which is exactly
the `ensemble` over the union of both sides' documents (the same temperature T divides every
score). The device's documents never leave the device: only distributions, weights and token
ids go on the wire (see `device_cloud_wire`).

Where the documents come from:
- default (DRAGON's setup): the runner's one ranked list is dealt alternately, ranks 1, 3, ...
  to the device and 2, 4, ... to the cloud, so both sides hold comparably relevant documents
  (first-half/second-half would give the device every top document and make the cloud's
  share of the mixture, and hence the communication being measured, negligible). The cloud's
  share is sent to it once per example as prompt token ids, standing in for the cloud's own
  retrieval over the same public datastore.
- `--cloud-corpus PATH` (the real use): the device keeps the whole ranked list; the cloud
  process loads PATH, indexes it with `--cloud-retriever`, and retrieves for the query itself.
  A side left without documents contributes its closed-book distribution with weight 0.

Modes, per step (the agreed token is the decoding rule's choice from the aggregate: the gold
token when scoring a language-modelling window, the argmax when answering a question):
- `synchronised`: the cloud sends step t, the device aggregates and answers with the agreed
  token, and only then does the cloud advance: one round trip per token.
- `speculative`: each side drafts its own argmax token and advances on it without waiting, the
  cloud up to `SPECULATION_DEPTH` steps ahead, streaming its distributions. The device
  resolves the cloud's draft by the speculative-sampling rule against the decoding rule's
  target distribution (`resolve_draft`); a side whose draft is rejected rolls its KV caches
  back and re-advances on the agreed token, and the cloud's messages computed on the rejected
  draft are discarded (each carries an epoch, bumped at every rejection). When scoring, the
  device "drafts" the gold token it holds, so only the cloud ever rolls back. The target is
  one-hot (greedy decoding or teacher forcing), so both modes give identical log-probs and
  answers; speculation only hides round trips, and the acceptance rate says how often.

A lost cloud (killed, disconnected, silent past `--timeout-s`) raises `CloudLost`, one line,
after which the runner keeps every batch finished so far; a rerun resumes.
"""

from raghub import hookimpl

from .method import DeviceCloud
from .server import cloud_commands


@hookimpl
def register_methods(register):
    register(DeviceCloud)


@hookimpl
def register_commands(cli):
    cli.add_command(cloud_commands)
