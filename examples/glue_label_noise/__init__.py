"""GLUE-style sequence classification with label noise (the NSO papers' RoBERTa/BERT runs):
data (a local GLUE file or a generated task, labels corrupted with a fixed seed) and model (a
local model directory or a tiny RoBERTa). See docs/recipes.md."""
from .data import (GLUE_TASKS, NOISE_MODES, TextClassificationTask, add_label_noise,
                   generate_task, load_task, read_labeled_file, train_dataset)
from .model import load_model, tiny_roberta

__all__ = ["GLUE_TASKS", "NOISE_MODES", "TextClassificationTask", "add_label_noise",
           "generate_task", "load_task", "read_labeled_file", "train_dataset", "load_model",
           "tiny_roberta"]
