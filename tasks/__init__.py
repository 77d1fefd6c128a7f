"""Built-in task definitions: one YAML file per task, shipped as package data."""
