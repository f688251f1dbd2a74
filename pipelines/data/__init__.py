"""Data contracts and text: normalisation, the one tokenizer, the clean catalog and shard-set
formats stages hand to each other, and the embedded synthetic catalog."""
