"""Distillation (`r1ray distill`): the job and the distilabel pipeline around the teacher."""
