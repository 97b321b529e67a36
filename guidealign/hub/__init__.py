"""The Hugging Face Hub side of a run: pushing a stage's shards or the trained model
(``push``: ``run_push``; ``commits``: batched, resumable commits on huggingface_hub's commit
API; ``targets``: what a push sends), dataset and model cards (``card``), JSONL export
(``export``)."""
