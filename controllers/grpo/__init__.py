"""GRPO (`r1ray train`): the job, the streaming driver and its parts (rollouts, groups,
records, reward book), the staleness bound, telemetry."""
