"""Built-in refiners: truncate (the first tokens of each passage) and extractive (RECOMP's
extractive form: the passages' sentences most similar to the question)."""
