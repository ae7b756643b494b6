"""The trace language model: tokenizer (:mod:`.tokenizer`), training data (:mod:`.data`), model and training.

Kept free of heavy imports: ``import otel_tracegen.lm`` does not import torch or transformers.
"""
