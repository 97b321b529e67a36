"""gen: vLLM-backed generation stages (detect, guidelines, augment, respond)."""
