"""Tokenised examples as a torch Dataset of Hugging Face-style dicts."""
from __future__ import annotations

import torch

__all__ = ["TokenizedDataset", "IGNORE_INDEX"]

IGNORE_INDEX = -100  # a label the loss skips (padding, prompts), as transformers' losses do


class TokenizedDataset(torch.utils.data.Dataset):
    """Rows of ``input_ids``, ``attention_mask`` and ``labels``, padded on the right to the
    longest row (pad id, mask 0, label -100 where labels are per token). An item is a dict of
    tensors, so the default DataLoader collation gives the batches a transformers model takes
    (``model(**batch)``), and ``flatfused sharpness --data`` reads them as (inputs, labels)."""

    def __init__(self, input_ids, labels, pad_token_id: int):
        if not input_ids:
            raise ValueError("no examples")
        if len(labels) != len(input_ids):
            raise ValueError(f"{len(input_ids)} sequences but {len(labels)} labels")
        width = max(len(ids) for ids in input_ids)
        self.input_ids = torch.tensor([list(ids) + [pad_token_id] * (width - len(ids))
                                       for ids in input_ids], dtype=torch.long)
        self.attention_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids))
                                            for ids in input_ids], dtype=torch.long)
        if isinstance(labels[0], (list, tuple)):  # one label per token
            self.labels = torch.tensor([list(lab) + [IGNORE_INDEX] * (width - len(lab))
                                        for lab in labels], dtype=torch.long)
        else:
            self.labels = torch.tensor(labels, dtype=torch.long)

    def __len__(self):
        return self.input_ids.shape[0]

    def __getitem__(self, i):
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i],
                "labels": self.labels[i]}
