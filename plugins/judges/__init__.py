"""Built-in LLM judges of answers (`raghub judge --judge NAME`)."""
