"""What every job shares: the job shell (job), the actor groups of a run (system), data
preparation and checks, chat rendering, checkpoints, the run's jsonl logs (runlog), the
work in flight (inflight) and the actors replaced while it runs (elastic), signals, the tiny
world."""
