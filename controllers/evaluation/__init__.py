"""Evaluation (`r1ray eval`, and during GRPO): the job, the evaluator on the actors, the tasks."""
