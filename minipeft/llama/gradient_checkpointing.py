"""Gradient checkpointing, written by hand: keep each block's input, recompute its insides in backward.

Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost".

    forward:   x ──► [ block ] ──► y         saved: x only (and the RNG state); activations freed
    backward:  x ──► [ block ] ──► y'        run again with grad on, then dL/dy flows back through y'

Memory for activations drops from every intermediate of every block to one (B, T, D) tensor per
block, for one extra forward pass. The block's trainable parameters are passed to the autograd
Function as inputs: that is what makes its output require grad even when x does not (LoRA-only
training on a frozen embedding), the case where other stacks fail with "element 0 of tensors does not
require grad". Tensors the block reads from outside (a learned past in the KV cache) are passed the
same way, so they get their gradients too.

Not to be confused with a training checkpoint (the state a run resumes from): minipeft/train/run_state.py.
"""

import torch


class CheckpointFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, module, args, num_outside, x, *differentiable):
        ctx.module, ctx.args, ctx.num_outside = module, args, num_outside
        ctx.outside = differentiable[:num_outside]  # views of tensors that live on (the learned past)
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
        outside = [t for t, needed in zip(ctx.outside, ctx.needs_input_grad[4:]) if needed]
        x = x.detach().requires_grad_(ctx.needs_input_grad[3])
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, x.device)
            device, dtype, enabled = ctx.autocast  # recompute under the forward's autocast setting
            with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
                y = ctx.module(x, *ctx.args)  # the recompute
        inputs = ([x] if x.requires_grad else []) + outside + trainable
        grads = iter(torch.autograd.grad(y, inputs, grad_output, allow_unused=True))
        grad_x = next(grads) if x.requires_grad else None
        grad_outside = [next(grads) if needed else None for needed in ctx.needs_input_grad[4:4 + ctx.num_outside]]
        return (None, None, None, grad_x, *grad_outside, *grads)


def checkpoint(module, x, *args, also_differentiate=()):
    """module(x, *args), keeping only x for backward. x, the module's parameters and the tensors in
    `also_differentiate` (which the module reads through `args`) get gradients."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    outside = list({id(t): t for t in also_differentiate}.values())  # a tensor given twice gets its gradient once
    return CheckpointFunction.apply(module, args, len(outside), x, *outside, *trainable)


def enable_checkpointing(model, enabled=True):
    """Recompute each decoder block in backward instead of keeping its activations (training only)."""
    model.model.gradient_checkpointing = enabled
    return model
