"""The built-in plugins: methods, retrievers, task families and model backends, each registered
through the same hooks a third-party package uses."""
