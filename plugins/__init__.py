"""Built-in plugins: every method, retriever and task family raghub ships."""
