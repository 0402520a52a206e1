"""The curation filters: leak control by perceptual hash (hashing, hash_index, dedup), the LVLM judge's rubric,
reply parsing and score stage (judge), answer perplexity (perplexity), and per-source thresholds (thresholds)."""
