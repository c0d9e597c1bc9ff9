"""The built-in demo model (issue 16): procedural data, the evaluator that reads pictures back."""
