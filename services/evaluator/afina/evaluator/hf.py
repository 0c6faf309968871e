"""The base and fine-tuned models through transformers: teacher-forced log-probabilities and greedy answers.

Run in float32 on the evaluator's CPU (or the first CUDA device), so the reference figures the GGUF copies
are compared with carry no rounding of their own. The fine-tuned model is the base with the job's committed
LoRA adapter merged in memory (PEFT's ``merge_and_unload``): the weights the exporter converted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class HfScorer:
    def __init__(self, model: Any, tokenizer: Any, stop_ids: list[int]) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        self.device = next(model.parameters()).device

    @classmethod
    def load(cls, model_dir: Path, tokenizer: Any, stop_ids: list[int], adapter_dir: Path | None = None,
             threads: int | None = None) -> HfScorer:
        """``threads``: torch's CPU threads (``AFINA_INFERENCE_THREADS``); on a machine whose cores other work
        shares, fewer threads than cores decode several times faster than threads that wait on each other."""
        import torch
        from transformers import AutoModelForCausalLM

        if threads:
            torch.set_num_threads(threads)
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        if adapter_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
        if torch.cuda.is_available():
            model = model.to("cuda")
        model.eval()
        return cls(model, tokenizer, stop_ids)

    def token_logprobs(self, prompt_ids: list[int], answer_ids: list[int]) -> list[float]:
        import torch

        ids = torch.tensor([prompt_ids + answer_ids], device=self.device)
        with torch.inference_mode():
            logits = self.model(ids).logits[0].float()
        start = len(prompt_ids) - 1
        logprobs = torch.log_softmax(logits[start:start + len(answer_ids)], dim=-1)
        targets = torch.tensor(answer_ids, device=self.device)[:, None]
        return logprobs.gather(1, targets).squeeze(1).tolist()

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> str:
        return self.generate_many([prompt_ids], max_new_tokens)[0]

    def generate_many(self, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
        """Greedy answers to several prompts in one batch (left-padded): on a CPU one batched decode costs little
        more than one sequence's, so the examples' answers come several times faster than one by one."""
        import torch

        pad = self.stop_ids[0] if self.tokenizer.pad_token_id is None else self.tokenizer.pad_token_id
        width = max(len(prompt) for prompt in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        with torch.inference_mode():
            output = self.model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                         eos_token_id=self.stop_ids, pad_token_id=pad)
        return [str(self.tokenizer.decode(row[width:], skip_special_tokens=True)).strip() for row in output]

    def close(self) -> None:
        import gc

        del self.model
        gc.collect()
