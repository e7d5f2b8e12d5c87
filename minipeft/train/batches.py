"""Token lists into padded batches, in a shuffled order that a resumed run can replay exactly."""

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


class Batches:
    """Endless micro-batches from a shuffled order that depends only on (seed, epoch): resumable by position."""

    def __init__(self, samples, batch_size, seed, epoch=0, cursor=0):
        self.samples, self.batch_size, self.seed = samples, batch_size, seed
        self.epoch, self.cursor = epoch, cursor

    def order(self):
        if getattr(self, "order_epoch", None) != self.epoch:  # one shuffle per epoch
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            self.shuffled, self.order_epoch = torch.randperm(len(self.samples), generator=generator).tolist(), self.epoch
        return self.shuffled

    def next(self):
        batch = []
        while len(batch) < self.batch_size:
            if self.cursor == len(self.samples):
                self.epoch, self.cursor = self.epoch + 1, 0
            batch.append(self.samples[self.order()[self.cursor]])
            self.cursor += 1
        return batch
