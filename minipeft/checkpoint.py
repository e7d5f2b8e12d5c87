"""Gradient checkpointing, written by hand: keep each block's input, recompute its insides in backward.

Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost".

    forward:   x ──► [ block ] ──► y         saved: x only (and the RNG state); activations freed
    backward:  x ──► [ block ] ──► y'        run again with grad on, then dL/dy flows back through y'

Memory for activations drops from every intermediate of every block to one (B, T, D) tensor per
block, for one extra forward pass. The block's trainable parameters are passed to the autograd
Function as inputs: that is what makes its output require grad even when x does not (LoRA-only
training on a frozen embedding), the case where other stacks fail with "element 0 of tensors does not
require grad".
"""

import torch


class CheckpointFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, module, args, x, *trainable):
        ctx.module, ctx.args = module, args
        ctx.cpu_rng = torch.get_rng_state()  # so dropout draws the same mask when recomputed
        ctx.cuda_rng = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        device = x.device.type
        ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        ctx.save_for_backward(x)
        with torch.no_grad():
            return module(x, *args)

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        trainable = [p for p in ctx.module.parameters() if p.requires_grad]
        x = x.detach().requires_grad_(ctx.needs_input_grad[2])
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, x.device)
            device, dtype, enabled = ctx.autocast  # recompute under the forward's autocast setting
            with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
                y = ctx.module(x, *ctx.args)  # the recompute
        inputs = ([x] if x.requires_grad else []) + trainable
        grads = list(torch.autograd.grad(y, inputs, grad_output, allow_unused=True))
        grad_x = grads.pop(0) if x.requires_grad else None
        return (None, None, grad_x, *grads)


def checkpoint(module, x, *args):
    """module(x, *args), keeping only x for backward. Only x and the module's parameters get gradients."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    return CheckpointFunction.apply(module, args, x, *trainable)


def enable_checkpointing(model, enabled=True):
    """Recompute each decoder block in backward instead of keeping its activations (training only)."""
    model.model.gradient_checkpointing = enabled
    return model
