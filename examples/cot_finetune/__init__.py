"""Chain-of-thought fine-tuning of a causal LM (the NSO papers' GPT-2/T5 runs): data (a local
JSONL of question/rationale/answer or generated arithmetic) and model (a local model directory
or a tiny GPT-2). See docs/recipes.md."""
from .data import (CoTData, CoTExample, format_example, generate_arithmetic, load_cot_data,
                   read_cot_jsonl, tokenize_examples, train_dataset)
from .model import load_model, tiny_gpt2

__all__ = ["CoTData", "CoTExample", "format_example", "generate_arithmetic", "load_cot_data",
           "read_cot_jsonl", "tokenize_examples", "train_dataset", "load_model", "tiny_gpt2"]
