"""HF Trainer's default optimizer in MeZO's environment (transformers 4.28, `optim="adamw_hf"`:
transformers.optimization.AdamW), which later transformers releases no longer ship.

It differs from torch.optim.AdamW in two places: eps is added to sqrt(v) before the bias correction
(step = lr·sqrt(1-β2^t)/(1-β1^t) · m / (sqrt(v) + eps)), and the decoupled weight decay is applied after the
Adam step (θ -= lr·wd·θ) rather than before it. Written from that rule; MeZO's finetune.sh runs it.
"""

from __future__ import annotations

import math

import torch


class HFAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                state["step"] += 1
                exp_avg, exp_avg_sq, grad = state["exp_avg"], state["exp_avg_sq"], param.grad
                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                denom = exp_avg_sq.sqrt().add_(group["eps"])
                step_size = group["lr"] * math.sqrt(1.0 - beta2 ** state["step"]) / (1.0 - beta1 ** state["step"])
                param.addcdiv_(exp_avg, denom, value=-step_size)
                if group["weight_decay"] > 0.0:
                    param.add_(param, alpha=-group["lr"] * group["weight_decay"])
        return None
