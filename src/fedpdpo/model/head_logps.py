"""Log-probabilities of target tokens through the vocabulary head, with a hand-written backward.

For rows ``h`` [T, H] of final hidden states, head ``W`` [V, H] and targets ``y`` [T]:

    logits = h W^T,   lse = logsumexp(logits) (fp32),   log p(y) = logits[y] - lse
    d log p(y) / d logits = onehot(y) - softmax(logits)

Autograd's cross-entropy keeps the [T, V] logits in fp32 and runs several passes over them in the backward (a
zero-filled scatter for the pick, the log-softmax backward, the cast back to bf16): on SmolLM2's 49k vocabulary
they cost a training step more time than the matrix products they surround. Here the forward keeps only the logits
as computed (bf16 under autocast) and their fp32 ``lse``; the backward forms the gradient of the logits in one pass.
Both elementwise kernels are compiled with ``torch.compile`` when ``compiled`` is set (one fused loop each); where
compilation fails (no C++ compiler, an unsupported platform) the same formulas run eagerly, once warned. Chunks of
fewer than ``COMPILE_MIN_LOGITS`` logits (a test model's small vocabulary) run eagerly too: there each eager pass
takes well under a millisecond, and compiling costs each process 2-4 s.
Reductions and the softmax stay fp32 whatever the logits' dtype, as the method requires.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

COMPILE_MIN_LOGITS = 1 << 20  # SmolLM2: 22 response tokens x 49,152; a demo step's chunk has about 1,000


def _lse(logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits.float(), dim=-1)


def _logits_grad(logits: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    probs = torch.exp(logits.float() - lse.unsqueeze(1))
    hit = torch.arange(logits.shape[1], device=logits.device).unsqueeze(0) == targets.unsqueeze(1)
    return (grad.float().unsqueeze(1) * (hit.float() - probs)).to(logits.dtype)


class _Kernel:
    """One elementwise kernel: compiled on first use when asked, else (or after a failed compilation) eager."""

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        self.eager = fn
        self.compiled: Callable[..., torch.Tensor] | None = None
        self.failed = False

    def __call__(self, compiled: bool, *args: torch.Tensor) -> torch.Tensor:
        if not compiled or self.failed:
            return self.eager(*args)
        if self.compiled is None:
            self.compiled = torch.compile(self.eager, dynamic=True)
        try:
            return self.compiled(*args)
        except Exception as exc:  # a compiler failure: the same formula eagerly (a real error raises there again)
            self.failed = True
            log.warning(
                "torch.compile of the head's %s failed (%s); running it eagerly",
                self.eager.__name__,
                str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
            )
            return self.eager(*args)


LSE = _Kernel(_lse)
LOGITS_GRAD = _Kernel(_logits_grad)


class _TargetLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, states: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, compiled: bool):
        logits = states @ weight.T
        compiled = compiled and logits.numel() >= COMPILE_MIN_LOGITS
        lse = LSE(compiled, logits)
        picked = logits.gather(1, targets.unsqueeze(1)).squeeze(1).float()
        ctx.save_for_backward(states, weight, targets, logits, lse)
        ctx.compiled = compiled
        return picked - lse

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        states, weight, targets, logits, lse = ctx.saved_tensors
        grad_logits = LOGITS_GRAD(ctx.compiled, logits, lse, grad, targets)
        grad_states = grad_logits @ weight if ctx.needs_input_grad[0] else None
        grad_weight = grad_logits.T @ states if ctx.needs_input_grad[1] else None
        return grad_states, grad_weight, None, None


def target_logps(states: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, compiled: bool = True):
    """``log softmax(states @ weight.T)[t, targets[t]]`` in fp32, per row. ``states`` and ``weight`` must share a
    dtype (the caller casts them once); the matrix products run in it, outside autocast."""
    with torch.autocast(states.device.type, enabled=False):
        return _TargetLogps.apply(states, weight, targets, compiled)
