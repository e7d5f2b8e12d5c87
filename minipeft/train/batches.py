"""Token lists into padded or packed batches, in a shuffled order that a resumed run can replay exactly.

Packing (the default of train_code.py) fills each row with whole samples end to end, as codeparrot's
own training streams its files, instead of one short sample per row:

    row 0:  [ doc 7 ........ ][ doc 2 ..... ][ doc 9 ........... ][pad]
    row 1:  [ doc 4 ..................... ][ doc 1 ...... ][ doc 5 .. ]

Each token attends only within its document, its rotary positions restart there, and nothing is
predicted across a boundary (`documents`), so a packed row computes exactly what its documents would
alone: packing changes the speed, not the model. A sample that does not fit in what is left of a row
starts the next one; none is cut.
"""

import torch


def pad_batch(samples, device, pad_id=0):
    """Right-pad token lists into input ids, attention mask and labels (-100 on padding)."""
    longest = max(len(s) for s in samples)
    ids = torch.full((len(samples), longest), pad_id, dtype=torch.long)
    mask = torch.zeros(len(samples), longest, dtype=torch.bool)
    for row, sample in enumerate(samples):
        ids[row, :len(sample)] = torch.tensor(sample)
        mask[row, :len(sample)] = True
    return ids.to(device), mask.to(device), ids.masked_fill(~mask, -100).to(device)


def pack_rows(rows, device, pad_id=0):
    """Rows of whole samples into input ids, attention mask, labels (-100 on padding) and document indices
    (B, L); padding gets a document of its own."""
    longest = max(sum(len(s) for s in row) for row in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), longest, dtype=torch.bool)
    labels = torch.full((len(rows), longest), -100, dtype=torch.long)
    documents = torch.full((len(rows), longest), len(max(rows, key=len)), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for d, sample in enumerate(row):
            end = start + len(sample)
            ids[r, start:end] = labels[r, start:end] = torch.tensor(sample)
            mask[r, start:end], documents[r, start:end] = True, d
            start = end
    return ids.to(device), mask.to(device), labels.to(device), documents.to(device)


class Batches:
    """Endless micro-batches from a shuffled order that depends only on (seed, epoch): resumable by position."""

    def __init__(self, samples, batch_size, seed, epoch=0, cursor=0):
        self.samples = samples
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = epoch
        self.cursor = cursor

    def order(self):
        if getattr(self, "order_epoch", None) != self.epoch:  # one shuffle per epoch
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            self.shuffled = torch.randperm(len(self.samples), generator=generator).tolist()
            self.order_epoch = self.epoch
        return self.shuffled

    def peek(self):
        if self.cursor == len(self.samples):
            self.epoch, self.cursor = self.epoch + 1, 0
        return self.samples[self.order()[self.cursor]]

    def next(self):
        """`batch_size` samples."""
        batch = []
        while len(batch) < self.batch_size:
            batch.append(self.peek())
            self.cursor += 1
        return batch

    def next_packed(self, row_length):
        """`batch_size` rows, each of whole samples in order, at most `row_length` tokens (a longer sample
        fills a row alone, cut: callers cut samples to the row length first)."""
        rows = []
        for _ in range(self.batch_size):
            row, used = [], 0
            while not row or used + len(self.peek()) <= row_length:
                sample = self.peek()[:row_length]
                row.append(sample)
                used += len(sample)
                self.cursor += 1
            rows.append(row)
        return rows
