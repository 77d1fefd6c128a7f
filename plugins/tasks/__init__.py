"""Built-in task families (language modelling, QA) and the shipped task definitions."""
