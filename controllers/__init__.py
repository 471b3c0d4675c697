"""The jobs: one subpackage per pipeline (grpo, sft, evaluation, distill), what they share
(common), the recipe schema (config), staged runs (stages) and the CLI (cli). A pipeline
imports common and config, and the pieces of another pipeline it runs (GRPO runs an SFT
warm-up and evaluations), never another pipeline's job."""
