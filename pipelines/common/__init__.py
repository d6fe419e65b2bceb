"""What the stages share, written once: records and JSON I/O (files), the run lock, claiming an output and
the stage tail that writes and logs its manifest (stage_output), MLflow (tracking), crop geometry (crops),
the large-image policy (image_policy), the held-out rule (holdout), held-out reconstruction pairs
(reconstruction), the latent stage's record and shard format (latent_record, latent_shards), the frozen
VAE's source (vae_source), the actor pool, and Ctrl-C handling (signals).

Stage packages (ingest, latents, training, evaluation) import only this layer and `infgen`, never each other
(tests/test_architecture.py checks the graph); docs/architecture.md draws it.
"""
