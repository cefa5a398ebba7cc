"""Keep the best-on-dev weights until the test evaluation (MeZO: HF load_best_model_at_end).

  disk  safetensors file in the run directory: no second copy of the model in (GPU or host) memory
  host  a copy in host RAM: faster; needs RAM for one more copy of the weights
  none  test the final weights
"""

from __future__ import annotations

from pathlib import Path

import torch

from .models import trained_parameters

MODES = ("disk", "host", "none")


class BestWeights:
    def __init__(self, model: torch.nn.Module, mode: str, run_dir: Path, step=lambda: None):
        """`step()` says which step the weights being saved belong to (kept in the file's metadata)."""
        if mode not in MODES:
            from .errors import ZobenchError

            raise ZobenchError(f"train.keep_best must be one of {', '.join(MODES)}, got {mode}")
        self.model, self.mode = model, mode
        self.path = Path(run_dir) / "best_weights.safetensors"
        self._host: dict[str, torch.Tensor] | None = None
        self.saved = False
        self.step = step

    def _parameters(self) -> dict[str, torch.nn.Parameter]:
        return trained_parameters(self.model)  # frozen weights (an adapter's base model) never change

    @torch.no_grad()
    def save(self, step: int | None = None) -> None:
        step = self.step() if step is None else step
        if self.mode == "host":
            self._host = {n: p.detach().to("cpu", copy=True) for n, p in self._parameters().items()}
        elif self.mode == "disk":
            from safetensors.torch import save_file

            tmp = self.path.with_suffix(".tmp")
            try:
                save_file({n: p.detach().contiguous().cpu() for n, p in self._parameters().items()}, str(tmp),
                          metadata={"step": str(step)})
                tmp.replace(self.path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        self.saved = self.mode != "none"

    def adopt_saved(self, best_step: int) -> bool:
        """After a resume from saved weights: is the best-on-dev copy of `best_step` still there? (disk: yes,
        unless a kill came between a later best's save and that step's checkpoint)"""
        if self.mode == "disk":
            from .run_dir import safetensors_step

            self.saved = self.path.exists() and safetensors_step(self.path) == best_step
        return self.mode == "none" or self.saved

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the saved weights back tensor by tensor, then drop the copy."""
        if not self.saved:
            return
        params = self._parameters()
        if self.mode == "host":
            for name, value in self._host.items():
                params[name].copy_(value)
            self._host = None
        else:
            from safetensors import safe_open

            with safe_open(str(self.path), framework="pt") as saved:
                for name in saved.keys():
                    params[name].copy_(saved.get_tensor(name))
            self.path.unlink(missing_ok=True)
        self.saved = False

    def discard(self) -> None:
        self._host = None
        if self.mode == "disk":
            self.path.unlink(missing_ok=True)
