"""Built-in methods: none, incontext, ensemble, parametric, device-cloud."""
