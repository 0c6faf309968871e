"""The base and fine-tuned models through transformers: teacher-forced log-probabilities and greedy answers.

Run in float32 on the evaluator's CPU (or the first CUDA device), so the reference figures the GGUF copies
are compared with carry no rounding of their own. The fine-tuned model is the base with the job's committed
LoRA adapter merged in memory (PEFT's ``merge_and_unload``): the weights the exporter converted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SCORING_ROWS = 8  # sequences in one teacher-forced forward (their logits: rows x length x vocabulary floats)


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

    def token_logprobs_many(self, pairs: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        """``token_logprobs`` of several (prompt, answer) pairs in one forward: the sequences right-padded (a causal
        model's real positions never attend to the padding after them, and their position ids are unchanged), each
        one's answer log-probabilities gathered from its own rows. Equal to one pair at a time within float32
        rounding of the differently shaped matrix products (tests hold it to 1e-4)."""
        import torch

        if len(pairs) > SCORING_ROWS:  # the logits of every position of every row are held at once
            return [logprobs for start in range(0, len(pairs), SCORING_ROWS)
                    for logprobs in self.token_logprobs_many(pairs[start:start + SCORING_ROWS])]
        if not pairs:
            return []
        pad = self.stop_ids[0] if self.tokenizer.pad_token_id is None else self.tokenizer.pad_token_id
        rows = [prompt + answer for prompt, answer in pairs]
        width = max(len(row) for row in rows)
        ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows], device=self.device)
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows], device=self.device)
        with torch.inference_mode():
            logits = self.model(ids, attention_mask=mask).logits.float()
        out = []
        for i, (prompt, answer) in enumerate(pairs):
            if not answer:
                out.append([])
                continue
            start = len(prompt) - 1
            logprobs = torch.log_softmax(logits[i, start:start + len(answer)], dim=-1)
            targets = torch.tensor(answer, device=self.device)[:, None]
            out.append(logprobs.gather(1, targets).squeeze(1).tolist())
        return out

    def score_many(self, prompts: list[list[int]], answers: list[list[list[int]]],
                   max_new_tokens: int) -> list[tuple[str, list[list[float]]]]:
        """Per prompt, its greedy answer and the log-probabilities of each of its ``answers``, batched: one
        ``generate_many`` and one ``token_logprobs_many`` for all."""
        if not prompts:
            return []
        texts = self.generate_many(prompts, max_new_tokens)
        pairs = [(prompt, answer) for prompt, own in zip(prompts, answers, strict=True) for answer in own]
        scored = iter(self.token_logprobs_many(pairs))
        return [(text, [next(scored) for _ in own]) for text, own in zip(texts, answers, strict=True)]

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> str:
        return self.generate_many([prompt_ids], max_new_tokens)[0]

    def generate_many(self, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
        """Greedy answers to several prompts in one batch (left-padded): on a CPU one batched decode costs little
        more than one sequence's, so the examples' answers come several times faster than one by one."""
        import torch

        if not prompts:
            return []
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
