"""Next-token accuracy measured from the model's own forward passes, for a backend whose logs lack it.

TRL's ``SFTTrainer`` logs ``mean_token_accuracy``; a plain ``Trainer`` (or a backend that
patches the loss) may not. This meter gives the same figure with the same definition: per
forward pass, correct argmax predictions over positions whose shifted label is not -100, then
the mean over the passes since the last reading. It needs the logits: a backend that fuses
the loss and never calls the output layer (Unsloth's fused cross-entropy) yields no passes,
and the figure stays unknown rather than invented.
"""

from __future__ import annotations

from typing import Any

IGNORE_INDEX = -100


class TokenAccuracyMeter:
    """Hooks on a model: its forward call (to see the labels) and its output layer (to see the logits)."""

    def __init__(self) -> None:
        self._labels: Any = None
        self._handles: list[Any] = []
        self._passes: dict[str, list[Any]] = {"train": [], "eval": []}

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self, model: Any) -> bool:
        """Start measuring ``model``; False (and nothing attached) when it has no output layer to watch."""
        output_layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if output_layer is None:
            return False
        self._handles = [model.register_forward_pre_hook(self._see_labels, with_kwargs=True),
                         output_layer.register_forward_hook(self._see_logits)]
        return True

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._labels = None

    def take(self, mode: str) -> float | None:
        """The mean accuracy of ``mode``'s (``train``/``eval``) passes since the last call; None if none."""
        passes, self._passes[mode] = self._passes[mode], []
        accuracies = [correct.item() / total.item() for correct, total in passes if total.item() > 0]
        return sum(accuracies) / len(accuracies) if accuracies else None

    def _see_labels(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._labels = kwargs.get("labels")

    def _see_logits(self, module: Any, inputs: Any, logits: Any) -> None:
        labels, self._labels = self._labels, None
        if labels is None or getattr(logits, "ndim", 0) != 3 or logits.shape[:2] != labels.shape[:2]:
            return
        import torch

        with torch.no_grad():
            predictions = logits[:, :-1, :].argmax(dim=-1)
            targets = labels[:, 1:].to(predictions.device)
            mask = targets != IGNORE_INDEX
            correct = ((predictions == targets) & mask).sum()
            # kept as tensors: reading them here would stall the GPU once per micro-batch
            self._passes["train" if module.training else "eval"].append((correct, mask.sum()))
