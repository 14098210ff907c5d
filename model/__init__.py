"""The model package: the T5 chat model, its tokenizer, data loading, trainers, inference."""
