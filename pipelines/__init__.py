"""Ray stages of the pipeline (ingest, latents, training, evaluation): pure batch functions plus thin Ray
wiring. Filled in by the stage issues; `infgen/` stays free of Ray, MLflow, DeepSpeed and img2dataset."""
