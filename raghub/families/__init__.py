"""The contracts between task families and methods: the example types a family hands to a
method, and the model-facing helpers a method needs to serve that family. Tasks and methods
both import these, never each other."""
