"""Built-in methods: none, incontext, ensemble, fid, rag-sequence, parametric, device-cloud, and
those that retrieve while they work: ircot, iter-retgen, adaptive, flare, self-ask, react."""
