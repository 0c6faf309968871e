"""On a CUDA machine: does a packed batch stay isolated per example under Unsloth, as it does under transformers?

The CPU test suite checks transformers (tests/unit/trainer/test_packing.py); Unsloth needs
CUDA, so this script checks it on the GPU: per-token losses of examples run one by one,
packed by afina's ``PaddingFreeCollator`` (positions restart per example), and packed with
positions NOT restarting (the leak this must prevent). It also checks that the
Unsloth-patched ``SFTTrainer`` keeps afina's collator rather than swapping in its own.

    python bench/gpu_packing_check.py --model-dir DIR   # a model folder, e.g. from gpu_trainer.py
"""

from __future__ import annotations

import argparse
import json
import random


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--out", default="")
    args = parser.parse_args()

    from unsloth import FastLanguageModel  # noqa: I001 - Unsloth first

    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from afina.trainer.packing import IGNORE_INDEX, PaddingFreeCollator, pack_rows

    model, _ = FastLanguageModel.from_pretrained(model_name=args.model_dir, max_seq_length=2048,
                                                 dtype=torch.bfloat16, load_in_4bit=False, local_files_only=True)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=0.0,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                             use_gradient_checkpointing="unsloth", random_state=0)
    model.eval()
    rng = random.Random(0)
    rows = []
    for length in (300, 170, 420, 90):
        ids = [rng.randrange(100, 40000) for _ in range(length)]
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * 5 + ids[5:]})

    def token_losses(batch: dict) -> torch.Tensor:
        with torch.no_grad():
            inputs = {k: v.cuda() for k, v in batch.items() if k != "labels"}
            logits = model(**inputs, use_cache=False).logits.float()
        labels = batch["labels"].cuda()
        losses = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=IGNORE_INDEX,
                                                   reduction="none")
        return losses[labels[0, 1:] != IGNORE_INDEX]

    separate = torch.cat([token_losses({"input_ids": torch.tensor([r["input_ids"]]),
                                        "labels": torch.tensor([[IGNORE_INDEX] + r["labels"][1:]])})
                          for r in rows])
    packed_rows, _ = pack_rows(rows, 2048)
    packed_rows = [dict(row) for row in packed_rows]
    # the same order as `separate`: pack_rows sorts members by dataset index within a bin
    packed = token_losses(PaddingFreeCollator()(packed_rows))
    leaked_batch = PaddingFreeCollator()(packed_rows)
    leaked_batch["position_ids"] = torch.arange(leaked_batch["input_ids"].shape[1]).unsqueeze(0)
    leaked = token_losses(leaked_batch)

    collator = PaddingFreeCollator()
    trainer = SFTTrainer(model=model, processing_class=AutoTokenizer.from_pretrained(args.model_dir),
                         args=SFTConfig(output_dir="/tmp/packing-check", max_steps=1, report_to=[],
                                        dataset_kwargs={"skip_prepare_dataset": True}, max_length=2048),
                         train_dataset=Dataset.from_list(packed_rows), data_collator=collator)
    result = {
        "tokens": int(separate.numel()),
        "packed_vs_separate_max_abs": float((packed - separate).abs().max()),
        "packed_vs_separate_mean_abs": float((packed - separate).abs().mean()),
        "leaked_vs_separate_max_abs": float((leaked - separate).abs().max()),
        "leaked_vs_separate_mean_abs": float((leaked - separate).abs().mean()),
        "trainer_keeps_afina_collator": trainer.data_collator is collator,
        "trainer_collator": type(trainer.data_collator).__name__,
    }
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
