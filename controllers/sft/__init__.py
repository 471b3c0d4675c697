"""SFT (`r1ray sft`, and the warm-up of `r1ray train`): the job, the step loop, its data."""
